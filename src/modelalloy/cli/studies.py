"""`alloy demo`, `demo-search` and `search`: whole studies, and searching merge parameters."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from modelalloy.cli import common
from modelalloy.cli.common import DEFAULTS, JsonOpt, RayAddressOpt, RayOpt, SaveOpt, WorkersOpt, eval_progress, fail, option_help, show_warnings
from modelalloy.errors import ModelAlloyError


def _print_trial(r) -> None:
    """One finished search trial, a line on stderr."""
    value = "failed: " + r.error if r.error else ", ".join(f"{v:.4g}" for v in r.values)
    best = ", ".join(f"{v:.4g}" for v in r.best) if r.best else "-"
    eta = f"{r.eta:.0f}s" if r.eta is not None else "?"
    common.err.print(f"trial {r.number:>3} [{r.done}/{r.total}] {value}  best {best}  ETA {eta}", highlight=False, soft_wrap=True)


def demo(
    cache: Annotated[Path, typer.Option(help="where the base, the specialists and the scores are kept")] = Path(".cache/demo"),
    methods: Annotated[str, typer.Option(help="merge methods to compare")] = "linear,task_arithmetic,ties,dare_ties,dare_linear,della",
    domains: Annotated[str, typer.Option(help="specialist domains: shakespeare, german, spanish, italian, code (news is always the held-out control)")] = "shakespeare,german,spanish,italian",
    train: Annotated[str, typer.Option(help="lora (PEFT adapters on the top layers, folded in) or full (those layers whole)")] = "lora",
    quick: Annotated[bool, typer.Option("--quick", help="the test suite's size: two specialists, two steps, 640 tokens per domain (a minute or two)")] = False,
    resamples: Annotated[int, typer.Option(help="bootstrap resamples behind every interval")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of training, merges and the bootstrap")] = 0,
    report: Annotated[Optional[Path], typer.Option("--report", help="HTML report (default: CACHE/report.html)")] = None,
    save: SaveOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A real study: SmolLM2-135M fine-tuned into specialists on CPU, merged every way, rated.

    The first run converts the base and fine-tunes the specialists (minutes); later runs reuse them.
    """
    import time as _time

    from modelalloy.apps.demo import DemoSettings, run_demo
    from modelalloy.report.terminal import print_rates, print_specialists, save_outputs

    start = _time.perf_counter()
    bar, on_progress = eval_progress()
    chosen = {"train": train, "resamples": resamples, "seed": seed}
    if not quick or domains != "shakespeare,german,spanish,italian":  # --quick keeps its own two domains unless told
        chosen["domains"] = tuple(d.strip() for d in domains.split(",") if d.strip())
    settings = DemoSettings.quick(**chosen) if quick else DemoSettings(**chosen)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")  # transformers' GGUF and tokenizer notices are not the user's concern here
        try:
            with bar:
                result = run_demo(cache, settings=settings, methods=tuple(m.strip() for m in methods.split(",") if m.strip()), progress=on_progress)
        except ModelAlloyError as e:
            fail(e)
    payload = result.to_json()
    payload["timings"]["total"] = _time.perf_counter() - start
    if not as_json:
        print_specialists(common.out, result.specialists)
        print_rates(common.out, common.err, result.rate)
        common.out.print("held-out text: " + ", ".join(f"{k} {v['n_tokens']} tokens in {v['n_units']} units" for k, v in result.sizes.items()), highlight=False)
        common.out.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in payload["timings"].items()), highlight=False)
    for s in result.specialists:
        if not s["better"]:
            common.err.print(f"[yellow]warning:[/] the {s['name']} specialist is not 25 % better than the base on {s['set']} "
                             f"({100 * s['gain']:+.1f} %); train longer (DemoSettings.max_steps) for a demo that decides", highlight=False)
    save_outputs(common.out, common.err, payload, save, report or cache / "report.html", as_json)


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
    as_json: JsonOpt = False,
) -> None:
    """Search TIES/DARE-TIES weights and densities on the demo's specialists; compare on held-out text."""
    from modelalloy.apps.demo_search import DemoSearchSettings, run_demo_search
    from modelalloy.report.terminal import fmt

    settings = DemoSearchSettings(method=method, trials=trials, sampler=sampler, layer_groups=layer_groups, search_tokens=tokens, heldout_tokens=tokens)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        try:
            result = run_demo_search(cache, out_dir, settings=settings, resume=resume, force=force, trial_progress=_print_trial,
                                     progress=lambda what, d, t: common.err.print(f"{what} [{d}/{t}]", highlight=False))
        except ModelAlloyError as e:
            fail(e)
    if as_json:
        common.out.print_json(json.dumps(result.to_json()))
        return
    sets = list(next(iter(result.table.values())))
    t = Table(title=f"held-out perplexity (lower is better); searched = best of {result.trials} {method} trials")
    for col in ("model", *[s.removeprefix("heldout_") for s in sets], "mean log-ppl", "mean NAI", "forgetting"):
        t.add_column(col, justify="left" if col == "model" else "right")
    rows = {r["model"]: r for r in result.rows}
    for model, scores in result.table.items():
        r = rows.get(model, {})
        t.add_row(model, *[fmt(scores[s], 2) for s in sets], fmt(r.get("mean_log_ppl"), 4), fmt(r.get("mean_nai")), fmt(r.get("forgetting")))
    common.out.print(t)
    verdict = "beats" if result.searched_beats_fixed else "does NOT beat"
    common.out.print(f"the searched best {verdict} the best fixed method ({result.best_fixed}) on held-out mean log-perplexity; "
                     + ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items()), highlight=False)


