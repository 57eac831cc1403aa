"""The `alloy` command: parses flags, calls the library, prints. No merge logic lives here.

User errors (`ModelAlloyError`) become one line on stderr and exit code 2; a traceback means a
bug of ours (or `--debug`).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
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
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _show_warnings(caught: list[warnings.WarningMessage], quiet: bool) -> None:
    if quiet:
        return
    for w in caught:
        err.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)


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
        )
    except ValueError as e:
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
        rate = p.bytes_written / p.elapsed / 1e9 if p.elapsed > 0 else 0.0
        bar.update(task, completed=p.done, total=p.total, rate=f"{rate:.2f} GB/s")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with bar:
                result = run_merge(config, out_dir, options=options, progress=on_progress)
        except ModelAlloyError as e:
            _show_warnings(caught, quiet)
            _fail(e)
    _show_warnings(caught, quiet)
    if as_json:
        out.print_json(json.dumps(result.summary()))
    elif not quiet:
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

    options = MergeOptions(threads=threads, allow_pickle=allow_pickle, allow_crimes=allow_crimes, force=force)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; nothing was renamed into place (the partial output is in OUT.partial/)")
        sys.exit(130)


if __name__ == "__main__":
    main()
