"""From the JSON results of `alloy eval`, `rate`, `analyze` (and the demo) to report sections."""

from __future__ import annotations

from collections.abc import Sequence

import yaml

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
    rows = [[model] + [per_set[s["name"]]["score"] for s in sets] for model, per_set in ev["scores"].items()]
    report.table(headers, rows, caption=caption)
    values = {s["name"]: {m: per_set[s["name"]]["score"] for m, per_set in ev["scores"].items()} for s in sets}
    metric = "perplexity (lower is better)" if all(s["metric"] == "perplexity" for s in sets) else "score"
    report.figure(plots.grouped_bars(values, title=caption, ylabel=metric), alt=caption)


def _eval(report: Report, result: dict) -> None:
    report.heading("Evaluation")
    _score_table(report, result, "scores per eval set")


def _rate(report: Report, result: dict, *, heading: str = "Merge rate") -> None:
    report.heading(heading)
    ev = result["evaluation"]
    report.paragraph(f"base: {result['base']}; parents: {', '.join(result['parents'])}. "
                     "NAI = (merged − base) / (expert − base) in each set's better direction: 1 keeps all of the expert's gain, "
                     "0 none, below 0 is worse than the base. Forgetting is on control sets (nobody's specialty), relative to the base.")
    _score_table(report, ev, "per-set scores")
    expert_sets = [s["name"] for s in ev["sets"] if s.get("expert")]
    rows = []
    for i, r in enumerate(result["rates"], 1):
        by = {x["set"]: x for x in r["sets"]}
        rows.append([i, r["model"], r["mean_nai"], r["mean_normalized_score"], _pct(r["mean_gain_over_best"]), _pct(r["mean_forgetting"]), r["p_beats_base"]] + [by[s]["nai"] for s in expert_sets])
    report.table(["rank", "merge", "mean NAI", "normalized score", "gain vs best parent", "forgetting", "P[merged > base]"] + [f"NAI {s}" for s in expert_sets], rows, caption="merge rate, best first")
    nai = {r["model"]: {x["set"]: x["nai"] for x in r["sets"] if x["nai"] is not None} for r in result["rates"]}
    if any(nai.values()):
        report.figure(plots.grouped_bars(nai, title="NAI per expert set (1 = the expert's whole gain kept)", ylabel="NAI", reference=1.0), alt="NAI per method")
    for r in result["rates"][:1]:
        for note in r["notes"]:
            report.paragraph(note, note=True)
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
