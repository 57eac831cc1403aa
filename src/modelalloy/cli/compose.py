"""`alloy moe`, `stack`, `graft` and `lora apply|combine|extract`: building models from parts of others."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from modelalloy.cli import common
from modelalloy.cli.common import DEFAULTS, fail, option_help, show_warnings
from modelalloy.errors import ModelAlloyError


def moe(
    config: Annotated[Path, typer.Argument(help="MoE config (mergekit-moe YAML)")],
    out_dir: Annotated[Path, typer.Argument(help="output directory (a Hugging Face model)")],
    i_understand: Annotated[bool, typer.Option("--i-understand-this-is-not-useful-without-training", help="allow every expert to be the same model")] = False,
    layout: Annotated[Optional[str], typer.Option(help="expert tensor layout: fused (transformers 5) or per_expert; default: what the installed transformers expects")] = None,
    max_shard_size: Annotated[str, typer.Option(help=option_help("max_shard_size"))] = DEFAULTS.max_shard_size,
    force: Annotated[bool, typer.Option("--force", help=option_help("force"))] = False,
) -> None:
    """Build a mixture of experts (Mixtral or Qwen2-MoE) from dense models."""
    from modelalloy.compose.moe import build_moe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if layout not in (None, "fused", "per_expert"):
                raise ModelAlloyError(f"--layout {layout!r}: use fused or per_expert")
            result = build_moe(config, out_dir, allow_same_experts=i_understand, layout=layout, force=force, max_shard_size=max_shard_size)
        except ModelAlloyError as e:
            show_warnings([w for w in caught if issubclass(w.category, UserWarning)], False)
            fail(e)
    show_warnings([w for w in caught if issubclass(w.category, UserWarning)], False)
    common.err.print(f"wrote {result.architecture} ({result.layout} experts), {result.tensors} tensors in {result.seconds:.1f}s to {result.out_dir}", highlight=False)


def stack_cmd(
    config: Annotated[Path, typer.Argument(help="stack config (YAML: model + layer_ranges | depth_upscale | progressive | interleave)")],
    out_dir: Annotated[Optional[Path], typer.Argument(help="output directory (omit with --show)")] = None,
    show: Annotated[bool, typer.Option("--show", help="print the compiled passthrough merge config (mergekit YAML) and stop")] = False,
    force: Annotated[bool, typer.Option("--force", help=option_help("force"))] = False,
    threads: Annotated[int, typer.Option("--threads", "-j", help=option_help("threads"))] = DEFAULTS.threads,
) -> None:
    """Depth up-scaling / progressive stacking of one model, as passthrough slices."""
    import yaml

    from modelalloy.compose.stack import compiled_stack, stack

    try:
        if show:
            common.out.print(yaml.safe_dump(compiled_stack(config).model_dump(exclude_defaults=True), sort_keys=False), highlight=False, end="")
            return
        if out_dir is None:
            raise ModelAlloyError("give an output directory (or --show to print the compiled config)")
        result = stack(config, out_dir, force=force, threads=threads)
    except ModelAlloyError as e:
        fail(e)
    common.err.print(f"wrote {result.tensors} tensors to {result.out_dir}", highlight=False)


def graft_cmd(
    recipient: Annotated[str, typer.Argument(help="the model that receives modules")],
    donor: Annotated[str, typer.Argument(help="the model the modules come from")],
    out_dir: Annotated[Path, typer.Argument(help="output directory")],
    module: Annotated[list[str], typer.Option("--module", "-m", help="name fragment selecting tensors to graft (repeatable), e.g. mlp")],
    layers: Annotated[Optional[str], typer.Option(help="only layers START-END (END excluded), e.g. 10-20")] = None,
    force: Annotated[bool, typer.Option("--force", help=option_help("force"))] = False,
    threads: Annotated[int, typer.Option("--threads", "-j", help=option_help("threads"))] = DEFAULTS.threads,
) -> None:
    """Take the selected modules from DONOR into RECIPIENT (shapes must match)."""
    from modelalloy.compose.stack import graft

    try:
        span = None
        if layers is not None:
            try:
                start, end = (int(x) for x in layers.split("-"))
            except ValueError:
                raise ModelAlloyError(f"--layers {layers!r}: write START-END, e.g. 10-20") from None
            span = (start, end)
        result = graft(recipient, donor, out_dir, modules=module, layers=span, force=force, threads=threads)
    except ModelAlloyError as e:
        fail(e)
    common.err.print(f"wrote {result.tensors} tensors to {result.out_dir}", highlight=False)


def _adapter_report(result, as_json: bool) -> None:
    rows = [{"module": r.module, "rank": r.rank, "energy_kept": r.energy_kept, "relative_error": r.relative_error} for r in result.modules]
    if as_json:
        common.out.print_json(json.dumps({"out_dir": str(result.out_dir), "modules": rows, "saved_modules": result.saved_modules, "notes": result.notes}))
        return
    table = Table(title=f"adapter written to {result.out_dir}")
    for col in ("module", "rank", "energy kept", "rel. error"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["module"], str(r["rank"]), f"{r['energy_kept']:.4f}", f"{r['relative_error']:.2e}")
    common.out.print(table)
    if result.saved_modules:
        common.err.print(f"saved whole (modules_to_save): {', '.join(result.saved_modules)}", highlight=False, soft_wrap=True)
    for note in result.notes:
        common.err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


def lora_apply(
    base: Annotated[str, typer.Argument(help="base model directory")],
    adapter: Annotated[str, typer.Argument(help="PEFT LoRA adapter directory")],
    out_dir: Annotated[Path, typer.Argument(help="output model directory")],
    force: Annotated[bool, typer.Option("--force", help=option_help("force"))] = False,
    threads: Annotated[int, typer.Option("--threads", "-j", help=option_help("threads"))] = DEFAULTS.threads,
) -> None:
    """Fold ADAPTER into BASE's weights (W + scale·B·A), streaming, into OUT_DIR."""
    from modelalloy.compose.lora import apply_adapter

    try:
        result = apply_adapter(base, adapter, out_dir, force=force, threads=threads)
    except ModelAlloyError as e:
        fail(e)
    common.err.print(f"wrote {result.tensors} tensors to {result.out_dir}", highlight=False)


