"""The benchmark's model sizes and its multi-size (scaling) mode, without running a benchmark:
the 7B shape and sharding, the tensor-by-tensor shard writer against safetensors' own, the
disk-space refusal, and the scaling report on made-up results."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import run as bench_run  # noqa: E402
import scaling  # noqa: E402
import synth  # noqa: E402

# A shape small enough to write in milliseconds, with several shards.
MINI = synth.LlamaSize("mini", 64, 96, 3, 4, 2, 128, 40_000)


def test_7b_has_llama2_7b_shapes_and_sharding():
    size = synth.SIZES["7b"]
    assert size.parameters == 6_738_415_616  # Llama-2-7b-hf's count
    assert size.largest_tensor_bytes == 32000 * 4096 * 2
    shapes = dict(size.tensor_shapes())
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (4096, 4096)  # no grouped-query attention
    assert shapes["model.layers.31.mlp.down_proj.weight"] == (4096, 11008)
    # As meta-llama's checkpoint: 9.98 GB (embeddings, layers 0-23) and 3.50 GB.
    shards = size.shards()
    assert [round(sum(math.prod(s) * 2 for _, s in shard) / 1e9, 2) for shard in shards] == [9.98, 3.50]
    assert shards[0][-1][0] == "model.layers.23.post_attention_layernorm.weight"
    assert shards[1][0][0] == "model.layers.24.self_attn.q_proj.weight" and shards[1][-1][0] == "lm_head.weight"
    assert size.config()["num_key_value_heads"] == 32


def test_shards_are_the_bytes_save_file_writes(tmp_path):
    for variant in (0, 1):
        out = tmp_path / f"v{variant}"
        synth.write_model(out, MINI, variant)
        shards = MINI.shards()
        assert len(shards) > 2
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == MINI.model_bytes
        for k, shard in enumerate(shards, 1):
            file = out / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: (synth._base_tensor(n, s) if variant == 0 else synth._variant_tensor(n, s, variant)).to(torch.bfloat16) for n, s in shard}
            save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
            assert file.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
            assert {n: file.name for n, _ in shard}.items() <= index["weight_map"].items()
            with safe_open(str(file), "pt") as f:
                assert torch.equal(f.get_tensor(shard[0][0]), tensors[shard[0][0]])


def test_bytes_to_generate_counts_what_is_missing(tmp_path):
    assert synth.bytes_to_generate(tmp_path, MINI, 2) == 3 * MINI.model_bytes
    synth.write_model(tmp_path / "mini" / "base", MINI, 0)  # an interrupted generation: base only
    present = sum(f.stat().st_size for f in (tmp_path / "mini" / "base").glob("*.safetensors"))
    assert synth.bytes_to_generate(tmp_path, MINI, 2) == 3 * MINI.model_bytes - present
    synth.ensure_models(tmp_path, MINI, 2, log=lambda _: None)
    assert synth.models_ready(tmp_path, MINI, 2)
    assert synth.bytes_to_generate(tmp_path, MINI, 2) == 0


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    """The benchmark's cache moved to a folder that does not exist yet; mergekit never installed."""
    cache = tmp_path / "cache" / "bench"
    monkeypatch.setattr(bench_run, "CACHE", cache)

    def no_install(venv):
        raise AssertionError("ensure_mergekit called")

    monkeypatch.setattr(bench_run, "ensure_mergekit", no_install)
    return cache


def _free(monkeypatch, free_bytes: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free_bytes, free_bytes))


def test_refuses_in_one_line_when_the_disk_is_short(empty_cache, monkeypatch, capsys, tmp_path):
    _free(monkeypatch, 60 * 10**9)
    rc = bench_run.main(["--sizes", "tiny,1b,7b", "--mergekit-methods", "7b=linear,ties", "--results", str(tmp_path / "results")])
    assert rc == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "needs 77.5 GB" in err and "60.0 GB free" in err and "7b models to generate 40.4 GB" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()  # nothing written


