"""The `alloy` command: parses flags, calls the library, prints. No merge logic lives here.

User errors (`ModelAlloyError`) become one line on stderr and exit code 2; a traceback means a
bug of ours (or `--debug`).
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from modelalloy.errors import ModelAlloyError
from modelalloy.execute import MergeOptions

app = typer.Typer(
    name="alloy",
    help="Merge the weights of trained language models (mergekit-compatible configs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


def _help(field: str) -> str:
    return MergeOptions.model_fields[field].description or ""


_DEFAULTS = MergeOptions()


class _State:
    debug = False


def _fail(e: Exception) -> None:
    if _State.debug:
        raise e
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _show_warnings(caught: list[warnings.WarningMessage], quiet: bool) -> None:
    if quiet:
        return
    for w in caught:
        err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")] = False) -> None:
    _State.debug = debug
    from modelalloy.execute import keep_freed_buffers

    keep_freed_buffers()
    # The hundreds of thousands of objects torch's import made live as long as the process: out
    # of the collector's way, its full passes stop walking them during a merge (1.1B linear merge:
    # 0.4 s of 4.8 s).
    gc.freeze()


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="merge config (mergekit YAML)")],
    out_dir: Annotated[Path, typer.Argument(help="output directory (a Hugging Face model)")],
    max_shard_size: Annotated[str, typer.Option(help=_help("max_shard_size"))] = _DEFAULTS.max_shard_size,
    device: Annotated[str, typer.Option(help=_help("device"))] = _DEFAULTS.device,
    threads: Annotated[int, typer.Option("--threads", "-j", help=_help("threads"))] = _DEFAULTS.threads,
    force: Annotated[bool, typer.Option("--force", help=_help("force"))] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=_help("allow_pickle"))] = False,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes", help=_help("allow_crimes"))] = False,
    write_model_card: Annotated[bool, typer.Option(help=_help("write_model_card"))] = True,
    copy_tokenizer: Annotated[bool, typer.Option(help=_help("copy_tokenizer"))] = True,
    hash_inputs: Annotated[bool, typer.Option(help=_help("hash_inputs"))] = True,
    out_format: Annotated[str, typer.Option(help=_help("out_format"))] = _DEFAULTS.out_format,
    out_type: Annotated[str, typer.Option(help=_help("out_type"))] = _DEFAULTS.out_type,
    vocab_report: Annotated[bool, typer.Option(help="print the vocabulary report when tokenizers are aligned")] = True,
    resume: Annotated[bool, typer.Option(help=_help("resume"))] = True,
    backend: Annotated[str, typer.Option(help=_help("backend"))] = _DEFAULTS.backend,
    ray_address: Annotated[Optional[str], typer.Option(help=_help("ray_address"))] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary on stdout")] = False,
) -> None:
    """Merge the models in CONFIG into OUT_DIR."""
    from modelalloy.api import merge as run_merge

    try:
        options = MergeOptions(
            max_shard_size=max_shard_size,
            device=device,
            threads=threads,
            force=force,
            allow_pickle=allow_pickle,
            allow_crimes=allow_crimes,
            write_model_card=write_model_card,
            copy_tokenizer=copy_tokenizer,
            hash_inputs=hash_inputs,
            out_format=out_format,
            out_type=out_type,
            resume=resume,
            backend=backend,
            ray_address=ray_address,
        )
    except ValueError as e:  # pydantic's ValidationError: name the flag, not the docs URL
        errors = getattr(e, "errors", lambda: [])()
        if errors:
            _fail(ModelAlloyError(f"--{str(errors[0]['loc'][0]).replace('_', '-')}: {errors[0]['msg']}"))
        _fail(ModelAlloyError(str(e).splitlines()[-1]))
    bar = Progress(
        TextColumn("[bold]merging"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} tensors"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
        transient=False,
    )
    task = bar.add_task("merge", total=None, rate="")

    def on_progress(p) -> None:
        if not bar.live.is_started:  # shown once planning has passed, so an input error stays one line
            bar.start()
        rate = p.bytes_written / p.elapsed / 1e9 if p.elapsed > 0 else 0.0
        bar.update(task, completed=p.done, total=p.total, rate=f"{rate:.2f} GB/s")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as cleanly as Ctrl-C
        try:
            try:
                result = run_merge(config, out_dir, options=options, progress=on_progress)
            finally:
                if bar.live.is_started:
                    bar.stop()
        except ModelAlloyError as e:
            _show_warnings(caught, quiet)
            _fail(e)
        except KeyboardInterrupt:
            _show_warnings(caught, quiet)
            partial = out_dir.with_name(out_dir.name + ".partial")
            err.print(
                f"interrupted: {out_dir} was not written; the finished shards are kept in {partial}, "
                "run the same command again to resume from them",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)
    _show_warnings(caught, quiet)
    report_file = result.out_dir / "vocab_report.json"
    if vocab_report and not quiet and not as_json and report_file.exists():
        from modelalloy.vocab_report import format_report

        err.print(format_report(json.loads(report_file.read_text())), highlight=False, markup=False)
    if as_json:
        out.print_json(json.dumps(result.summary()))
    elif not quiet:
        if result.shards_reused:
            err.print(f"resumed: {result.shards_reused} finished shard(s) of an interrupted run were verified and reused", highlight=False)
        err.print(
            f"wrote {result.tensors} tensors, {result.bytes_written / 1e9:.3f} GB in {result.seconds:.1f}s "
            f"to {result.out_dir}",
            highlight=False,
        )


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="merge config (mergekit YAML)")],
    out_dir: Annotated[Optional[Path], typer.Argument(help="output directory to check (optional)")] = None,
    threads: Annotated[int, typer.Option("--threads", "-j", help=_help("threads"))] = _DEFAULTS.threads,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=_help("allow_pickle"))] = False,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes", help=_help("allow_crimes"))] = False,
    force: Annotated[bool, typer.Option("--force", help=_help("force"))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan summary as JSON")] = False,
    show_tensors: Annotated[bool, typer.Option("--tensors", help="list every output tensor")] = False,
) -> None:
    """Dry run: every check `merge` makes, with tensor count, peak RAM and output size; writes nothing."""
    from modelalloy.api import plan_merge
    from modelalloy.execute import check_output

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                options = MergeOptions(threads=threads, allow_pickle=allow_pickle, allow_crimes=allow_crimes, force=force)
            except ValueError as e:
                raise ModelAlloyError(str(e).splitlines()[-1]) from None
            the_plan, models = plan_merge(config, options=options)
            if out_dir is not None:
                check_output(out_dir, models, the_plan.output_bytes, force=force)
        except ModelAlloyError as e:
            _show_warnings(caught, False)
            _fail(e)
    _show_warnings(caught, as_json)
    summary = {
        "method": the_plan.method.name,
        "models": list(models),
        "base_model": the_plan.config.base_model,
        "tensors": len(the_plan.recipes),
        "output_bytes": the_plan.output_bytes,
        "input_bytes": the_plan.input_bytes(models),
        "peak_memory_bytes": the_plan.peak_memory_estimate(threads),
        "layers": the_plan.output_config.get("num_hidden_layers", the_plan.output_config.get("n_layer")),
        "notes": the_plan.notes,
    }
    if the_plan.vocab is not None:
        summary["vocabulary"] = the_plan.vocab.report
    if show_tensors:
        summary["recipes"] = [
            {"name": r.name, "method": r.method, "inputs": [f"{s.model}:{s.tensor}" for s in r.sources()], "shape": list(r.shape), "dtype": str(r.out_dtype).removeprefix("torch."), "params": r.params}
            for r in the_plan.recipes
        ]
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    table = Table(title=f"plan: {config}", show_header=False)
    table.add_row("method", summary["method"])
    table.add_row("models", "\n".join(summary["models"]))
    table.add_row("output tensors", str(summary["tensors"]))
    table.add_row("layers", str(summary["layers"]))
    table.add_row("reads", f"{summary['input_bytes'] / 1e9:.3f} GB")
    table.add_row("writes", f"{summary['output_bytes'] / 1e9:.3f} GB")
    table.add_row("est. peak RAM", f"{summary['peak_memory_bytes'] / 1e9:.2f} GB (threads={threads})")
    out.print(table)
    if the_plan.vocab is not None:
        from modelalloy.vocab_report import format_report

        out.print(format_report(the_plan.vocab.report), highlight=False, markup=False)
    if show_tensors:
        for r in summary["recipes"]:
            out.print(f"{r['name']}  {r['method']}  {r['shape']}  {r['dtype']}  <- {', '.join(r['inputs'])}", highlight=False)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="checkpoint directory: a merge output or any safetensors HF model")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="the merge config; then every planned tensor must be present")] = None,
    read_data: Annotated[bool, typer.Option(help="read every tensor back and check for NaN/Inf")] = True,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=_help("allow_pickle"))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Re-read a checkpoint: index, headers, shard hashes, NaN/Inf, planned tensors. Exit 1 if anything is wrong."""
    from modelalloy.verify import verify_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = verify_checkpoint(path, config=config, read_data=read_data, allow_pickle=allow_pickle)
        except ModelAlloyError as e:
            _fail(e)
    _show_warnings(caught, as_json)
    if as_json:
        out.print_json(json.dumps(report.summary()))
    else:
        for problem in report.problems:
            err.print(f"[bold red]problem:[/] {escape(problem)}", highlight=False, soft_wrap=True)
        checks = f"{report.tensors} tensors in {len(report.files)} file(s), {report.hashes_checked} shard hash(es) matched"
        if config is not None:
            checks += f", {report.planned_checked} planned tensors present"
        err.print(("ok: " if report.ok else f"{len(report.problems)} problem(s); checked ") + checks, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def methods(name: Annotated[Optional[str], typer.Argument(help="show one method in full")] = None) -> None:
    """List the merge methods (or show one): parameters, defaults, base-model rule, reference."""
    from modelalloy.methods import REGISTRY, REQUIRED

    try:
        chosen = [REGISTRY.get(name)] if name else list(REGISTRY)
    except ModelAlloyError as e:
        _fail(e)
    if not name:
        table = Table(title="merge methods")
        for col in ("method", "base", "models", "parameters (default)", "what it does", "reference"):
            table.add_column(col, overflow="fold")
        for m in chosen:
            count = f"{m.min_models}" + ("+" if m.max_models is None else "" if m.max_models == m.min_models else f"-{m.max_models}")
            params = ", ".join(p.name + ("*" if p.required else f"={p.default!r}") for p in m.params)
            table.add_row(m.name + (" †" if m.vs_mergekit else ""), m.base, count, params, m.doc, m.reference)
        out.print(table)
        out.print("* required.  † differs from mergekit.  `alloy methods NAME` shows one method in full, with how it differs.")
        return
    m = chosen[0]
    out.print(f"[bold]{m.name}[/]: {m.doc}")
    out.print(f"base model: {m.base}; models besides the base: {m.min_models}" + ("" if m.max_models == m.min_models else f" to {m.max_models or 'any'}"))
    if m.randomized:
        out.print("random: seeded per output tensor from random_seed, so reruns are bit-identical")
    if m.reference:
        out.print(f"reference: {m.reference}")
    if m.stats:
        out.print(f"reads per-model {m.stats} statistics: give each model `stats: FILE`, made by `alloy stats MODEL --data TEXT FILE`")
    table = Table()
    for col in ("parameter", "scope", "default", "meaning"):
        table.add_column(col)
    for p in m.params:
        default = "required" if p.default is REQUIRED else repr(p.default)
        meaning = p.doc + (f" (one of {', '.join(map(repr, p.choices))})" if p.choices else "")
        table.add_row(p.name, "per-model" if p.per_model else "global", default, meaning)
    out.print(table)
    if m.vs_mergekit:
        out.print(f"differs from mergekit: {m.vs_mergekit}")


@app.command()
def moe(
    config: Annotated[Path, typer.Argument(help="MoE config (mergekit-moe YAML)")],
    out_dir: Annotated[Path, typer.Argument(help="output directory (a Hugging Face model)")],
    i_understand: Annotated[bool, typer.Option("--i-understand-this-is-not-useful-without-training", help="allow every expert to be the same model")] = False,
    layout: Annotated[Optional[str], typer.Option(help="expert tensor layout: fused (transformers 5) or per_expert; default: what the installed transformers expects")] = None,
    max_shard_size: Annotated[str, typer.Option(help=_help("max_shard_size"))] = _DEFAULTS.max_shard_size,
    force: Annotated[bool, typer.Option("--force", help=_help("force"))] = False,
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
            _show_warnings([w for w in caught if issubclass(w.category, UserWarning)], False)
            _fail(e)
    _show_warnings([w for w in caught if issubclass(w.category, UserWarning)], False)
    err.print(f"wrote {result.architecture} ({result.layout} experts), {result.tensors} tensors in {result.seconds:.1f}s to {result.out_dir}", highlight=False)


@app.command("stack")
def stack_cmd(
    config: Annotated[Path, typer.Argument(help="stack config (YAML: model + layer_ranges | depth_upscale | progressive | interleave)")],
    out_dir: Annotated[Optional[Path], typer.Argument(help="output directory (omit with --show)")] = None,
    show: Annotated[bool, typer.Option("--show", help="print the compiled passthrough merge config (mergekit YAML) and stop")] = False,
    force: Annotated[bool, typer.Option("--force", help=_help("force"))] = False,
    threads: Annotated[int, typer.Option("--threads", "-j", help=_help("threads"))] = _DEFAULTS.threads,
) -> None:
    """Depth up-scaling / progressive stacking of one model, as passthrough slices."""
    import yaml

    from modelalloy.compose.stack import compiled_stack, stack

    try:
        if show:
            out.print(yaml.safe_dump(compiled_stack(config).model_dump(exclude_defaults=True), sort_keys=False), highlight=False, end="")
            return
        if out_dir is None:
            raise ModelAlloyError("give an output directory (or --show to print the compiled config)")
        result = stack(config, out_dir, force=force, threads=threads)
    except ModelAlloyError as e:
        _fail(e)
    err.print(f"wrote {result.tensors} tensors to {result.out_dir}", highlight=False)


@app.command("graft")
def graft_cmd(
    recipient: Annotated[str, typer.Argument(help="the model that receives modules")],
    donor: Annotated[str, typer.Argument(help="the model the modules come from")],
    out_dir: Annotated[Path, typer.Argument(help="output directory")],
    module: Annotated[list[str], typer.Option("--module", "-m", help="name fragment selecting tensors to graft (repeatable), e.g. mlp")],
    layers: Annotated[Optional[str], typer.Option(help="only layers START-END (END excluded), e.g. 10-20")] = None,
    force: Annotated[bool, typer.Option("--force", help=_help("force"))] = False,
    threads: Annotated[int, typer.Option("--threads", "-j", help=_help("threads"))] = _DEFAULTS.threads,
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
        _fail(e)
    err.print(f"wrote {result.tensors} tensors to {result.out_dir}", highlight=False)


lora_app = typer.Typer(help="LoRA adapters: fold into a model, combine, extract.", no_args_is_help=True)
app.add_typer(lora_app, name="lora")


def _adapter_report(result, as_json: bool) -> None:
    rows = [{"module": r.module, "rank": r.rank, "energy_kept": r.energy_kept, "relative_error": r.relative_error} for r in result.modules]
    if as_json:
        out.print_json(json.dumps({"out_dir": str(result.out_dir), "modules": rows, "saved_modules": result.saved_modules, "notes": result.notes}))
        return
    table = Table(title=f"adapter written to {result.out_dir}")
    for col in ("module", "rank", "energy kept", "rel. error"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["module"], str(r["rank"]), f"{r['energy_kept']:.4f}", f"{r['relative_error']:.2e}")
    out.print(table)
    if result.saved_modules:
        err.print(f"saved whole (modules_to_save): {', '.join(result.saved_modules)}", highlight=False, soft_wrap=True)
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


@lora_app.command("apply")
def lora_apply(
    base: Annotated[str, typer.Argument(help="base model directory")],
    adapter: Annotated[str, typer.Argument(help="PEFT LoRA adapter directory")],
    out_dir: Annotated[Path, typer.Argument(help="output model directory")],
    force: Annotated[bool, typer.Option("--force", help=_help("force"))] = False,
    threads: Annotated[int, typer.Option("--threads", "-j", help=_help("threads"))] = _DEFAULTS.threads,
) -> None:
    """Fold ADAPTER into BASE's weights (W + scale·B·A), streaming, into OUT_DIR."""
    from modelalloy.compose.lora import apply_adapter

    try:
        result = apply_adapter(base, adapter, out_dir, force=force, threads=threads)
    except ModelAlloyError as e:
        _fail(e)
    err.print(f"wrote {result.tensors} tensors to {result.out_dir}", highlight=False)


@lora_app.command("combine")
def lora_combine(
    paths: Annotated[list[str], typer.Argument(help="adapters to combine, then the output directory last")],
    method: Annotated[str, typer.Option(help="cat (exact), linear, svd, ties or dare_ties")] = "cat",
    weights: Annotated[Optional[str], typer.Option(help="comma-separated weight per adapter (default 1 each)")] = None,
    rank: Annotated[Optional[int], typer.Option(help="rank of the result for svd/ties/dare_ties (default: the largest input rank)")] = None,
    density: Annotated[float, typer.Option(help="density for ties/dare_ties")] = 1.0,
    seed: Annotated[int, typer.Option(help="random seed for dare_ties")] = 0,
    force: Annotated[bool, typer.Option("--force", help=_help("force"))] = False,
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
        _fail(e)
    _adapter_report(result, as_json)


@lora_app.command("extract")
def lora_extract(
    base: Annotated[str, typer.Argument(help="base model directory")],
    finetune: Annotated[str, typer.Argument(help="fine-tuned model directory")],
    out_dir: Annotated[Path, typer.Argument(help="output adapter directory")],
    rank: Annotated[Optional[int], typer.Option(help="rank of every module")] = None,
    energy: Annotated[Optional[float], typer.Option(help="keep this fraction of each delta's energy (sum of squared singular values)")] = None,
    save_modules: Annotated[bool, typer.Option(help="save other changed tensors (norms, embeddings) whole as modules_to_save")] = True,
    force: Annotated[bool, typer.Option("--force", help=_help("force"))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the per-module report as JSON")] = False,
) -> None:
    """Extract a LoRA adapter from FINETUNE − BASE by truncated SVD, reporting the energy kept."""
    from modelalloy.compose.lora import extract_adapter

    try:
        result = extract_adapter(base, finetune, out_dir, rank=rank, energy=energy, save_other_modules=save_modules, force=force)
    except ModelAlloyError as e:
        _fail(e)
    _adapter_report(result, as_json)


@app.command()
def stats(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="model directory (or an id in the local Hugging Face cache)")],
    out_file: Annotated[Path, typer.Argument(metavar="OUT", help="statistics file to write (.safetensors)")],
    data: Annotated[Path, typer.Option("--data", help="text file (one sample per line) or JSON lines with text or input_ids")],
    kinds: Annotated[str, typer.Option(help="statistics to compute: fisher, gram or both (comma-separated)")] = "fisher,gram",
    samples: Annotated[int, typer.Option(help="samples to use at most")] = 256,
    max_length: Annotated[int, typer.Option(help="tokens per sample at most (longer ones are truncated)")] = 512,
    device: Annotated[str, typer.Option(help="where the model runs: cpu, cuda or auto")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="replace an existing OUT")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary on stdout")] = False,
) -> None:
    """Compute a model's data statistics (Fisher diagonals, linear-layer Gram matrices) for fisher and regmean merges."""
    from modelalloy.stats import compute_stats

    bar = Progress(TextColumn("[bold]statistics"), BarColumn(), TextColumn("{task.completed}/{task.total} samples"), TimeElapsedColumn(), console=err, disable=quiet)
    task = bar.add_task("stats", total=samples)
    try:
        with bar:
            result = compute_stats(
                model,
                data,
                out_file,
                kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
                max_samples=samples,
                max_length=max_length,
                device=device,
                force=force,
                progress=lambda p: bar.update(task, completed=p.samples),
            )
            bar.update(task, total=result.samples)  # the data may hold fewer samples than asked for
    except ModelAlloyError as e:
        _fail(e)
    if as_json:
        out.print_json(json.dumps(result.summary()))
    elif not quiet:
        err.print(
            f"wrote {result.fisher} Fisher diagonals and {result.gram} Gram matrices from {result.samples} samples "
            f"({result.tokens} tokens) to {result.path}",
            highlight=False,
        )


# --- measuring: eval, rate, analyze, report, demo (modelalloy.evaluate / analyze / report) ---------


def _eval_progress(label: str = "scoring"):
    """A rich progress bar and the callback the evaluate library reports to."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=err, transient=False)
    tasks: dict[str, int] = {}

    def on_progress(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total)
        bar.update(tasks[name], completed=done, total=total)

    return bar, on_progress


def _fmt(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def print_scores(table: dict[str, dict[str, float]], sets, title: str = "scores") -> None:
    t = Table(title=title)
    t.add_column("model")
    for s in sets:
        t.add_column(f"{s.name}\n{'ppl ↓' if s.metric == 'perplexity' else 'acc ↑' if s.metric == 'accuracy' else 'score ↑'}" + (f"\n(expert: {s.expert})" if s.expert else "\n(control)"), justify="right")
    for model, row in table.items():
        t.add_row(model, *(_fmt(row[s.name], 2 if s.metric == "perplexity" else 3) for s in sets))
    out.print(t)


def print_rates(result) -> None:
    print_scores(result.evaluation.table(), result.evaluation.sets, title=f"per-set scores (base: {result.base})")
    t = Table(title="merge rate, best first (NAI: share of each expert's gain over the base the merge kept)")
    for col in ("rank", "merge", "mean NAI", "norm. score", "gain vs best parent", "forgetting (control)", "P[merged > base]"):
        t.add_column(col, justify="right" if col not in ("merge",) else "left")
    expert_sets = [s for s in result.evaluation.sets if s.expert]
    for s in expert_sets:
        t.add_column(f"NAI {s.name}", justify="right")
    for i, r in enumerate(result.rates, 1):
        by = {x.set: x for x in r.sets}
        pct = lambda v: "—" if v is None else f"{100 * v:+.1f}%"  # noqa: E731
        t.add_row(str(i), r.model, _fmt(r.mean_nai), _fmt(r.mean_normalized_score), pct(r.mean_gain_over_best), pct(r.mean_forgetting), f"{r.p_beats_base:.2f}", *(_fmt(by[s.name].nai) for s in expert_sets))
    out.print(t)
    for r in result.rates[:1]:
        for note in r.notes:
            err.print(f"[yellow]note:[/] {note}", highlight=False)


def _save_outputs(payload: dict, save: Optional[Path], report: Optional[Path], as_json: bool) -> None:
    if save is not None:
        save.write_text(json.dumps(payload, indent=1, default=str))
    if report is not None:
        from modelalloy.report import write_report

        write_report([payload], report)
        err.print(f"report: {report}", highlight=False)
    if as_json:
        out.print_json(json.dumps(payload, default=str))


_SaveOpt = Annotated[Optional[Path], typer.Option("--save", help="write the results as JSON (for `alloy report`)")]
_ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="write a self-contained HTML report")]
_JsonOpt = Annotated[bool, typer.Option("--json", help="print the results as JSON")]


@app.command(name="eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="model directories, or merge configs (.yaml, merged in memory)")],
    evals: Annotated[Path, typer.Option("--eval", "-e", help="evals YAML: the sets to score on")],
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer directory (default: each model's own)")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="JSON score cache: unchanged models and sets are not rescored")] = None,
    save: _SaveOpt = None,
    report: _ReportOpt = None,
    as_json: _JsonOpt = False,
) -> None:
    """Score models on eval sets: perplexity on text, accuracy on multiple choice."""
    from modelalloy.evaluate import evaluate, load_evals

    bar, on_progress = _eval_progress()
    try:
        sets = load_evals(evals)
        with bar:
            result = evaluate(models, sets, tokenizer=tokenizer, cache=cache, progress=on_progress)
    except ModelAlloyError as e:
        _fail(e)
    if not as_json:
        print_scores(result.table(), sets)
    _save_outputs(result.to_json(), save, report, as_json)


@app.command()
def rate(
    config: Annotated[Path, typer.Argument(help="merge config (mergekit YAML) with base_model")],
    evals: Annotated[Path, typer.Option("--eval", "-e", help="evals YAML; `expert:` marks each parent's own set")],
    methods: Annotated[Optional[str], typer.Option(help="comma-separated methods to run on the same parents and rank, e.g. linear,ties,dare_ties")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer directory (default: the base's)")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="JSON score cache: unchanged models and sets are not rescored")] = None,
    save: _SaveOpt = None,
    report: _ReportOpt = None,
    as_json: _JsonOpt = False,
) -> None:
    """The merge-rate table: base vs each parent vs the merge (or one merge per method), per set."""
    from modelalloy.evaluate import load_evals, rate as run_rate

    bar, on_progress = _eval_progress()
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sets = load_evals(evals)
            with bar:
                result = run_rate(config, sets, methods=method_list, tokenizer=tokenizer, cache=cache, progress=on_progress)
        except ModelAlloyError as e:
            _fail(e)
    _show_warnings(caught, as_json)
    if not as_json:
        print_rates(result)
    _save_outputs(result.to_json(), save, report, as_json)


@app.command()
def analyze(
    base: Annotated[str, typer.Argument(help="the base model directory")],
    models: Annotated[list[str], typer.Argument(help="fine-tuned model directories (same layout as the base)")],
    top_k: Annotated[int, typer.Option(help="singular vectors compared for the subspace overlap of 2-D tensors")] = 8,
    layers: Annotated[bool, typer.Option("--layers", help="print the per-layer table too")] = False,
    save: _SaveOpt = None,
    report: _ReportOpt = None,
    as_json: _JsonOpt = False,
) -> None:
    """Weight diagnostics, no evaluation: task-vector norms, cosine, sign conflicts, concentration."""
    from modelalloy.analyze import analyze as run_analyze

    bar = Progress(TextColumn("[bold]analyzing"), BarColumn(), TextColumn("{task.completed}/{task.total} tensors"), TimeElapsedColumn(), console=err, disable=as_json)
    task = bar.add_task("analyze", total=None)
    try:
        with bar:
            result = run_analyze(base, models, top_k=top_k, progress=lambda d, t: bar.update(task, completed=d, total=t))
    except ModelAlloyError as e:
        _fail(e)
    payload = result.to_json()
    if not as_json:
        o = result.overall
        t = Table(title=f"task vectors against {base}")
        for col in ("model", "‖δ‖", "‖δ‖/‖base‖", "top 1 %", "top 10 %", "top 20 %"):
            t.add_column(col, justify="right" if col != "model" else "left")
        for n in result.models:
            c = o["concentration"][n] or {}
            t.add_row(n, _fmt(o["norm"][n], 4), _fmt(o["relative_norm"][n], 4), _fmt(c.get("top1%")), _fmt(c.get("top10%")), _fmt(c.get("top20%")))
        out.print(t)
        if len(result.models) >= 2:
            t = Table(title="agreement between task vectors")
            for col in ("pair", "cosine", "subspace overlap"):
                t.add_column(col, justify="right" if col != "pair" else "left")
            for p, v in o["cosine"].items():
                t.add_row(p, _fmt(v), _fmt(o["subspace_overlap"].get(p)))
            out.print(t)
            out.print(f"sign-conflict rate (entries where two or more task vectors are nonzero): {_fmt(o['sign_conflict'])}")
        if layers:
            t = Table(title="per layer")
            for col in ["layer", *(f"‖δ‖ {n}" for n in result.models), *o["cosine"], "sign conflict"]:
                t.add_column(col, justify="right")
            for r in result.layers:
                t.add_row(str(r["layer"]), *(_fmt(r["norm"][n], 4) for n in result.models), *(_fmt(r["cosine"][p]) for p in o["cosine"]), _fmt(r["sign_conflict"]))
            out.print(t)
    _save_outputs(payload, save, report, as_json)


@app.command(name="report")
def report_(
    results: Annotated[list[Path], typer.Argument(help="JSON results saved by eval/rate/analyze/demo with --save")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="the HTML file to write")] = Path("report.html"),
    title: Annotated[str, typer.Option(help="the report's title")] = "modelalloy report",
) -> None:
    """One self-contained HTML report (tables, embedded PNG plots) from saved results."""
    from modelalloy.report import write_report

    payloads = []
    for path in results:
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            _fail(ModelAlloyError(f"{path}: results file not found"))
        except (OSError, ValueError) as e:
            _fail(ModelAlloyError(f"{path}: not a JSON results file ({str(e).splitlines()[0]})"))
        if not isinstance(payload, dict) or payload.get("kind") not in ("eval", "rate", "analyze", "demo"):
            _fail(ModelAlloyError(f"{path}: not a modelalloy results file (save one with --save on eval, rate, analyze or demo)"))
        payloads.append(payload)
    write_report(payloads, out_file, title=title)
    err.print(f"report: {out_file}", highlight=False)


@app.command()
def demo(
    cache: Annotated[Path, typer.Option(help="where the base, the specialists and the scores are kept")] = Path(".cache/demo"),
    methods: Annotated[str, typer.Option(help="merge methods to compare")] = "linear,task_arithmetic,ties,dare_ties,dare_linear,della",
    domains: Annotated[str, typer.Option(help="specialist domains: shakespeare, german, code (news is always the held-out control)")] = "shakespeare,german",
    report: Annotated[Optional[Path], typer.Option("--report", help="HTML report (default: CACHE/report.html)")] = None,
    save: _SaveOpt = None,
    as_json: _JsonOpt = False,
) -> None:
    """A real study: SmolLM2-135M fine-tuned into specialists on CPU, merged every way, rated.

    The first run converts the base and fine-tunes the specialists (minutes); later runs reuse them.
    """
    import time as _time

    from modelalloy.apps.demo import DemoSettings, run_demo

    start = _time.perf_counter()
    bar, on_progress = _eval_progress()
    settings = DemoSettings(domains=tuple(d.strip() for d in domains.split(",") if d.strip()))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")  # transformers' GGUF and tokenizer notices are not the user's concern here
        try:
            with bar:
                result = run_demo(cache, settings=settings, methods=tuple(m.strip() for m in methods.split(",") if m.strip()), progress=on_progress)
        except ModelAlloyError as e:
            _fail(e)
    payload = result.to_json()
    payload["timings"]["total"] = _time.perf_counter() - start
    if not as_json:
        t = Table(title="each specialist on held-out text of its own domain (perplexity, lower is better)")
        for col in ("specialist", "domain", "base", "specialist ", "change", "better?"):
            t.add_column(col, justify="right" if col not in ("specialist", "domain") else "left")
        for s in result.specialists:
            t.add_row(s["name"], s["set"], f"{s['base']:.2f}", f"{s['specialist']:.2f}", f"{100 * (s['specialist'] / s['base'] - 1):+.1f}%", "yes" if s["better"] else "[red]NO[/]")
        out.print(t)
        print_rates(result.rate)
        out.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in payload["timings"].items()), highlight=False)
    for s in result.specialists:
        if not s["better"]:
            err.print(f"[yellow]warning:[/] the {s['name']} specialist is not measurably better than the base on {s['set']}", highlight=False)
    _save_outputs(payload, save, report or cache / "report.html", as_json)


@app.command("demo-search")
def demo_search(
    cache: Annotated[Path, typer.Option(help="alloy demo's cache: the base and the specialists (built there if missing)")] = Path(".cache/demo"),
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="search output (default: CACHE/search)")] = None,
    method: Annotated[str, typer.Option(help="searched method: ties or dare_ties")] = "dare_ties",
    trials: Annotated[int, typer.Option(help="search trials")] = 40,
    sampler: Annotated[str, typer.Option(help="tpe, cmaes or random")] = "tpe",
    layer_groups: Annotated[int, typer.Option(help="depth anchors per parameter")] = 4,
    tokens: Annotated[int, typer.Option(help="tokens scored per domain, search and held-out")] = 256,
    resume: Annotated[bool, typer.Option("--resume", help="continue the search in OUT")] = False,
    force: Annotated[bool, typer.Option("--force", help="delete OUT and start over")] = False,
    as_json: _JsonOpt = False,
) -> None:
    """Search TIES/DARE-TIES weights and densities on the demo's specialists; compare on held-out text."""
    from modelalloy.apps.demo_search import DemoSearchSettings, run_demo_search

    settings = DemoSearchSettings(method=method, trials=trials, sampler=sampler, layer_groups=layer_groups, search_tokens=tokens, heldout_tokens=tokens)

    def line(r) -> None:
        value = "failed: " + r.error if r.error else ", ".join(f"{v:.4g}" for v in r.values)
        best = ", ".join(f"{v:.4g}" for v in r.best) if r.best else "-"
        eta = f"{r.eta:.0f}s" if r.eta is not None else "?"
        err.print(f"trial {r.number:>3} [{r.done}/{r.total}] {value}  best {best}  ETA {eta}", highlight=False, soft_wrap=True)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        try:
            result = run_demo_search(cache, out_dir, settings=settings, resume=resume, force=force, trial_progress=line,
                                     progress=lambda what, d, t: err.print(f"{what} [{d}/{t}]", highlight=False))
        except ModelAlloyError as e:
            _fail(e)
    if as_json:
        out.print_json(json.dumps(result.to_json()))
        return
    sets = list(next(iter(result.table.values())))
    t = Table(title=f"held-out perplexity (lower is better); searched = best of {result.trials} {method} trials")
    for col in ("model", *[s.removeprefix("heldout_") for s in sets], "mean log-ppl", "mean NAI", "forgetting"):
        t.add_column(col, justify="left" if col == "model" else "right")
    rows = {r["model"]: r for r in result.rows}
    for model, scores in result.table.items():
        r = rows.get(model, {})
        t.add_row(model, *[_fmt(scores[s], 2) for s in sets], _fmt(r.get("mean_log_ppl"), 4), _fmt(r.get("mean_nai")), _fmt(r.get("forgetting")))
    out.print(t)
    verdict = "beats" if result.searched_beats_fixed else "does NOT beat"
    out.print(f"the searched best {verdict} the best fixed method ({result.best_fixed}) on held-out mean log-perplexity; "
              + ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items()), highlight=False)


@app.command()
def search(
    spec_file: Annotated[Path, typer.Argument(help="search space and objective (SEARCH.yaml)")],
    out_dir: Annotated[Path, typer.Argument(help="output directory: study.db, best.yaml, trials, plots")],
    resume: Annotated[bool, typer.Option("--resume", help="continue the search stored in OUT_DIR/study.db")] = False,
    force: Annotated[bool, typer.Option("--force", help="delete OUT_DIR and start over")] = False,
    trials: Annotated[Optional[int], typer.Option("--trials", help="complete trials wanted (overrides the file)")] = None,
    use_ray: Annotated[bool, typer.Option("--ray", help="run trials in parallel as Ray actors (a local Ray instance)")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="join an existing Ray cluster")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="optuna storage URL (default: sqlite in OUT_DIR)")] = None,
    device: Annotated[str, typer.Option(help=_help("device"))] = _DEFAULTS.device,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-trial lines")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Search merge parameters against an evaluation (optuna; resumable; optionally on Ray)."""
    from modelalloy.search import load_spec, run_search

    def line(r) -> None:
        if quiet:
            return
        value = "failed: " + r.error if r.error else ", ".join(f"{v:.4g}" for v in r.values)
        best = ", ".join(f"{v:.4g}" for v in r.best) if r.best else "-"
        eta = f"{r.eta:.0f}s" if r.eta is not None else "?"
        err.print(f"trial {r.number:>3} [{r.done}/{r.total}] {value}  best {best}  ETA {eta}", highlight=False, soft_wrap=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            spec = load_spec(spec_file)
            if trials is not None:
                spec = spec.model_copy(update={"trials": trials})
            result = run_search(spec, out_dir, resume=resume, force=force, ray=use_ray, ray_address=ray_address, storage=storage, device=device, progress=line)
        except ModelAlloyError as e:
            _fail(e)
    _show_warnings([w for w in caught if issubclass(w.category, UserWarning) and "modelalloy" in str(w.filename)], quiet)
    summary = json.loads((result.out_dir / "summary.json").read_text())
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        err.print(f"{result.trials} trials; best {', '.join(f'{v:.4g}' for v in result.best_values)} (trial {summary['best_trial']}); wrote {result.out_dir / 'best.yaml'}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; nothing was renamed into place (the partial output is in OUT.partial/)")
        sys.exit(130)


if __name__ == "__main__":
    main()
