"""`alloy verify`: a whole output passes; each kind of damage is found and named."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from alloy_helpers import assert_one_line_error, copy_model, rewrite_weights, run_alloy, write_config

import modelalloy
from modelalloy.errors import CheckpointError
from modelalloy.io.manifest import MANIFEST
from modelalloy.verify import verify_checkpoint


@pytest.fixture()
def merged(tmp_path, llama):
    config = {
        "merge_method": "ties",
        "base_model": str(llama["base"]),
        "models": [{"model": str(llama[m]), "parameters": {"density": 0.5, "weight": 0.5}} for m in ("ft_dense", "ft_sparse")],
    }
    cfg = write_config(tmp_path / "merge.yaml", config)
    result = modelalloy.merge(cfg, tmp_path / "out", max_shard_size="20KB")
    return cfg, tmp_path / "out", result


def test_a_whole_output_verifies(merged):
    cfg, out, result = merged
    report = verify_checkpoint(out, config=cfg)
    assert report.problems == []
    assert report.tensors == result.tensors == report.planned_checked == 39
    assert report.hashes_checked == len(result.files) > 1
    assert report.data_bytes == result.bytes_written


def test_any_hf_checkpoint_verifies(tmp_path, llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama["base"])
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # transformers' own sharding and index
    report = verify_checkpoint(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() and len(report.files) > 1
    assert report.problems == [] and report.hashes_checked == 0 and report.tensors == 39


def test_a_changed_byte_fails_the_shard_hash(merged):
    _, out, result = merged
    shard = out / result.files[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_checkpoint(out)
    assert report.problems == [f"{result.files[1]}: BLAKE3 digest differs from the one recorded when it was written; the file was changed or damaged"]
    assert report.hashes_checked == len(result.files) - 1


def test_appended_bytes_and_a_missing_shard(merged):
    _, out, result = merged
    with open(out / result.files[0], "ab") as f:
        f.write(b"\0" * 8)
    (out / result.files[2]).unlink()
    problems = verify_checkpoint(out).problems
    assert any("8 bytes after the last tensor" in p for p in problems)
    assert any(f"lists shard {result.files[2]!r}, which is missing" in p for p in problems)
    assert any(f"{result.files[2]}: recorded in {MANIFEST} but missing" in p for p in problems)


def test_index_out_of_step_with_the_headers(merged):
    _, out, _ = merged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.layers.9.ghost.weight"] = next(iter(index["weight_map"].values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = verify_checkpoint(out).problems
    assert any("holds tensor 'model.norm.weight' but the index does not list it" in p for p in problems)
    assert any("lists tensor 'model.layers.9.ghost.weight'" in p and "header does not have it" in p for p in problems)


def test_nan_in_a_checkpoint_is_reported(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "nan")
    rewrite_weights(model, lambda s: s["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")))
    assert verify_checkpoint(model).problems == ["tensors holding NaN or Inf: model.layers.0.mlp.up_proj.weight"]
    assert verify_checkpoint(model, read_data=False).problems == []


def test_planned_tensors_must_all_be_there(tmp_path, merged, llama):
    cfg, _, _ = merged
    out = tmp_path / "single"
    modelalloy.merge(cfg, out)  # one file, so that a tensor can be dropped without an index
    (out / MANIFEST).unlink()
    rewrite_weights(out, lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    rewrite_weights(out, lambda s: s.__setitem__("model.norm.weight", torch.zeros(32, dtype=torch.float16)))
    problems = verify_checkpoint(out, config=cfg).problems
    assert "tensor 'model.layers.1.self_attn.k_proj.weight' is planned by" in problems[0] and problems[0].endswith("but missing from the output")
    assert problems[1] == "tensor 'model.norm.weight': planned float32 [32], found float16 [32]"
    stacked = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(llama["base"]), "layer_range": [0, 3]}]}]}
    extra = verify_checkpoint(tmp_path / "single", config=write_config(tmp_path / "three.yaml", stacked)).problems
    assert any("'model.layers.3.mlp.up_proj.weight' is in the output but not in the plan" in p for p in extra)


def test_not_a_directory_is_a_user_error(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: not a directory"):
        verify_checkpoint(tmp_path / "nowhere")


def test_cli_verify(merged):
    cfg, out, result = merged
    ok = run_alloy("verify", out, "--config", cfg)
    assert ok.returncode == 0, ok.stderr
    assert f"ok: 39 tensors in {len(result.files)} file(s), {len(result.files)} shard hash(es) matched, 39 planned tensors present" in ok.stderr
    (out / result.files[0]).write_bytes((out / result.files[0]).read_bytes()[:-4])
    bad = run_alloy("verify", out)
    assert bad.returncode == 1
    assert any(line.startswith("problem:") and result.files[0] in line for line in bad.stderr.splitlines()), bad.stderr
    assert_one_line_error(run_alloy("verify", out / "missing"), "missing: not a directory")
