"""The HTML report: self-contained, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image
from typer.testing import CliRunner

from modelalloy.cli import app
from modelalloy.evaluate import SetInfo, merge_rate
from modelalloy.evaluate.bootstrap import Bootstrap, percentile_interval, statistic, value
from modelalloy.evaluate.rate import rank
from modelalloy.report import Report, plots, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync"]

SCORES = {"base": {"code": 10.0, "poems": 20.0, "news": 8.0}, "coder": {"code": 6.0, "poems": 22.0, "news": 8.4},
          "poet": {"code": 11.0, "poems": 12.0, "news": 8.8}, "ties": {"code": 7.0, "poems": 16.0, "news": 8.2},
          "linear": {"code": 8.0, "poems": 15.0, "news": 8.1}}
SETS = [SetInfo("code", False, "coder"), SetInfo("poems", False, "poet"), SetInfo("news", False)]


def _rate_payload() -> dict:
    ev = {"kind": "eval", "sets": [{"name": s.name, "metric": "perplexity", "higher_is_better": False, "expert": s.expert} for s in SETS],
          "scores": {m: {s: {"score": v, "perplexity": v} for s, v in row.items()} for m, row in SCORES.items()}}
    rates = [merge_rate(SCORES, merged=m, base="base", parents=["coder", "poet"], sets=SETS).summary() for m in ("ties", "linear")]
    return {"kind": "rate", "config": {"merge_method": "ties", "base_model": "base", "models": [{"model": "coder"}, {"model": "poet"}]},
            "base": "base", "parents": ["coder", "poet"], "evaluation": ev, "rates": rates}


def _measured_payload() -> dict:
    """A rate result as `alloy rate` saves it, with intervals: per-unit NLLs, paired resamples."""
    import numpy as np

    rng = np.random.default_rng(0)
    shift = {"code": {"base": 0, "coder": -0.5, "poet": 0.05, "ties": -0.3, "linear": -0.29, "task_arithmetic": -0.1},
             "poems": {"base": 0, "coder": 0.05, "poet": -0.4, "ties": -0.25, "linear": -0.26, "task_arithmetic": -0.1},
             "news": {"base": 0, "coder": 0.02, "poet": 0.03, "ties": 0.01, "linear": 0.0, "task_arithmetic": 0.02}}
    boot = Bootstrap(resamples=300)
    scores, draws, ev_scores = {}, {}, {}
    for s, by_model in shift.items():
        tokens = rng.integers(20, 200, size=40)
        base = rng.gamma(6.0, 0.4, size=40)
        counts = boot.counts(s, 40)
        for m, d in by_model.items():
            units = {"kind": "perplexity", "nll": ((base + d + rng.normal(0, 0.02, 40)) * tokens).tolist(), "tokens": tokens.tolist()}
            v, dr = value(units), statistic(units, counts)
            scores.setdefault(m, {})[s] = v
            draws.setdefault(m, {})[s] = dr
            ev_scores.setdefault(m, {})[s] = {"score": v, "perplexity": v, "value": v, "ci95": percentile_interval(dr), "n_units": 40, "n_tokens": int(tokens.sum())}
    merges = ["ties", "linear", "task_arithmetic"]
    rates = rank([merge_rate(scores, merged=m, base="base", parents=["coder", "poet"], sets=SETS, draws=draws) for m in merges])
    ev = {"kind": "eval", "bootstrap": {"resamples": 300, "seed": 0, "interval": "95 % percentile"},
          "sets": [{"name": s.name, "metric": "perplexity", "higher_is_better": False, "expert": s.expert} for s in SETS],
          "scores": ev_scores, "warnings": ["eval set 'tiny' has 3 documents, too few for an interval (fewer than 10)"]}
    return {"kind": "rate", "config": {"merge_method": "ties"}, "base": "base", "parents": ["coder", "poet"], "evaluation": ev,
            "rates": [r.summary() | {"config": {"merge_method": r.model, "base_model": "base", "models": [{"model": "coder"}, {"model": "poet"}]}} for r in rates]}


def test_report_shows_intervals_ties_every_config_and_error_bars_on_every_plot(tmp_path, monkeypatch):
    payload = _measured_payload()
    calls = []
    real = plots.grouped_bars
    monkeypatch.setattr(plots, "grouped_bars", lambda *a, **k: calls.append(k) or real(*a, **k))
    html = write_report([payload], tmp_path / "r.html").read_text()
    assert calls and all(k.get("errors") for k in calls)  # every score plot draws its intervals
    assert "±" in html and "95 % bootstrap interval" in html and "300 resamples" in html
    ties = payload["rates"][0]
    assert ties["model"] in ("ties", "linear") and ties["vs_next"]["ci95"][0] <= 0  # ties and linear: inside the noise
    assert "≈2" in html  # ... so the second is marked as not distinguishable from the first
    for merge in ("ties", "linear", "task_arithmetic"):
        assert f"config of {merge}" in html and f"merge_method: {merge}" in html
    assert "too few for an interval" in html
    # Error bars change the picture: the same bars without intervals draw a different PNG.
    values = {"code": {"a": 5.0, "b": 6.0}}
    assert real(values, title="t", ylabel="y") != real(values, title="t", ylabel="y", errors={"code": {"a": [4.0, 6.0], "b": [5.5, 6.5]}})


def _browser(html_path, tmp_path, name: str) -> tuple[bytes, list[str]]:
    """Screenshot PNG and the console lines Chromium logged while showing `html_path`."""
    shot = tmp_path / f"{name}.png"
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / ('profile-' + name)}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1200,1600", html_path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return (shot.read_bytes() if shot.exists() else b""), console


def _checkpoints(root) -> list[str]:
    """A base and two 'fine-tunes' of three layers of two matrices each: enough for every plot."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.{n}.weight": torch.randn(8, 6, generator=g) for i in range(3) for n in ("mlp.up_proj", "self_attn.q_proj")}
    dirs = []
    for name, scale in (("base", 0.0), ("a", 0.1), ("b", 0.1)):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}, d / "model.safetensors")
        dirs.append(str(d))
    return dirs