def lora_combine(
    paths: Annotated[list[str], typer.Argument(help="adapters to combine, then the output directory last")],
    method: Annotated[str, typer.Option(help="cat (exact), linear, svd, ties or dare_ties")] = "cat",
    weights: Annotated[Optional[str], typer.Option(help="comma-separated weight per adapter (default 1 each)")] = None,
    rank: Annotated[Optional[int], typer.Option(help="rank of the result for svd/ties/dare_ties (default: the largest input rank)")] = None,
    density: Annotated[float, typer.Option(help="density for ties/dare_ties")] = 1.0,
    seed: Annotated[int, typer.Option(help="random seed for dare_ties")] = 0,
    force: Annotated[bool, typer.Option("--force", help=option_help("force"))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the per-module report as JSON")] = False,
) -> None:
    """Combine LoRA adapters in adapter space: ADAPTER... OUT_DIR."""
    from modelalloy.compose.lora import combine_adapters

    try:
        if len(paths) < 2:
            raise ModelAlloyError("give at least one adapter and then the output directory")
        try:
            w = [float(x) for x in weights.split(",")] if weights else None
        except ValueError:
            raise ModelAlloyError(f"--weights {weights!r}: write numbers separated by commas, e.g. 0.5,-0.25") from None
        result = combine_adapters(paths[:-1], Path(paths[-1]), method=method, weights=w, rank=rank, density=density, seed=seed, force=force)
    except ModelAlloyError as e:
        fail(e)
    _adapter_report(result, as_json)


def lora_extract(
    base: Annotated[str, typer.Argument(help="base model directory")],
    finetune: Annotated[str, typer.Argument(help="fine-tuned model directory")],
    out_dir: Annotated[Path, typer.Argument(help="output adapter directory")],
    rank: Annotated[Optional[int], typer.Option(help="rank of every module")] = None,
    energy: Annotated[Optional[float], typer.Option(help="keep this fraction of each delta's energy (sum of squared singular values)")] = None,
    save_modules: Annotated[bool, typer.Option(help="save other changed tensors (norms, embeddings) whole as modules_to_save")] = True,
    force: Annotated[bool, typer.Option("--force", help=option_help("force"))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the per-module report as JSON")] = False,
) -> None:
    """Extract a LoRA adapter from FINETUNE − BASE by truncated SVD, reporting the energy kept."""
    from modelalloy.compose.lora import extract_adapter

    try:
        result = extract_adapter(base, finetune, out_dir, rank=rank, energy=energy, save_other_modules=save_modules, force=force)
    except ModelAlloyError as e:
        fail(e)
    _adapter_report(result, as_json)
