"""From the JSON results of `alloy eval`, `rate`, `analyze` (and the demo) to report sections."""

from __future__ import annotations

from collections.abc import Sequence

import yaml

from modelalloy.report import intervals as iv
from modelalloy.report import plots
from modelalloy.report.html import Report


def render(results: Sequence[dict], *, title: str = "modelalloy report") -> Report:
    report = Report(title)
    for result in results:
        kind = result.get("kind")
        if kind == "eval":
            _eval(report, result)
        elif kind == "rate":
            _rate(report, result)
        elif kind == "analyze":
            _analyze(report, result)
        elif kind == "demo":
            _demo(report, result)
        else:
            raise ValueError(f"unknown result kind {kind!r}")
    return report


def write_report(results: Sequence[dict], path, *, title: str = "modelalloy report"):
    return render(results, title=title).write(path)


def _score_table(report: Report, ev: dict, caption: str) -> None:
    sets = ev["sets"]
    headers = ["model"] + [f"{s['name']} ({'perplexity ↓' if s['metric'] == 'perplexity' else 'accuracy ↑'})" for s in sets]
    digits = {s["name"]: 2 if s["metric"] == "perplexity" else 3 for s in sets}
    rows = [[model] + [iv.pm(per_set[s["name"]]["score"], per_set[s["name"]].get("ci95"), digits[s["name"]]) for s in sets]
            for model, per_set in ev["scores"].items()]
    units = ", ".join(f"{s['name']} {_units_of(ev, s['name'])}" for s in sets)
    report.table(headers, rows, caption=f"{caption} ({iv.PM_LEGEND}; units resampled: {units})")
    values = {s["name"]: {m: per_set[s["name"]]["score"] for m, per_set in ev["scores"].items()} for s in sets}
    errors = {s["name"]: {m: per_set[s["name"]].get("ci95") for m, per_set in ev["scores"].items()} for s in sets}
    metric = "perplexity (lower is better)" if all(s["metric"] == "perplexity" for s in sets) else "score"
    report.figure(plots.grouped_bars(values, errors=errors, title=f"{caption}, with 95 % intervals", ylabel=metric), alt=caption)


def _units_of(ev: dict, set_name: str) -> str:
    first = next(iter(ev["scores"].values()), {}).get(set_name, {})
    n, tokens = first.get("n_units"), first.get("n_tokens")
    if n is None:
        return "no per-unit record"
    return f"{n} units" + (f" / {tokens} tokens" if tokens else "")


def _bootstrap_line(ev: dict) -> str:
    b = ev.get("bootstrap")
    if not b:
        return "No intervals: these results were saved without a bootstrap."
    return (f"Intervals: {b['interval']} bootstrap over each set's units (documents, windows or items), {b['resamples']} resamples, "
            f"seed {b['seed']}; every model is resampled on the same units, so comparisons are paired.")


def _eval(report: Report, result: dict) -> None:
    report.heading("Evaluation")
    report.paragraph(_bootstrap_line(result))
    for w in result.get("warnings", []):
        report.paragraph(f"warning: {w}", note=True)
    _score_table(report, result, "scores per eval set")


