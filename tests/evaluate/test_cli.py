"""`alloy eval`, `rate` and `analyze` in-process: exit codes, one-line errors, saved results."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from modelalloy.cli import app


def _evals(tmp_path, expert=None):
    (tmp_path / "t.txt").write_text("Shall I compare thee to a summer's day? " * 4)
    s = {"name": "verse", "path": "t.txt", "max_tokens": 80, "window": 40}
    if expert:
        s["expert"] = expert
    (tmp_path / "evals.yaml").write_text(yaml.safe_dump({"sets": [s]}))
    return tmp_path / "evals.yaml"


def test_eval_and_rate_commands(lm_family, tmp_path):
    runner = CliRunner()
    evals = _evals(tmp_path, expert=str(lm_family["ft_a"]))
    result = runner.invoke(app, ["eval", str(lm_family["base"]), "--eval", str(evals), "--save", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["kind"] == "eval" and saved["scores"][str(lm_family["base"])]["verse"]["tokens"] == 79
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(lm_family["base"]),
                                   "models": [{"model": str(lm_family["ft_a"]), "parameters": {"weight": 0.5}},
                                              {"model": str(lm_family["ft_b"]), "parameters": {"weight": 0.5}}]}))
    result = runner.invoke(app, ["rate", str(cfg), "--eval", str(evals), "--methods", "linear,ties", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [r["model"] for r in payload["rates"]] != [] and {r["model"] for r in payload["rates"]} == {"linear", "ties"}


def test_user_mistakes_are_one_line_and_exit_2(lm_family, tmp_path):
    runner = CliRunner()
    evals = _evals(tmp_path)
    result = runner.invoke(app, ["eval", str(tmp_path), "--eval", str(evals)])
    assert result.exit_code == 2
    assert "not a model directory" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["eval", str(lm_family["base"]), "--eval", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "evals file not found" in result.output
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(lm_family["ft_a"]), "parameters": {"weight": 1}}]}))
    result = runner.invoke(app, ["rate", str(cfg), "--eval", str(evals)])
    assert result.exit_code == 2 and "needs a config with base_model" in result.output


def test_analyze_command_prints_and_reports(lm_family, tmp_path):
    result = CliRunner().invoke(app, ["analyze", str(lm_family["base"]), str(lm_family["ft_a"]), str(lm_family["ft_b"]), "--layers", "--report", str(tmp_path / "a.html")])
    assert result.exit_code == 0, result.output
    assert "sign-conflict rate" in result.output and "per layer" in result.output
    assert (tmp_path / "a.html").read_text().count("data:image/png") >= 5
