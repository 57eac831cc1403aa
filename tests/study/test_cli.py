"""`alloy study --quick` and `alloy analyze --study` in-process, on the tiny specialists."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from modelalloy.cli import app, common


def test_study_command_and_analyze_with_its_prediction(study_yaml, study_models, tmp_path, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(common, "out", Console(width=200, force_terminal=False))
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", str(study_yaml), str(out), "--quick"])
    assert result.exit_code == 0, result.output
    for name in ("study.json", "study.html", "nai_vs_k.png", "nai_vs_strength.png", "merge_vs_fusion.png", "coherence.png", "cross_entropy_vs_k.png"):
        assert (out / name).is_file(), name
    for text in ("mean NAI over expert subsets", "task_arithmetic", "oracle_routing (fusion)", "sign_conflict", "Spearman"):
        assert text in result.output
    html = (out / "study.html").read_text()
    assert "What predicts a failed merge" in html and html.count("<img") >= 5

    ft = [str(p[1]) for p in study_models["specialists"].values()][:2]
    result = runner.invoke(app, ["analyze", str(study_models["base"]), *ft, "--study", str(out / "study.json"), "--save", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    assert "the merge rate these diagnostics predict" in result.output and "predicted NAI" in result.output
    saved = json.loads((tmp_path / "a.json").read_text())
    rows = {r["diagnostic"]: r for r in saved["prediction"]}
    assert rows["sign_conflict"]["predicted_nai"] is not None and rows["mean_cka"]["value"] is None

    result = runner.invoke(app, ["analyze", str(study_models["base"]), *ft, "--study", str(tmp_path / "a.json")])
    assert result.exit_code == 2 and "not a study.json" in result.output

    study_json = json.loads((out / "study.json").read_text())
    method = study_json["runs"][0]["method"]
    result = runner.invoke(app, ["analyze", str(study_models["base"]), *ft, "--study", str(out / "study.json"), "--method", method,
                                 "--save", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    within = {p["diagnostic"]: p["by_method"][method] for p in study_json["prediction"]}
    for row in json.loads((tmp_path / "m.json").read_text())["prediction"]:
        want = within[row["diagnostic"]]
        assert row["n"] == want["n"] and (row["spearman_rho"] is None) == (want["spearman_rho"] is None)
        if want["spearman_rho"] is not None:
            assert row["spearman_rho"] == pytest.approx(want["spearman_rho"], nan_ok=True)
    result = runner.invoke(app, ["analyze", str(study_models["base"]), *ft, "--study", str(out / "study.json"), "--method", "slerp"])
    assert result.exit_code == 2 and "--method slerp" in result.output



def test_study_charts_give_each_method_its_own_colour_and_each_strength_its_own_line():
    from modelalloy.report.study_view import _style

    methods = ["linear", "ties", "della", "task_arithmetic", "dare_ties", "dare_linear", "moe (fusion)", "ensemble (fusion)", "oracle_routing (fusion)"]
    strengths = ["50% of training", "100% of training"]
    styles = {(m, st): _style(m, st, methods, strengths) for m in methods for st in strengths}
    assert len({styles[m, strengths[0]]["color"] for m in methods}) == len(methods)  # nine series colours, none repeated
    for m in methods:
        half, full = styles[m, strengths[0]], styles[m, strengths[1]]
        assert half["color"] == full["color"] and half["linestyle"] != full["linestyle"] and half["marker"] != full["marker"]
