"""The terminal side of results: score and merge-rate tables (rich), and saving a command's results.

Used by `alloy eval`, `rate` and `demo`; the consoles to print through are passed in (`out` for
the tables and JSON, `err` for notes and where a report was written).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from rich.table import Table

if TYPE_CHECKING:
    from rich.console import Console


def fmt(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def print_scores(out: Console, table: dict[str, dict[str, float]], sets, title: str = "scores") -> None:
    t = Table(title=title)
    t.add_column("model")
    for s in sets:
        t.add_column(f"{s.name}\n{'ppl ↓' if s.metric == 'perplexity' else 'acc ↑' if s.metric == 'accuracy' else 'score ↑'}" + (f"\n(expert: {s.expert})" if s.expert else "\n(control)"), justify="right")
    for model, row in table.items():
        t.add_row(model, *(fmt(row[s.name], 2 if s.metric == "perplexity" else 3) for s in sets))
    out.print(t)


def print_rates(out: Console, err: Console, result) -> None:
    print_scores(out, result.evaluation.table(), result.evaluation.sets, title=f"per-set scores (base: {result.base})")
    t = Table(title="merge rate, best first (NAI: share of each expert's gain over the base the merge kept)")
    for col in ("rank", "merge", "mean NAI", "norm. score", "gain vs best parent", "forgetting (control)", "P[merged > base]"):
        t.add_column(col, justify="right" if col not in ("merge",) else "left")
    expert_sets = [s for s in result.evaluation.sets if s.expert]
    for s in expert_sets:
        t.add_column(f"NAI {s.name}", justify="right")
    for i, r in enumerate(result.rates, 1):
        by = {x.set: x for x in r.sets}
        pct = lambda v: "—" if v is None else f"{100 * v:+.1f}%"  # noqa: E731
        t.add_row(str(i), r.model, fmt(r.mean_nai), fmt(r.mean_normalized_score), pct(r.mean_gain_over_best), pct(r.mean_forgetting), f"{r.p_beats_base:.2f}", *(fmt(by[s.name].nai) for s in expert_sets))
    out.print(t)
    for r in result.rates[:1]:
        for note in r.notes:
            err.print(f"[yellow]note:[/] {note}", highlight=False)


def save_outputs(out: Console, err: Console, payload: dict, save: Optional[Path], report: Optional[Path], as_json: bool) -> None:
    """`--save` (JSON for `alloy report`), `--report` (HTML) and `--json` (stdout) of one result."""
    if save is not None:
        save.write_text(json.dumps(payload, indent=1, default=str))
    if report is not None:
        from modelalloy.report import write_report

        write_report([payload], report)
        err.print(f"report: {report}", highlight=False)
    if as_json:
        out.print_json(json.dumps(payload, default=str))
