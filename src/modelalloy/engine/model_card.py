"""The model card of a merged model (README.md in Hugging Face's format) and the mergekit config beside it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.writer import write_text_durably
from modelalloy.plan import Plan


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
