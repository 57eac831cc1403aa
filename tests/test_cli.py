"""The `alloy` command: in-process with typer's runner, plus one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from modelalloy.cli import app
from modelalloy.io.spans import BUFFER_BUDGET

runner = CliRunner()


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ties_config(p) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "models": [{"model": str(p["ft_dense"]), "parameters": {"density": 0.5, "weight": 0.5}}, {"model": str(p["ft_flip"]), "parameters": {"density": 0.5, "weight": 0.5}}],
    }


def test_merge_and_json_summary(tmp_path, llama):
    cfg = write_config(tmp_path, ties_config(llama))
    result = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors"] == len(load_file(tmp_path / "out" / "model.safetensors"))


def test_plan_reports_counts_and_writes_nothing(tmp_path, llama):
    cfg = write_config(tmp_path, ties_config(llama))
    result = runner.invoke(app, ["plan", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors"] == len(load_file(llama["base"] / "model.safetensors"))
    assert summary["output_bytes"] == sum(t.numel() * t.element_size() for t in load_file(llama["base"] / "model.safetensors").values())
    assert summary["layers"] == 4
    # TIES streams: a few blocks per worker, and the buffers cold inputs are read ahead into.
    assert summary["peak_memory_bytes"] >= 400 * 2**20 + BUFFER_BUDGET
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def edit(config, **changes):
    return {**config, **changes}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c, p: edit(c, merge_method="tie"), "unknown method 'tie' (did you mean 'ties'"),
        (lambda c, p: edit(c, parameters={"densty": 0.5}), "unknown parameter 'densty' for ties (did you mean 'density'?)"),
        (lambda c, p: edit(c, models=[{"model": str(p["ft_dense"]), "parameters": {"lambda": 2}}]), "'lambda' is a global parameter"),
        (lambda c, p: {k: v for k, v in c.items() if k != "base_model"}, "ties needs a base_model"),
        (lambda c, p: edit(c, merge_method="slerp", parameters={"t": 0.5}, models=[{"model": str(p["ft_dense"])}, {"model": str(p["ft_flip"])}]), "slerp takes exactly 1 model(s) besides the base, got 2"),
        (lambda c, p: edit(c, merge_method="linear", models=[{"model": str(p["ft_dense"]), "parameters": {"weight": 1}}, {"model": str(p["ft_flip"]), "parameters": {"weight": -1}}]), "sum to 0"),
        (lambda c, p: edit(c, merge_method="linear", models=[{"model": str(p["ft_dense"])}]), "missing required parameter 'weight'"),
        (lambda c, p: edit(c, parameters={"density": 1.5}), "parameters.density: density=1.5 is outside (0.0, 1.0]"),
        (lambda c, p: edit(c, base_model=str(p["base"]) + "-nope"), "model directory not found"),
        (
            lambda c, p: {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(p["base"]), "layer_range": [2, 9]}]}]},
            "layer_range [2, 9) is outside",
        ),
    ],
)
def test_bad_configs_are_one_line_exit_2(tmp_path, llama, change, message):
    cfg = write_config(tmp_path, change(ties_config(llama), llama))
    for command in (["plan", str(cfg)], ["merge", str(cfg), str(tmp_path / "out")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in " ".join(result.stderr.split()), result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def clone_with(tmp_path: Path, src: Path, name: str, edit_state=None, edit_config=None) -> Path:
    dst = tmp_path / name
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    if edit_state:
        edit_state(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_missing_tensor_and_shape_mismatch_name_the_tensor(tmp_path, llama):
    missing = clone_with(tmp_path, llama["ft_dense"], "missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    cfg = write_config(tmp_path, edit(ties_config(llama), models=[{"model": str(missing)}, {"model": str(llama["ft_flip"])}]))
    result = runner.invoke(app, ["plan", str(cfg)])
    assert result.exit_code == 2 and "'model.layers.1.mlp.up_proj.weight' is missing from" in result.stderr

    def grow_vocab(s):
        s["model.embed_tokens.weight"] = torch.zeros(130, 32)

    bigger = clone_with(tmp_path, llama["ft_dense"], "bigger", grow_vocab)
    cfg = write_config(tmp_path, edit(ties_config(llama), models=[{"model": str(bigger)}, {"model": str(llama["ft_flip"])}]))
    result = runner.invoke(app, ["plan", str(cfg)])
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "shape [130, 32]" in text and "[128, 32]" in text and "tokenizer" in text


def test_different_architectures_need_allow_crimes(tmp_path, llama):
    other = clone_with(tmp_path, llama["ft_dense"], "other", edit_config=lambda c: c.update(architectures=["MistralForCausalLM"]))
    cfg = write_config(tmp_path, edit(ties_config(llama), models=[{"model": str(other)}, {"model": str(llama["ft_flip"])}]))
    result = runner.invoke(app, ["plan", str(cfg)])
    assert result.exit_code == 2 and "different architectures" in result.stderr
    assert runner.invoke(app, ["plan", str(cfg), "--allow-crimes"]).exit_code == 0


def test_t_outside_unit_interval_warns(tmp_path, llama):
    cfg = write_config(tmp_path, {"merge_method": "slerp", "base_model": str(llama["base"]), "models": [{"model": str(llama["ft_dense"])}], "parameters": {"t": 1.2}})
    result = runner.invoke(app, ["plan", str(cfg)])
    assert result.exit_code == 0 and "t=1.2 is outside [0, 1]" in " ".join(result.stderr.split())


def test_methods_listing_and_unknown_method():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "dare_ties" in result.stdout
    result = runner.invoke(app, ["methods", "ties"])
    assert "density" in result.stdout and "2306.01708" in result.stdout
    result = runner.invoke(app, ["methods", "slerpp"])
    assert result.exit_code == 2 and "did you mean 'slerp'" in result.stderr


def test_real_subprocess_progress_and_error_exit_code(tmp_path, llama):
    cfg = write_config(tmp_path, ties_config(llama))
    cmd = [sys.executable, "-m", "modelalloy.cli"]
    ok = subprocess.run([*cmd, "merge", str(cfg), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stderr and (tmp_path / "out" / "config.json").exists()
    again = subprocess.run([*cmd, "merge", str(cfg), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr and "Traceback" not in again.stderr


def test_the_demo_commands_default_to_the_demos_domains_and_methods():
    import inspect

    from modelalloy.apps.demo import DOMAINS, METHODS
    from modelalloy.cli import studies

    for command in (studies.demo, studies.demo_study):
        assert inspect.signature(command).parameters["domains"].default == ",".join(DOMAINS), command.__name__
    assert inspect.signature(studies.demo).parameters["methods"].default == ",".join(METHODS)