def search(
    spec_file: Annotated[Path, typer.Argument(help="search space and objective (SEARCH.yaml)")],
    out_dir: Annotated[Path, typer.Argument(help="output directory: study.db, best.yaml, trials, plots")],
    resume: Annotated[bool, typer.Option("--resume", help="continue the search stored in OUT_DIR/study.db")] = False,
    force: Annotated[bool, typer.Option("--force", help="delete OUT_DIR and start over")] = False,
    trials: Annotated[Optional[int], typer.Option("--trials", help="complete trials wanted (overrides the file)")] = None,
    use_ray: Annotated[bool, typer.Option("--ray", help="run trials in parallel as Ray actors (a local Ray instance)")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="join an existing Ray cluster")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="optuna storage URL (default: sqlite in OUT_DIR)")] = None,
    device: Annotated[str, typer.Option(help=option_help("device"))] = DEFAULTS.device,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-trial lines")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Search merge parameters against an evaluation (optuna; resumable; optionally on Ray)."""
    from modelalloy.search import load_spec, run_search

    def line(r) -> None:
        if not quiet:
            _print_trial(r)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            spec = load_spec(spec_file)
            if trials is not None:
                spec = spec.model_copy(update={"trials": trials})
            result = run_search(spec, out_dir, resume=resume, force=force, ray=use_ray, ray_address=ray_address, storage=storage, device=device, progress=line)
        except ModelAlloyError as e:
            fail(e)
    show_warnings([w for w in caught if issubclass(w.category, UserWarning) and "modelalloy" in str(w.filename)], quiet)
    summary = json.loads((result.out_dir / "summary.json").read_text())
    if as_json:
        common.out.print_json(json.dumps(summary))
    else:
        common.err.print(f"{result.trials} trials; best {', '.join(f'{v:.4g}' for v in result.best_values)} (trial {summary['best_trial']}); wrote {result.out_dir / 'best.yaml'}", highlight=False)


