"""`alloy merge`, `plan`, `verify` and `methods`: one merge, from its dry run to re-reading what it wrote."""

from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from modelalloy.cli import common
from modelalloy.cli.common import DEFAULTS, fail, option_help, show_warnings
from modelalloy.errors import ModelAlloyError
from modelalloy.engine import MergeOptions


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def merge(
    config: Annotated[Path, typer.Argument(help="merge config (mergekit YAML)")],
    out_dir: Annotated[Path, typer.Argument(help="output directory (a Hugging Face model)")],
    max_shard_size: Annotated[str, typer.Option(help=option_help("max_shard_size"))] = DEFAULTS.max_shard_size,
    device: Annotated[str, typer.Option(help=option_help("device"))] = DEFAULTS.device,
    threads: Annotated[int, typer.Option("--threads", "-j", help=option_help("threads"))] = DEFAULTS.threads,
    force: Annotated[bool, typer.Option("--force", help=option_help("force"))] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=option_help("allow_pickle"))] = False,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes", help=option_help("allow_crimes"))] = False,
    write_model_card: Annotated[bool, typer.Option(help=option_help("write_model_card"))] = True,
    copy_tokenizer: Annotated[bool, typer.Option(help=option_help("copy_tokenizer"))] = True,
    hash_inputs: Annotated[bool, typer.Option(help=option_help("hash_inputs"))] = True,
    out_format: Annotated[str, typer.Option(help=option_help("out_format"))] = DEFAULTS.out_format,
    out_type: Annotated[str, typer.Option(help=option_help("out_type"))] = DEFAULTS.out_type,
    vocab_report: Annotated[bool, typer.Option(help="print the vocabulary report when tokenizers are aligned")] = True,
    resume: Annotated[bool, typer.Option(help=option_help("resume"))] = True,
    backend: Annotated[str, typer.Option(help=option_help("backend"))] = DEFAULTS.backend,
    ray_address: Annotated[Optional[str], typer.Option(help=option_help("ray_address"))] = None,
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
            fail(ModelAlloyError(f"--{str(errors[0]['loc'][0]).replace('_', '-')}: {errors[0]['msg']}"))
        fail(ModelAlloyError(str(e).splitlines()[-1]))
    bar = Progress(
        TextColumn("[bold]merging"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} tensors"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=common.err,
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
            show_warnings(caught, quiet)
            fail(e)
        except KeyboardInterrupt:
            show_warnings(caught, quiet)
            partial = out_dir.with_name(out_dir.name + ".partial")
            common.err.print(
                f"interrupted: {out_dir} was not written; the finished shards are kept in {partial}, "
                "run the same command again to resume from them",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)
    show_warnings(caught, quiet)
    report_file = result.out_dir / "vocab_report.json"
    if vocab_report and not quiet and not as_json and report_file.exists():
        from modelalloy.plan.vocab_report import format_report

        common.err.print(format_report(json.loads(report_file.read_text())), highlight=False, markup=False)
    if as_json:
        common.out.print_json(json.dumps(result.summary()))
    elif not quiet:
        if result.shards_reused:
            common.err.print(f"resumed: {result.shards_reused} finished shard(s) of an interrupted run were verified and reused", highlight=False)
        common.err.print(
            f"wrote {result.tensors} tensors, {result.bytes_written / 1e9:.3f} GB in {result.seconds:.1f}s "
            f"to {result.out_dir}",
            highlight=False,
        )


def plan(
    config: Annotated[Path, typer.Argument(help="merge config (mergekit YAML)")],
    out_dir: Annotated[Optional[Path], typer.Argument(help="output directory to check (optional)")] = None,
    threads: Annotated[int, typer.Option("--threads", "-j", help=option_help("threads"))] = DEFAULTS.threads,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=option_help("allow_pickle"))] = False,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes", help=option_help("allow_crimes"))] = False,
    force: Annotated[bool, typer.Option("--force", help=option_help("force"))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan summary as JSON")] = False,
    show_tensors: Annotated[bool, typer.Option("--tensors", help="list every output tensor")] = False,
) -> None:
    """Dry run: every check `merge` makes, with tensor count, peak RAM and output size; writes nothing."""
    from modelalloy.api import plan_merge, plan_summary
    from modelalloy.engine import check_output

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
            show_warnings(caught, False)
            fail(e)
    show_warnings(caught, as_json)
    summary = plan_summary(the_plan, models, threads=threads, tensors=show_tensors)
    if as_json:
        common.out.print_json(json.dumps(summary, default=str))
        return
    table = Table(title=f"plan: {config}", show_header=False)
    table.add_row("method", summary["method"])
    table.add_row("models", "\n".join(summary["models"]))
    table.add_row("output tensors", str(summary["tensors"]))
    table.add_row("layers", str(summary["layers"]))
    table.add_row("reads", f"{summary['input_bytes'] / 1e9:.3f} GB")
    table.add_row("writes", f"{summary['output_bytes'] / 1e9:.3f} GB")
    table.add_row("est. peak RAM", f"{summary['peak_memory_bytes'] / 1e9:.2f} GB (threads={threads})")
    common.out.print(table)
    if the_plan.vocab is not None:
        from modelalloy.plan.vocab_report import format_report

        common.out.print(format_report(the_plan.vocab.report), highlight=False, markup=False)
    if show_tensors:
        for r in summary["recipes"]:
            common.out.print(f"{r['name']}  {r['method']}  {r['shape']}  {r['dtype']}  <- {', '.join(r['inputs'])}", highlight=False)


