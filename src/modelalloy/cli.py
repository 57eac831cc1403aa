"""The `alloy` command: parses flags, calls the library, prints. No merge logic lives here.

User errors (`ModelAlloyError`) become one line on stderr and exit code 2; a traceback means a
bug of ours (or `--debug`).
"""

from __future__ import annotations

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


def _option_error(e: ValueError) -> ModelAlloyError:
    """One line from pydantic's validation error: the flag, the value given and what is wrong."""
    problems = e.errors() if callable(getattr(e, "errors", None)) else []
    if not problems or not problems[0].get("loc"):
        return ModelAlloyError(str(e).splitlines()[0])
    first = problems[0]
    flag = "--" + str(first["loc"][0]).replace("_", "-")
    return ModelAlloyError(f"{flag} {first.get('input')!r}: {first['msg']}")


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
            resume=resume,
            backend=backend,
            ray_address=ray_address,
        )
    except ValueError as e:
        _fail(_option_error(e))
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
                raise _option_error(e) from None
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; nothing was renamed into place (the partial output is in OUT.partial/)")
        sys.exit(130)


if __name__ == "__main__":
    main()