def test_needs_inputs_two_outputs_venv_and_margin(empty_cache):
    size = synth.SIZES["7b"]
    needs = bench_run.disk_needs(["7b"], [], 2)
    assert needs == {"7b models to generate": 3 * size.model_bytes, "outputs at once": 2 * size.model_bytes, "mergekit's venv": bench_run.MERGEKIT_VENV_BYTES, "margin": bench_run.DISK_MARGIN_BYTES}
    assert bench_run.disk_needs(["tiny"], ["7b"], 2)["outputs at once"] == size.model_bytes  # the RSS check keeps one


def test_plan_prints_the_7b_path_and_writes_nothing(empty_cache, monkeypatch, capsys, tmp_path):
    _free(monkeypatch, 100 * 10**9)
    assert bench_run.main(["--sizes", "tiny,7b", "--mergekit-methods", "7b=linear,ties", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "7b: 6.74B parameters" in out and "2 shards (9.98 + 3.50 GB)" in out
    assert "mergekit: linear, ties\n" in out and "mergekit: linear, ties, dare_ties" in out
    assert not (tmp_path / "cache").exists()


def test_mergekit_methods_spec():
    assert scaling.parse_mergekit_methods(["7b=linear,ties", "tiny="], ["tiny", "7b"], scaling.METHODS) == {"tiny": [], "7b": ["linear", "ties"]}
    for bad in (["7b"], ["13b=linear"], ["7b=slerp"]):
        with pytest.raises(ValueError):
            scaling.parse_mergekit_methods(bad, ["tiny", "7b"], scaling.METHODS)


def _result(method: str, gb: float, alloy_s: float, mergekit_s: float | None, rss_gib: float = 0.5) -> dict:
    a = {"available": True, "ok": True, "wall_s": alloy_s, "cpu_s": alloy_s * 1.5, "peak_rss_bytes": int(rss_gib * 2**30)}
    r = {"method": method, "input_bytes": int(gb * 1e9), "alloy": a, "alloy_vs_read_write": 0.5}
    if mergekit_s is None:
        r["mergekit"] = {"available": False, "note": "not run at this size"}
    else:
        r["mergekit"] = {"available": True, "ok": True, "wall_s": mergekit_s, "cpu_s": mergekit_s, "peak_rss_bytes": 4 * 2**30}
        r["speedup_vs_mergekit"] = mergekit_s / alloy_s
    return r


def _entry(name: str, results: list[dict]) -> dict:
    size = synth.SIZES[name]
    return {"name": name, "parameters": size.parameters, "models": 3, "largest_tensor_bytes": size.largest_tensor_bytes, "rss_bound_bytes": bench_run.rss_bound(size), "results": results}


def test_scaling_report_marks_the_targets(tmp_path):
    sizes = [
        _entry("1b", [_result("linear", 6.6, 6.6, 20.0), _result("ties", 6.6, 16.5, 144.0)]),
        _entry("7b", [_result("linear", 40.4, 42.0, 121.0), _result("ties", 40.4, 125.0, 880.0, rss_gib=2.0), _result("dare_ties", 40.4, 85.0, None)]),
    ]
    s = scaling.summary(sizes)
    assert s["rss"]["1b"]["within"] and not s["rss"]["7b"]["within"]  # 2 GiB > 1 GB + 3 × 262 MB
    assert s["s_per_gb"]["linear"]["spread"] == pytest.approx(42.0 / 40.4 - 1)
    assert s["s_per_gb"]["linear"]["within"] and not s["s_per_gb"]["ties"]["within"]
    assert s["s_per_gb"]["linear"]["per_gb_added"]["1b→7b"] == pytest.approx((42.0 - 6.6) / (40.4 - 6.6))
    assert s["ties_target"]["met"] and s["ties_target"]["speedup"] == pytest.approx(880.0 / 125.0)
    text = scaling.table(sizes)
    assert "| 7b (6.74B) | dare_ties | 40.40 | 85.0 |" in text and "| not run at this size | – | – | – | – |" in text
    assert "7.04× ✓" in text and "1.66 GiB ✗" in text
    pytest.importorskip("matplotlib")
    scaling.chart(sizes, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").stat().st_size > 10_000