def _rate(report: Report, result: dict, *, heading: str = "Merge rate") -> None:
    report.heading(heading)
    ev = result["evaluation"]
    report.paragraph(f"base: {result['base']}; parents: {', '.join(result['parents'])}. "
                     "NAI = (merged − base) / (expert − base) in each set's better direction: 1 keeps all of the expert's gain, "
                     "0 none, below 0 is worse than the base. Forgetting is on control sets (nobody's specialty), relative to the base.")
    report.paragraph(_bootstrap_line(ev))
    for w in ev.get("warnings", []):
        report.paragraph(f"warning: {w}", note=True)
    _score_table(report, ev, "per-set scores")
    rates = result["rates"]
    basis = rates[0].get("p_beats_base_basis", "share of sets where the merged model beats the base") if rates else ""
    rows = []
    for label, r in zip(iv.rank_labels(rates), rates):
        rows.append([label, r["model"], iv.pm(r["mean_nai"], r.get("mean_nai_ci95"), 3), iv.pm(r["mean_normalized_score"], r.get("mean_normalized_score_ci95"), 3),
                     iv.pm(r["mean_gain_over_best"], r.get("mean_gain_over_best_ci95"), 1, percent=True),
                     iv.pm(r["mean_forgetting"], r.get("mean_forgetting_ci95"), 1, percent=True), f"{r['p_beats_base']:.2f}"])
    report.table(["rank", "merge", "mean NAI", "normalized score", "gain vs best parent", "forgetting", "P(better than base)"], rows,
                 caption=f"merge rate, best first ({iv.RANK_LEGEND}; {iv.PM_LEGEND}; P: {basis})")
    sets = ev["sets"]
    rows = []
    for r in rates:
        by = {x["set"]: x for x in r["sets"]}
        for s in sets:
            x = by[s["name"]]
            digits = 2 if s["metric"] == "perplexity" else 3
            rows.append([r["model"], s["name"], iv.delta(x.get("vs_base"), digits), iv.p_better(x.get("vs_base")),
                         iv.delta(x.get("vs_expert"), digits), iv.delta(x.get("vs_best_parent"), digits) + f" ({x['best_parent']})",
                         iv.pm(x["nai"], x.get("nai_ci95"), 3) if s.get("expert") else iv.pm(x["forgetting"], x.get("forgetting_ci95"), 1, percent=True)])
    report.table(["merge", "set", "Δ vs base", "P(better than base)", "Δ vs expert", "Δ vs best parent", "NAI (expert sets) / forgetting (controls)"], rows,
                 caption=f"paired comparisons per set: Δ = merged − reference in the set's metric, [95 % interval] ({iv.NOISE_LEGEND})")
    nai = {r["model"]: {x["set"]: x["nai"] for x in r["sets"] if x["nai"] is not None} for r in rates}
    nai_err = {r["model"]: {x["set"]: x.get("nai_ci95") for x in r["sets"]} for r in rates}
    if any(nai.values()):
        report.figure(plots.grouped_bars(nai, errors=nai_err, title="NAI per expert set, with 95 % intervals (1 = the expert's whole gain kept)", ylabel="NAI", reference=1.0), alt="NAI per method")
        means = {"mean NAI": {r["model"]: r["mean_nai"] for r in rates}}
        report.figure(plots.grouped_bars(means, errors={"mean NAI": {r["model"]: r.get("mean_nai_ci95") for r in rates}},
                                         title="mean NAI per merge, with 95 % intervals", ylabel="mean NAI", reference=1.0), alt="mean NAI per merge")
    for r in rates:
        for note in r["notes"]:
            report.paragraph(f"{r['model']}: {note}", note=True)
    configs = [(r["model"], r["config"]) for r in rates if r.get("config")]
    if configs:
        for model, config in configs:
            report.paragraph(f"config of {model}:")
            report.code(yaml.safe_dump(config, sort_keys=False))
    else:
        report.code(yaml.safe_dump(result["config"], sort_keys=False))


def _demo(report: Report, result: dict) -> None:
    report.heading("The demo")
    for line in result.get("summary", []):
        report.paragraph(line)
    if result.get("specialists"):
        report.table(["specialist", "its set", "base perplexity", "specialist perplexity", "better?"],
                     [[s["name"], s["set"], s["base"], s["specialist"], "yes" if s["better"] else "NO"] for s in result["specialists"]],
                     caption="each specialist on its own domain (held-out text)")
    if result.get("timings"):
        report.table(["step", "seconds"], [[k, round(v, 1)] for k, v in result["timings"].items()], caption="timings")
    _rate(report, result["rate"], heading="Merge rate of the specialists")
    if result.get("analyze"):
        _analyze(report, result["analyze"])


def _analyze(report: Report, result: dict) -> None:
    from modelalloy.report.analyze_view import render_analyze

    render_analyze(report, result)


def _pct(v) -> str | None:
    return None if v is None else f"{100 * v:+.1f}%"
