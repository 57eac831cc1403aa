"""Terminal tables: every method name and number whole at 80 and at 200 columns."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from modelalloy.evaluate import EvalSet, SetInfo, merge_rate
from modelalloy.evaluate.bootstrap import Bootstrap, percentile_interval, statistic, value
from modelalloy.evaluate.rate import rank
from modelalloy.evaluate.runner import EvalResult, RateResult
from modelalloy.report import tables

METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della"]
DOMAINS = ["shakespeare", "german", "spanish", "code"]


def _result() -> RateResult:
    rng = np.random.default_rng(0)
    boot = Bootstrap(resamples=200)
    models = ["base", *(f"ft-{d}" for d in DOMAINS), *METHODS]
    sets = [EvalSet(name=d, texts=("x",), expert=f"ft-{d}") for d in DOMAINS] + [EvalSet(name="news", texts=("x",))]
    ev = EvalResult(sets, bootstrap=boot)
    draws, table = {}, {}
    for s in sets:
        tokens = rng.integers(100, 300, size=64)
        base = rng.gamma(8.0, 0.4, size=64)
        counts = boot.counts(s.name, 64)
        for m in models:
            shift = -0.6 if m == f"ft-{s.name}" else (0.05 if m.startswith("ft-") else rng.uniform(-0.3, 0.0))
            units = {"kind": "perplexity", "unit": "document", "nll": ((base + shift + rng.normal(0, 0.05, 64)) * tokens).tolist(), "tokens": tokens.tolist()}
            d = statistic(units, counts)
            table.setdefault(m, {})[s.name] = value(units)
            draws.setdefault(m, {})[s.name] = d
            ev.scores.setdefault(m, {})[s.name] = {"score": value(units), "value": value(units), "ci95": percentile_interval(d), "n_units": 64, "units": units}
    infos = [SetInfo(s.name, False, s.expert) for s in sets]
    parents = [f"ft-{d}" for d in DOMAINS]
    rates = rank([merge_rate(table, merged=m, base="base", parents=parents, sets=infos, draws=draws) for m in METHODS])
    return RateResult(None, ev, "base", parents, rates)


def _render(renderables, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    for r in renderables:
        console.print(r)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 200])
def test_no_name_or_number_is_cut(width):
    result = _result()
    built = tables.score_tables(result.evaluation, width=width) + tables.rate_tables(result, width=width)
    text = _render(built, width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    for name in [*METHODS, "ft-shakespeare", "ft-spanish", *DOMAINS, "news"]:
        assert name in text, name  # whole, on one line
    # Every interval printed whole: the merge rate's mean NAI of each method, as the library has it.
    for r in result.rates:
        assert f"{r.mean_nai:.3f} ± {(r.mean_nai_ci95[1] - r.mean_nai_ci95[0]) / 2:.3f}" in text
    if width == 80:
        assert "(1/" in text  # too wide for 80 columns: split into parts, not truncated
    else:
        assert "(1/" not in text.split("merge rate")[1].split("\n")[0]


def test_specialist_table_and_legend_fit():
    rows = [{"name": f"ft-{d}", "set": d, "base": 40.123, "base_ci95": [38.0, 42.2], "specialist": 25.5, "specialist_ci95": [24.0, 27.1], "gain": 0.364,
             "vs_base": {"delta": -14.6, "ci95": [-15.2, -14.0], "p_better": 1.0}, "steps": 48, "better": True} for d in DOMAINS]
    text = _render(tables.specialist_tables(rows, width=80), 80)
    assert "…" not in text and all(f"ft-{d}" in text for d in DOMAINS) and "-14.60 [-15.20, -14.00]" in text
    assert any("not distinguishable" in line for line in tables.legend(_result()))
