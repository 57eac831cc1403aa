"""Everything in an output directory besides the weights: tokenizer and generation files, model card."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from modelalloy.io.writer import write_text_durably

if TYPE_CHECKING:
    from modelalloy.io.checkpoint import Checkpoint
    from modelalloy.plan import Plan

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


def write_model_card(out_dir: Path, plan: Plan, checkpoints: Mapping[str, Checkpoint], input_hashes: dict[str, str]) -> None:
    """README.md in the Hugging Face model-card format: front matter, method, inputs, the config."""
    config = plan.config
    refs = config.all_model_refs()
    base = config.base_model
    front = {
        "base_model": [r for r in refs if not Path(r).exists()] or None,
        "library_name": "transformers",
        "tags": ["merge", "modelalloy", "mergekit"],
    }
    front = {k: v for k, v in front.items() if v}
    method = plan.method
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        "# Merged model",
        "",
        "Made with [modelalloy](https://pypi.org/project/modelalloy/).",
        "",
        "## Method",
        "",
        f"`{method.name}`: {method.doc}" + (f" ([reference]({method.reference}))" if method.reference else ""),
        "",
        "## Inputs",
        "",
        "| model | role | revision | tensor-content BLAKE3 |",
        "|---|---|---|---|",
    ]
    for ref in refs:
        ckpt = checkpoints[ref]
        role = "base" if ref == base else "merged"
        lines.append(f"| `{ref}` | {role} | {ckpt.revision or '-'} | `{input_hashes.get(ref, '-')}` |")
    for m in config.models or []:  # data-aware merges also read each model's statistics file
        if m.stats:
            lines.append(f"| `{m.stats}` | statistics of `{m.model}` | - | `{input_hashes.get(m.stats, '-')}` |")
    lines += [
        "",
        "The content hash is BLAKE3 over the sorted lines `name\\0blake3(tensor bytes)` of every tensor",
        "this merge read from that model, so it does not depend on sharding or file order.",
        "",
        f"Output: {len(plan.recipes)} tensors, {plan.output_bytes / 1e9:.3f} GB.",
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(config.model_dump(exclude_defaults=True), sort_keys=False).strip(),
        "```",
        "",
    ]
    write_text_durably(out_dir / "README.md", "\n".join(lines))
    write_text_durably(out_dir / "mergekit_config.yml", yaml.safe_dump(config.model_dump(exclude_defaults=True), sort_keys=False))