def test_report_is_self_contained_with_real_pngs(tmp_path):
    from modelalloy.analyze import analyze

    base, a, b = _checkpoints(tmp_path)
    an = analyze(base, [a, b], labels=["dense", "flip"]).to_json()
    path = write_report([_rate_payload(), an], tmp_path / "r.html", title="merge <study>")
    html = path.read_text()
    assert "<title>merge &lt;study&gt;</title>" in html
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)  # nothing fetched from anywhere
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 8  # scores, NAI, mean NAI, cosine heatmap, 3 per-layer lines, conflict heatmap, concentration
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG" and img.width > 200 and img.height > 150
    assert "sign conflict" in html and "mean NAI" in html and "0.75" in html  # ties' NAI on code is 3/4


def test_report_cli_rejects_what_is_not_a_result(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    result = CliRunner().invoke(app, ["report", str(bad), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 2
    assert "not a modelalloy results file" in result.output
    good = tmp_path / "rate.json"
    good.write_text(json.dumps(_rate_payload()))
    result = CliRunner().invoke(app, ["report", str(good), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").read_text().count("data:image/png") == 3  # scores, NAI per set, mean NAI


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: scripts/setup.sh installs Debian's chromium where apt-get is available")
def test_report_renders_in_headless_chromium_without_console_errors(tmp_path):
    path = write_report([_rate_payload()], tmp_path / "r.html")
    png, console = _browser(path, tmp_path, "report")
    assert console == []
    img = Image.open(io.BytesIO(png)).convert("L")
    assert img.size == (1200, 1600)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # text and plots on the page, not a blank screenshot
    # The same check does catch a page that logs errors (so an empty console list means something).
    bad = Report("bad")
    bad.blocks.append("<script>console.error('broken-report')</script>")
    _, console = _browser(bad.write(tmp_path / "bad.html"), tmp_path, "bad")
    assert any("broken-report" in line for line in console)
