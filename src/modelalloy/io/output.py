"""Everything in an output directory besides the weights and the model card: tokenizer and generation files."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelalloy.io.checkpoint import Checkpoint

# Files copied from the donor model, as mergekit's --copy-tokenizer does.
SUPPORT_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_support_files(donor: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in SUPPORT_FILES:
        src = donor / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    return copied


# Of those, the files that describe the tokenizer (replaced when we write a tokenizer ourselves).
TOKENIZER_FILES = tuple(name for name in SUPPORT_FILES if name != "generation_config.json")


def write_tokenizer_files(donor: Checkpoint, out_dir: Path, *, tokenizer=None, chat_template: str | None = None) -> list[str]:
    """The donor's tokenizer and generation files in `out_dir`.

    Copied byte for byte, unless there is a tokenizer object to save instead: one built for an
    aligned vocabulary, or the one a GGUF donor carries in its metadata; a chat template, when
    given, is set on the tokenizer before it is saved.
    """
    if tokenizer is None and hasattr(donor, "load_tokenizer"):
        tokenizer = donor.load_tokenizer()
    if tokenizer is None and chat_template is None:
        return copy_support_files(donor.path, out_dir)
    copied = [n for n in copy_support_files(donor.path, out_dir) if n not in TOKENIZER_FILES]
    for name in TOKENIZER_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(donor.path), local_files_only=True)
    if chat_template is not None:
        tokenizer = copy.copy(tokenizer)  # the plan's tokenizer stays as planned
        tokenizer.chat_template = chat_template
    return copied + list(tokenizer.save_pretrained(str(out_dir)))
