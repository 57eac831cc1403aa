"""`alloy stats`, `eval`, `rate`, `analyze` and `report`: data statistics for merges, and measuring them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelalloy.cli import common
from modelalloy.cli.common import JsonOpt, ReportOpt, SaveOpt, eval_progress, fail, show_warnings
from modelalloy.errors import ModelAlloyError


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

    bar = Progress(TextColumn("[bold]statistics"), BarColumn(), TextColumn("{task.completed}/{task.total} samples"), TimeElapsedColumn(), console=common.err, disable=quiet)
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
        fail(e)
    if as_json:
        common.out.print_json(json.dumps(result.summary()))
    elif not quiet:
        common.err.print(
            f"wrote {result.fisher} Fisher diagonals and {result.gram} Gram matrices from {result.samples} samples "
            f"({result.tokens} tokens) to {result.path}",
            highlight=False,
        )


def eval_(
    models: Annotated[list[str], typer.Argument(help="model directories, or merge configs (.yaml, merged in memory)")],
    evals: Annotated[Path, typer.Option("--eval", "-e", help="evals YAML: the sets to score on")],
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer directory (default: each model's own)")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="JSON score cache: unchanged models and sets are not rescored")] = None,
    resamples: Annotated[int, typer.Option(help="bootstrap resamples behind every 95 % interval and paired comparison")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap resamples (per set), so reruns give the same intervals")] = 0,
    save: SaveOpt = None,
    report: ReportOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score models on eval sets: perplexity on text, accuracy on multiple choice; each with a 95 % interval."""
    from modelalloy.evaluate import Bootstrap, evaluate, load_evals
    from modelalloy.report.terminal import print_scores, print_warnings, save_outputs

    bar, on_progress = eval_progress()
    try:
        if resamples < 1:
            raise ModelAlloyError(f"--resamples {resamples}: give at least 1 (1000 is the default)")
        sets = load_evals(evals)
        with bar:
            result = evaluate(models, sets, tokenizer=tokenizer, cache=cache, progress=on_progress, bootstrap=Bootstrap(resamples=resamples, seed=seed))
    except ModelAlloyError as e:
        fail(e)
    if not as_json:
        print_scores(common.out, result)
        print_warnings(common.err, result.warnings)
    save_outputs(common.out, common.err, result.to_json(), save, report, as_json)