def verify(
    path: Annotated[Path, typer.Argument(help="checkpoint directory: a merge output or any safetensors HF model")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="the merge config; then every planned tensor must be present")] = None,
    read_data: Annotated[bool, typer.Option(help="read every tensor back and check for NaN/Inf")] = True,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=option_help("allow_pickle"))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Re-read a checkpoint: index, headers, shard hashes, NaN/Inf, planned tensors. Exit 1 if anything is wrong."""
    from modelalloy.verify import verify_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = verify_checkpoint(path, config=config, read_data=read_data, allow_pickle=allow_pickle)
        except ModelAlloyError as e:
            fail(e)
    show_warnings(caught, as_json)
    if as_json:
        common.out.print_json(json.dumps(report.summary()))
    else:
        for problem in report.problems:
            common.err.print(f"[bold red]problem:[/] {escape(problem)}", highlight=False, soft_wrap=True)
        checks = f"{report.tensors} tensors in {len(report.files)} file(s), {report.hashes_checked} shard hash(es) matched"
        if config is not None:
            checks += f", {report.planned_checked} planned tensors present"
        common.err.print(("ok: " if report.ok else f"{len(report.problems)} problem(s); checked ") + checks, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


def methods(name: Annotated[Optional[str], typer.Argument(help="show one method in full")] = None) -> None:
    """List the merge methods (or show one): parameters, defaults, base-model rule, reference."""
    from modelalloy.methods import REGISTRY, REQUIRED

    try:
        chosen = [REGISTRY.get(name)] if name else list(REGISTRY)
    except ModelAlloyError as e:
        fail(e)
    if not name:
        table = Table(title="merge methods")
        for col in ("method", "base", "models", "parameters (default)", "what it does", "reference"):
            table.add_column(col, overflow="fold")
        for m in chosen:
            count = f"{m.min_models}" + ("+" if m.max_models is None else "" if m.max_models == m.min_models else f"-{m.max_models}")
            params = ", ".join(p.name + ("*" if p.required else f"={p.default!r}") for p in m.params)
            table.add_row(m.name + (" †" if m.vs_mergekit else ""), m.base, count, params, m.doc, m.reference)
        common.out.print(table)
        common.out.print("* required.  † differs from mergekit.  `alloy methods NAME` shows one method in full, with how it differs.")
        return
    m = chosen[0]
    common.out.print(f"[bold]{m.name}[/]: {m.doc}")
    common.out.print(f"base model: {m.base}; models besides the base: {m.min_models}" + ("" if m.max_models == m.min_models else f" to {m.max_models or 'any'}"))
    if m.randomized:
        common.out.print("random: seeded per output tensor from random_seed, so reruns are bit-identical")
    if m.reference:
        common.out.print(f"reference: {m.reference}")
    if m.stats:
        common.out.print(f"reads per-model {m.stats} statistics: give each model `stats: FILE`, made by `alloy stats MODEL --data TEXT FILE`")
    table = Table()
    for col in ("parameter", "scope", "default", "meaning"):
        table.add_column(col)
    for p in m.params:
        default = "required" if p.default is REQUIRED else repr(p.default)
        meaning = p.doc + (f" (one of {', '.join(map(repr, p.choices))})" if p.choices else "")
        table.add_row(p.name, "per-model" if p.per_model else "global", default, meaning)
    common.out.print(table)
    if m.vs_mergekit:
        common.out.print(f"differs from mergekit: {m.vs_mergekit}")