def _print_study(data: dict) -> None:
    """The study's curves over k, merge vs fusion with cost, and the predictors, as tables."""
    from modelalloy.report.study_view import comparison, prediction_rows

    def ci(x: dict) -> str:
        if x["value"] is None:
            return "-"
        return f"{x['value']:.3f}" + (f" ±{(x['ci95'][1] - x['ci95'][0]) / 2:.3f}" if x.get("ci95") else "")

    ks = data["axes"]["k"]
    t = Table(title="mean NAI over expert subsets, by k (± half the 95 % interval)")
    for col in ("method", "strength", *(f"k={k}" for k in ks)):
        t.add_column(col, justify="left" if col in ("method", "strength") else "right", overflow="fold")
    rows: dict[tuple, dict] = {}
    for r in data["curves"]["vs_k"]:
        name = r["method"] + (" (fusion)" if r["family"] == "fusion" else "")
        rows.setdefault((name, r["strength"]), {})[r["k"]] = ci(r["mean_nai"])
    for (name, st), by_k in rows.items():
        t.add_row(name, st, *(by_k.get(k, "-") for k in ks))
    common.out.print(t)
    t = Table(title="merging vs fusion, over all runs")
    for col in ("method", "mean NAI", "params", "passes/token", "entropy ratio"):
        t.add_column(col, justify="left" if col == "method" else "right", overflow="fold")
    for n, c in comparison(data).items():
        t.add_row(n, f"{c['nai']:.3f}" if c["nai"] is not None else "-", f"{c['params']:.3g}", f"{c['forward_passes']:.2g}",
                  f"{c['entropy_ratio']:.3f}" if c["entropy_ratio"] is not None else "-")
    common.out.print(t)
    t = Table(title="what predicts a failed merge: Spearman ρ of each diagnostic with mean NAI")
    for col in ("diagnostic", "ρ", "95 % CI", "merges"):
        t.add_column(col, justify="left" if col == "diagnostic" else "right", overflow="fold")
    for row in prediction_rows(data["prediction"]):
        t.add_row(*row)
    common.out.print(t)
    from modelalloy.study.scaling_law import summary_line

    for entry in data.get("scaling_law", []):
        common.out.print(summary_line(entry), highlight=False, soft_wrap=True)


def study(
    spec_file: Annotated[Path, typer.Argument(help="the study (STUDY.yaml): base, specialists, sets, axes")],
    out_dir: Annotated[Path, typer.Argument(help="output: study.json, study.html, PNGs, the score cache")],
    quick: Annotated[bool, typer.Option("--quick", help="a CI-sized study: one subset per k, two methods, short continuations")] = False,
    use_ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Merge rates over methods, expert subsets and strengths, next to fusion (MoE, ensemble, oracle routing). Resumable."""
    from modelalloy.report.study_view import write_study_report
    from modelalloy.study import load_study, run_study

    bar, on_progress = eval_progress()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")  # transformers' loading notices
        try:
            spec = load_study(spec_file)
            with bar:
                data = run_study(spec.quick() if quick else spec, out_dir, progress=on_progress, ray=use_ray, ray_address=ray_address, workers=workers)
        except ModelAlloyError as e:
            fail(e)
    write_study_report(data, out_dir)
    if as_json:
        common.out.print_json(json.dumps(data))
        return
    _print_study(data)
    common.out.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in data["timings"].items()), highlight=False)
    for w in data["warnings"]:
        common.err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    common.err.print(f"wrote {out_dir / 'study.json'} and {out_dir / 'study.html'}", highlight=False)


def demo_study(
    cache: Annotated[Path, typer.Option(help="alloy demo's cache: the base and the specialists (built there if missing)")] = Path(".cache/demo"),
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="study output (default: CACHE/study)")] = None,
    domains: Annotated[str, typer.Option(help="specialist domains (news is always the held-out control)")] = "shakespeare,german,spanish,italian",
    tokens: Annotated[int, typer.Option(help="held-out tokens scored per set (windows of 128)")] = 1536,
    sample_per_k: Annotated[Optional[int], typer.Option(help="expert subsets drawn per k; 0: every subset")] = 2,
    quick: Annotated[bool, typer.Option("--quick", help="a CI-sized study")] = False,
    use_ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """`alloy study` on the demo's specialists at two strengths: merge rate vs k and strength, merge vs fusion."""
    from modelalloy.apps.demo_study import DemoStudySettings, run_demo_study
    from modelalloy.report.study_view import write_study_report

    settings = DemoStudySettings(domains=tuple(d.strip() for d in domains.split(",") if d.strip()), eval_tokens=tokens, sample_per_k=sample_per_k or None, quick=quick)
    bar, on_progress = eval_progress()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        try:
            with bar:
                data, timings = run_demo_study(cache, out_dir, settings=settings, progress=on_progress, ray=use_ray, ray_address=ray_address,
                                               workers=workers)
        except ModelAlloyError as e:
            fail(e)
    out = out_dir or cache / ("study-quick" if quick else "study")
    write_study_report(data, out)
    if as_json:
        common.out.print_json(json.dumps(data))
        return
    _print_study(data)
    common.out.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), highlight=False)
    common.err.print(f"wrote {out / 'study.json'} and {out / 'study.html'}", highlight=False)
