"""Everything in an output directory besides the weights and the model card: tokenizer and generation files."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from modelalloy.errors import CheckpointError
from modelalloy.io.files import read_regular

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


_JSON_FILES = frozenset(n for n in SUPPORT_FILES if n.endswith(".json"))
_TEXT_FILES = frozenset({"merges.txt", "vocab.txt", "chat_template.jinja"})


def check_support_files(donor: Path) -> None:
    """Refuse, by name, a support file of the donor that would be copied broken: the merged model
    could not load its tokenizer, and nothing would say so until someone tried. Every JSON file
    must parse, tokenizer.json must load in the `tokenizers` library, text files must be UTF-8;
    tokenizer.model (SentencePiece's binary) is copied as it is."""
    for name in SUPPORT_FILES:
        path = donor / name
        if not path.exists():
            continue
        fix = "fix or remove it in the donor model, or pass --no-copy-tokenizer (the output then has no tokenizer files)"
        data = read_regular(path, limit=MAX_SUPPORT_BYTES)
        try:
            if name in _JSON_FILES or name in _TEXT_FILES:
                text = data.decode("utf-8")
            if name in _JSON_FILES:
                json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: would be copied into the output but is not valid {'JSON' if name in _JSON_FILES else 'UTF-8 text'} ({str(e).splitlines()[0]}); {fix}") from None
        if name == "tokenizer.json":
            try:
                from tokenizers import Tokenizer
            except ImportError:  # without the library, parsing as JSON is what we can do
                continue
            try:
                Tokenizer.from_str(text)
            except Exception as e:  # noqa: BLE001 the Rust library raises plain Exception for any bad field
                raise CheckpointError(f"{path}: would be copied into the output but the tokenizers library cannot load it ({str(e).splitlines()[0]}); {fix}") from None


def copy_support_files(donor: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in SUPPORT_FILES:
        src = donor / name
        if src.is_file():
            try:
                shutil.copyfile(src, out_dir / name)
            except OSError as e:  # a write error names no file: name the one being written
                raise OSError(e.errno, e.strerror, e.filename or str(out_dir / name)) from None
            copied.append(name)
    return copied


# tokenizer.json of a 250k-token vocabulary is ~35 MB; anything past this is not a tokenizer file.
MAX_SUPPORT_BYTES = 512 * 2**20

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
