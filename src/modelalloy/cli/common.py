"""What every `alloy` command shares: the two consoles, errors as exit codes, warnings, option help.

The consoles are read as attributes of this module at print time (`common.out.print(...)`, never
`from modelalloy.cli.common import out`): there is one of each, and replacing it here (a test
widening `out`, say) reaches every command.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from modelalloy.engine import MergeOptions

err = Console(stderr=True)
out = Console()


def option_help(field: str) -> str:
    """The help of a flag that sets a `MergeOptions` field: that field's description."""
    return MergeOptions.model_fields[field].description or ""


DEFAULTS = MergeOptions()

SaveOpt = Annotated[Optional[Path], typer.Option("--save", help="write the results as JSON (for `alloy report`)")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="write a self-contained HTML report")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the results as JSON")]
# A study's merges on Ray (`alloy study`, `alloy demo-study`).
RayOpt = Annotated[bool, typer.Option("--ray", help="measure the merges on Ray actors, one CPU each (a local Ray instance)")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="join an existing Ray cluster")]
WorkersOpt = Annotated[int, typer.Option(help="Ray actors of a local instance")]


class State:
    debug = False


def app_callback(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")] = False) -> None:
    """The options of `alloy` itself, before the command."""
    State.debug = debug
    from modelalloy.engine import keep_freed_buffers

    keep_freed_buffers()
    # The hundreds of thousands of objects torch's import made live as long as the process: out
    # of the collector's way, its full passes stop walking them during a merge (1.1B linear merge:
    # 0.4 s of 4.8 s).
    gc.freeze()


def fail(e: Exception) -> NoReturn:
    """A user error: one line on stderr and exit code 2 (with `--debug`, the traceback)."""
    if State.debug:
        raise e
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def show_warnings(caught: list[warnings.WarningMessage], quiet: bool) -> None:
    if quiet:
        return
    for w in caught:
        err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)


def eval_progress(label: str = "scoring"):
    """A rich progress bar and the callback the evaluate library reports to."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[unit]}"),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err, transient=False)
    tasks: dict[str, int] = {}

    def on_progress(name: str, done: int, total: int) -> None:
        # Scoring labels say what they count (evaluate.runner.ProgressLabel): tokens, items.
        unit = getattr(name, "unit", "")
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total, unit=unit, rate="")
        bar.update(tasks[name], completed=done, total=total)
        speed = bar.tasks[tasks[name]].speed if unit else None
        if speed:
            bar.update(tasks[name], rate=f"{speed:,.0f} {unit}/s")

    return bar, on_progress
