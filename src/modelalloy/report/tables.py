"""Rich tables that never cut a name or a number: too wide for the console, they are split.

Every column is as wide as its widest cell (headers are given with their own line breaks, so they
never wrap either). When the columns do not fit the console, the value columns are dealt into
several tables, each repeating the key column(s) on the left, in order: read top to bottom, they
are the one table. Nothing is truncated with "…" at any width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.table import Table


@dataclass(frozen=True)
class Col:
    header: str  # may hold "\n": each line is kept whole
    justify: str = "right"


def _width(col: Col, cells: Sequence[str]) -> int:
    lines = col.header.split("\n") + [line for c in cells for line in str(c).split("\n")]
    return max(cell_len(line) for line in lines)


# A column costs its width plus padding (one space each side) plus one border line;
# the table adds one more border line at its right edge.
def _cost(width: int) -> int:
    return width + 3


def fitted_tables(columns: Sequence[Col], rows: Sequence[Sequence[str]], *, width: int, title: str | None = None, keys: int = 1) -> list[Table]:
    """One rich Table, or several when the columns are wider than `width` together.

    `keys`: how many leading columns (names) every part repeats.
    """
    widths = [_width(c, [r[i] for r in rows]) for i, c in enumerate(columns)]
    key_cost = sum(_cost(w) for w in widths[:keys]) + 1
    parts: list[list[int]] = [[]]
    used = key_cost
    for i in range(keys, len(columns)):
        if parts[-1] and used + _cost(widths[i]) > width:
            parts.append([])
            used = key_cost
        parts[-1].append(i)
        used += _cost(widths[i])
    tables = []
    for n, part in enumerate(parts):
        label = title if len(parts) == 1 or title is None else f"{title} ({n + 1}/{len(parts)})"
        t = Table(title=label, title_justify="left")
        for i in [*range(keys), *part]:
            t.add_column(columns[i].header, justify=columns[i].justify, no_wrap=True, min_width=widths[i], overflow="fold")
        for r in rows:
            t.add_row(*[str(r[i]) for i in [*range(keys), *part]])
        tables.append(t)
    return tables


# --- the measured results as tables ------------------------------------------------------------

def _metric_line(s) -> str:
    return "ppl ↓" if s.metric == "perplexity" else "acc ↑" if s.metric == "accuracy" else "score ↑"


def score_tables(evaluation, *, width: int, title: str = "scores") -> list[Table]:
    """Models × sets, each cell ``value ± half-width`` (95 % bootstrap interval)."""
    from modelalloy.report import intervals as iv

    sets = evaluation.sets
    cols = [Col("model", "left")] + [Col(f"{s.name}\n{_metric_line(s)}\n" + (f"expert: {s.expert}" if s.expert else "control")) for s in sets]
    rows = []
    for model, per_set in evaluation.scores.items():
        rows.append([model] + [iv.pm(per_set[s.name]["score"], per_set[s.name].get("ci95"), 2 if s.metric == "perplexity" else 3) for s in sets])
    return fitted_tables(cols, rows, width=width, title=f"{title} ({iv.PM_LEGEND})")


def rate_tables(result, *, width: int) -> list[Table]:
    """The merge-rate summary (ranked, ties marked) and the per-set table of each merge."""
    from modelalloy.report import intervals as iv

    summaries = [r.summary() for r in result.rates]
    labels = iv.rank_labels(summaries)
    cols = [Col("rank"), Col("merge", "left"), Col("mean NAI"), Col("normalized\nscore"), Col("gain vs\nbest parent"), Col("forgetting\n(controls)"),
            Col("P(better\nthan base)")]
    rows = [[label, r.model, iv.pm(r.mean_nai, r.mean_nai_ci95, 3), iv.pm(r.mean_normalized_score, r.mean_normalized_score_ci95, 3),
             iv.pm(r.mean_gain_over_best, r.mean_gain_over_best_ci95, 1, percent=True), iv.pm(r.mean_forgetting, r.mean_forgetting_ci95, 1, percent=True),
             f"{r.p_beats_base:.2f}"] for label, r in zip(labels, result.rates)]
    tables = fitted_tables(cols, rows, width=width, keys=2, title="merge rate, best first (NAI: share of each expert's gain over the base the merge kept)")
    sets = result.evaluation.sets
    cols = [Col("merge", "left")] + [Col(f"{s.name}\n" + ("NAI" if s.expert else "forgetting") + "\nΔ vs base") for s in sets]
    rows = []
    for r in result.rates:
        by = {x.set: x for x in r.sets}
        cells = []
        for s in sets:
            x = by[s.name]
            main = iv.pm(x.nai, x.nai_ci95, 3) if s.expert else iv.pm(x.forgetting, x.forgetting_ci95, 1, percent=True)
            cells.append(main + "\n" + iv.delta(x.vs_base, 2 if s.metric == "perplexity" else 3))
        rows.append([r.model] + cells)
    tables += fitted_tables(cols, rows, width=width, title=f"per set: NAI (expert sets) or forgetting (controls), and Δ = merged − base [95 % interval] ({iv.NOISE_LEGEND})")
    return tables


def legend(result) -> list[str]:
    """The lines under the rate tables: what ≈ and ± mean, and what P is."""
    from modelalloy.report import intervals as iv

    basis = result.rates[0].p_beats_base_basis if result.rates else ""
    b = result.evaluation.bootstrap
    return [f"{iv.PM_LEGEND} ({b.resamples} resamples of each set's units, seed {b.seed}; comparisons paired on the same resamples)",
            iv.RANK_LEGEND, f"P(better than base): {basis}"]


def specialist_tables(specialists: list[dict], *, width: int) -> list[Table]:
    """The demo's check: each specialist against the base on its own held-out domain."""
    from modelalloy.report import intervals as iv

    cols = [Col("specialist", "left"), Col("domain", "left"), Col("base\nppl"), Col("specialist\nppl"), Col("change"), Col("Δ ppl\n[95 % interval]"),
            Col("P(better)"), Col("steps"), Col(f"≥ {25} %\nbetter?")]
    rows = [[s["name"], s["set"], iv.pm(s["base"], s.get("base_ci95")), iv.pm(s["specialist"], s.get("specialist_ci95")), f"{-100 * s['gain']:+.1f} %",
             iv.delta(s.get("vs_base")), iv.p_better(s.get("vs_base")), str(s.get("steps") or "—"), "yes" if s["better"] else "NO"] for s in specialists]
    return fitted_tables(cols, rows, width=width, title="each specialist on held-out text of its own domain (perplexity, lower is better)")
