"""`alloy eval`, `rate` and `analyze` in-process: exit codes, one-line errors, saved results."""

from __future__ import annotations

import json
import re

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


def test_rate_tables_fit_80_columns_with_every_method_whole(lm_family, tmp_path):
    docs = "\n".join(f"Line {i}: shall I compare thee to a summer's day?" for i in range(30))
    (tmp_path / "t.txt").write_text(docs)
    (tmp_path / "evals.yaml").write_text(yaml.safe_dump({"sets": [
        {"name": "verse", "path": "t.txt", "max_tokens": 600, "window": 40, "expert": str(lm_family["ft_a"])},
        {"name": "control", "path": "t.txt", "max_tokens": 400, "window": 40}]}))
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(lm_family["base"]),
                                   "models": [{"model": str(lm_family["ft_a"]), "parameters": {"weight": 1.0, "density": 0.5}},
                                              {"model": str(lm_family["ft_b"]), "parameters": {"weight": 1.0, "density": 0.5}}]}))
    methods = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della"]
    for width in (80, 200):
        result = CliRunner(env={"COLUMNS": str(width)}).invoke(app, ["rate", str(cfg), "--eval", str(tmp_path / "evals.yaml"), "--methods", ",".join(methods),
                                                                      "--resamples", "200", "--cache", str(tmp_path / "s.json")])
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert "…" not in out and "±" in out
        assert max(len(line) for line in out.splitlines()) <= width
        for m in methods:  # each name whole, as a word of its own (ties is not only inside dare_ties)
            assert re.search(rf"(?<!\w){m}(?!\w)", out), m
    result = CliRunner().invoke(app, ["rate", str(cfg), "--eval", str(tmp_path / "evals.yaml"), "--resamples", "0"])
    assert result.exit_code == 2 and "--resamples 0: give at least 1" in result.output
