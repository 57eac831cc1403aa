"""The terminal side of results: score and merge-rate tables (rich), and saving a command's results.

Used by `alloy eval`, `rate` and `demo`; the consoles to print through are passed in (`out` for
the tables and JSON, `err` for notes, warnings and where a report was written). Tables come from
`report.tables`: every score with its interval, never a name or number cut at any width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from modelalloy.report import tables

if TYPE_CHECKING:
    from rich.console import Console


def fmt(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def print_warnings(err: Console, warnings: list[str]) -> None:
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True, markup=True)


def print_scores(out: Console, evaluation, title: str = "scores") -> None:
    """Models × sets, ``value ± half-width`` of each 95 % interval."""
    for t in tables.score_tables(evaluation, width=out.width, title=title):
        out.print(t)


def print_rates(out: Console, err: Console, result) -> None:
    print_scores(out, result.evaluation, title=f"per-set scores (base: {result.base})")
    for t in tables.rate_tables(result, width=out.width):
        out.print(t)
    for line in tables.legend(result):
        out.print(line, highlight=False)
    print_warnings(err, result.evaluation.warnings)
    for r in result.rates:
        for note in r.notes:
            err.print(f"[yellow]note:[/] {r.model}: {note}", highlight=False, soft_wrap=True)


def print_specialists(out: Console, specialists: list[dict]) -> None:
    for t in tables.specialist_tables(specialists, width=out.width):
        out.print(t)


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
