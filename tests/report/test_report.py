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
from modelalloy.report import Report, write_report

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
    assert len(images) >= 7  # scores, NAI, cosine heatmap, 3 per-layer lines, conflict heatmap, concentration
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
    assert (tmp_path / "r.html").read_text().count("data:image/png") == 2


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