def rate(
    config: Annotated[Path, typer.Argument(help="merge config (mergekit YAML) with base_model")],
    evals: Annotated[Path, typer.Option("--eval", "-e", help="evals YAML; `expert:` marks each parent's own set")],
    methods: Annotated[Optional[str], typer.Option(help="comma-separated methods to run on the same parents and rank, e.g. linear,ties,dare_ties")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer directory (default: the base's)")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="JSON score cache: unchanged models and sets are not rescored")] = None,
    resamples: Annotated[int, typer.Option(help="bootstrap resamples behind every 95 % interval and paired comparison")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap resamples (per set), so reruns give the same intervals")] = 0,
    save: SaveOpt = None,
    report: ReportOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The merge-rate table: base vs each parent vs the merge (or one merge per method), per set."""
    from modelalloy.evaluate import Bootstrap, load_evals, rate as run_rate
    from modelalloy.report.terminal import print_rates, save_outputs

    bar, on_progress = eval_progress()
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if resamples < 1:
                raise ModelAlloyError(f"--resamples {resamples}: give at least 1 (1000 is the default)")
            sets = load_evals(evals)
            with bar:
                result = run_rate(config, sets, methods=method_list, tokenizer=tokenizer, cache=cache, progress=on_progress,
                                  bootstrap=Bootstrap(resamples=resamples, seed=seed))
        except ModelAlloyError as e:
            fail(e)
    show_warnings(caught, as_json)
    if not as_json:
        print_rates(common.out, common.err, result)
    save_outputs(common.out, common.err, result.to_json(), save, report, as_json)


def analyze(
    base: Annotated[str, typer.Argument(help="the base model directory")],
    models: Annotated[list[str], typer.Argument(help="fine-tuned model directories (same layout as the base)")],
    top_k: Annotated[int, typer.Option(help="singular vectors compared for the subspace overlap of 2-D tensors")] = 8,
    layers: Annotated[bool, typer.Option("--layers", help="print the per-layer table too")] = False,
    study: Annotated[Optional[Path], typer.Option("--study", help="a study's study.json: print the merge rate these diagnostics predict there, with the study's ρ")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="with --study: predict for this method's merges, with the ρ measured within it")] = None,
    save: SaveOpt = None,
    report: ReportOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Weight diagnostics, no evaluation: task-vector norms, cosine, sign conflicts, concentration."""
    from modelalloy.analyze import analyze as run_analyze
    from modelalloy.report.terminal import fmt, save_outputs

    bar = Progress(TextColumn("[bold]analyzing"), BarColumn(), TextColumn("{task.completed}/{task.total} tensors"), TimeElapsedColumn(), console=common.err, disable=as_json)
    task = bar.add_task("analyze", total=None)
    try:
        with bar:
            result = run_analyze(base, models, top_k=top_k, progress=lambda d, t: bar.update(task, completed=d, total=t))
    except ModelAlloyError as e:
        fail(e)
    payload = result.to_json()
    if study is not None:
        from modelalloy.study.predict import diagnostics_from_analysis, predict

        try:
            measured = json.loads(study.read_text())
        except (OSError, ValueError) as e:
            fail(ModelAlloyError(f"{study}: cannot read a study's JSON ({e})"))
        if measured.get("kind") != "study":
            fail(ModelAlloyError(f"{study}: not a study.json (written by alloy study)"))
        known = sorted({r["method"] for r in measured.get("runs", [])})
        if method is not None and method not in known:
            fail(ModelAlloyError(f"--method {method}: {study} has no merges with it; it has {', '.join(known) or 'none'}"))
        payload["prediction"] = predict(measured, diagnostics_from_analysis(payload), method=method)
    if not as_json:
        o = result.overall
        t = Table(title=f"task vectors against {base}")
        for col in ("model", "‖δ‖", "‖δ‖/‖base‖", "top 1 %", "top 10 %", "top 20 %"):
            t.add_column(col, justify="right" if col != "model" else "left")
        for n in result.models:
            c = o["concentration"][n] or {}
            t.add_row(n, fmt(o["norm"][n], 4), fmt(o["relative_norm"][n], 4), fmt(c.get("top1%")), fmt(c.get("top10%")), fmt(c.get("top20%")))
        common.out.print(t)
        if len(result.models) >= 2:
            t = Table(title="agreement between task vectors")
            for col in ("pair", "cosine", "subspace overlap"):
                t.add_column(col, justify="right" if col != "pair" else "left")
            for p, v in o["cosine"].items():
                t.add_row(p, fmt(v), fmt(o["subspace_overlap"].get(p)))
            common.out.print(t)
            common.out.print(f"sign-conflict rate (entries where two or more task vectors are nonzero): {fmt(o['sign_conflict'])}")
        if layers:
            t = Table(title="per layer")
            for col in ["layer", *(f"‖δ‖ {n}" for n in result.models), *o["cosine"], "sign conflict"]:
                t.add_column(col, justify="right")
            for r in result.layers:
                t.add_row(str(r["layer"]), *(fmt(r["norm"][n], 4) for n in result.models), *(fmt(r["cosine"][p]) for p in o["cosine"]), fmt(r["sign_conflict"]))
            common.out.print(t)
        if study is not None:
            _print_prediction(payload["prediction"], study)
    save_outputs(common.out, common.err, payload, save, report, as_json)


def _print_prediction(rows: list[dict], study: Path) -> None:
    from modelalloy.report.terminal import fmt

    t = Table(title=f"the merge rate these diagnostics predict, from the merges of {study}")
    for col in ("diagnostic", "these models", "study ρ", "95 % CI", "merges", "predicted NAI", "range", "trust"):
        t.add_column(col, justify="left" if col in ("diagnostic", "trust") else "right", no_wrap=True)
    for r in rows:
        ci = f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r["ci95"] else "-"
        span = f"{r['range'][0]:.2f} to {r['range'][1]:.2f}" if r["range"] else "-"
        trust = "ρ ≠ 0" if r["trusted"] else "ρ ≈ 0: no signal" if r["ci95"] else "not measured"
        t.add_row(r["diagnostic"], fmt(r["value"]), fmt(r["spearman_rho"]), ci, str(r["n"]), fmt(r["predicted_nai"]), span, trust)
    common.out.print(t)
    common.out.print("predicted NAI: the mean of the study's merges nearest in this diagnostic (not a model of it); "
                     "mean_cka needs the parents run on text, which analyze does not do", highlight=False)


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
            fail(ModelAlloyError(f"{path}: results file not found"))
        except (OSError, ValueError) as e:
            fail(ModelAlloyError(f"{path}: not a JSON results file ({str(e).splitlines()[0]})"))
        if not isinstance(payload, dict) or payload.get("kind") not in ("eval", "rate", "analyze", "demo"):
            fail(ModelAlloyError(f"{path}: not a modelalloy results file (save one with --save on eval, rate, analyze or demo)"))
        payloads.append(payload)
    write_report(payloads, out_file, title=title)
    common.err.print(f"report: {out_file}", highlight=False)
