"""End to end on tiny real models: merge, load with transformers, run, and check the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import reference as ref
import modelalloy
from models import CAUSAL

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gpt2", "bert", "qwen3", "phi", "gpt_neox"]


def load_state(path: Path) -> dict[str, np.ndarray]:
    state = {}
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for f in files:
        state.update({k: v.double().numpy() for k, v in load_file(path / f).items()})
    return state


def run(tmp_path: Path, config: dict, name: str = "out", **options) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / name
    modelalloy.merge(cfg, out, **options)
    return out


def forward(path: Path, family: str) -> torch.Tensor:
    cls = transformers.AutoModelForCausalLM if family in CAUSAL else transformers.AutoModelForMaskedLM
    model = cls.from_pretrained(path)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 3]])).logits


def method_config(method: str, p: dict) -> dict:
    base, a, b = str(p["base"]), str(p["ft_dense"]), str(p["ft_flip"])
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": a}], "parameters": {"t": 0.4}}
    if method == "nuslerp":
        return {"merge_method": "nuslerp", "base_model": base, "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 2.0}}]}
    models = [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}}, {"model": b, "parameters": {"weight": 0.4, "density": 0.5}}]
    if method == "task_arithmetic":
        for m in models:
            del m["parameters"]["density"]
    return {"merge_method": method, "base_model": base, "models": models, "parameters": {"lambda": 0.9} if method != "ties" else {}}


def expected_tensor(method: str, name: str, states: dict, seed_name: str | None = None) -> np.ndarray:
    base, a, b = states["base"][name], states["ft_dense"][name], states["ft_flip"][name]
    if method == "linear":
        return ref.linear([a, b], [0.3, 0.7])
    if method == "slerp":
        return ref.slerp(0.4, base, a)
    if method == "nuslerp":
        return ref.nuslerp([a, b], [1.0, 2.0], base=base)
    if method == "task_arithmetic":
        return ref.task_family(base, [a, b], [0.6, 0.4], lam=0.9)
    if method == "ties":
        masks = [ref.topk_mask(x - base, 0.5) for x in (a, b)]
        return ref.task_family(base, [a, b], [0.6, 0.4], masks, consensus="sum", normalize=True)
    raise AssertionError(method)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["linear", "slerp", "nuslerp", "task_arithmetic", "ties"])
def test_deterministic_methods_match_reference_and_load(tmp_path, families, family, method):
    p = families(family)
    out = run(tmp_path, method_config(method, p))
    merged = load_state(out)
    states = {k: load_state(p[k]) for k in ("base", "ft_dense", "ft_flip")}
    assert set(merged) == set(states["base"])
    for name, value in merged.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        np.testing.assert_allclose(value, expected_tensor(method, name, states), rtol=2e-5, atol=2e-6, err_msg=f"{family} {method} {name}")
    logits = forward(out, family)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_random_methods_bit_identical_across_threads_and_seeded(tmp_path, families, family, method):
    p = families(family)
    config = method_config(method, p) | {"random_seed": 11}
    one = load_state(run(tmp_path, config, "one", threads=1))
    two = load_state(run(tmp_path, config, "two", threads=2))
    other = load_state(run(tmp_path, config | {"random_seed": 12}, "other", threads=2))
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert any(not np.array_equal(one[k], other[k]) for k in one)
    # DARE keeps about half of each task vector: the merged delta is sparse-ish vs TA.
    forward(Path(tmp_path / "two"), family)


def test_identical_inputs_give_the_input(tmp_path, families):
    p = families("llama")
    m = str(p["ft_dense"])
    out = run(tmp_path, {"merge_method": "ties", "base_model": str(p["base"]), "models": [{"model": m}, {"model": m + "/."}], "parameters": {"density": 1.0}})
    merged, src = load_state(out), load_state(p["ft_dense"])
    for k in src:
        np.testing.assert_allclose(merged[k], src[k], rtol=1e-6, atol=1e-7)


def test_gradient_and_filter_parameters_follow_mergekit_rules(tmp_path, families):
    """t = [0, 1] over 4 layers gives t = i/3 per layer; a self_attn filter overrides; lm_head gets t=0."""
    p = families("llama")
    config = {
        "merge_method": "slerp",
        "base_model": str(p["base"]),
        "models": [{"model": str(p["base"])}, {"model": str(p["ft_dense"])}],
        "parameters": {"t": [{"filter": "self_attn", "value": 0.5}, {"value": [0.0, 1.0]}]},
    }
    merged = load_state(run(tmp_path, config))
    base, a = load_state(p["base"]), load_state(p["ft_dense"])
    for layer in range(4):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        np.testing.assert_allclose(merged[name], ref.slerp(layer / 3, base[name], a[name]), rtol=2e-5, atol=2e-6)
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        np.testing.assert_allclose(merged[name], ref.slerp(0.5, base[name], a[name]), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(merged["lm_head.weight"], base["lm_head.weight"], rtol=1e-6, atol=1e-7)


def test_precedence_model_over_slice_over_top_level(tmp_path, families):
    p = families("llama")
    base, a, b = (str(p[k]) for k in ("base", "ft_dense", "ft_flip"))
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, 4]},
                    {"model": a, "layer_range": [0, 4], "parameters": {"weight": 0.25}},
                    {"model": b, "layer_range": [0, 4]},
                ],
                "parameters": {"weight": 0.5},
            }
        ],
        "parameters": {"weight": 2.0, "lambda": 1.0},
    }
    merged = load_state(run(tmp_path, config))
    sb, sa, sbb = load_state(p["base"]), load_state(p["ft_dense"]), load_state(p["ft_flip"])
    name = "model.layers.2.mlp.down_proj.weight"
    np.testing.assert_allclose(merged[name], ref.task_family(sb[name], [sa[name], sbb[name]], [0.25, 0.5]), rtol=2e-5, atol=2e-6)


def test_frankenmerge_with_repeated_layers(tmp_path, families):
    p = families("qwen2")
    a, b = str(p["ft_dense"]), str(p["ft_flip"])
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    out = run(tmp_path, config)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 6
    merged, sa, sb = load_state(out), load_state(p["ft_dense"]), load_state(p["ft_flip"])
    assert np.array_equal(merged["model.layers.2.mlp.up_proj.weight"], sa["model.layers.2.mlp.up_proj.weight"])
    assert np.array_equal(merged["model.layers.3.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"])
    assert np.array_equal(merged["model.layers.5.self_attn.q_proj.weight"], sb["model.layers.3.self_attn.q_proj.weight"])
    assert np.array_equal(merged["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])  # first slice
    assert np.array_equal(merged["model.norm.weight"], sb["model.norm.weight"])  # last slice
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    forward(out, "qwen2")


def test_sharded_output_index_card_and_support_files(tmp_path, families):
    p = families("llama")
    config = method_config("ties", p) | {"out_dtype": "bfloat16"}
    out = run(tmp_path, config, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for f in shards for v in load_file(out / f).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "tokenizer_config.json").read_text())["marker"] == "llama-base"  # from the base
    card = (out / "README.md").read_text()
    assert "ties" in card and str(p["ft_flip"]) in card
    assert not (tmp_path / "out.partial").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_content_hashes_identify_inputs(tmp_path, families):
    p = families("llama")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(method_config("linear", p)))
    r1 = modelalloy.merge(cfg, tmp_path / "a")
    r2 = modelalloy.merge(cfg, tmp_path / "b", threads=1)
    assert r1.input_hashes == r2.input_hashes and len(set(r1.input_hashes.values())) == 2
    assert r1.input_hashes[str(p["ft_dense"])] in (tmp_path / "a" / "README.md").read_text()


def test_dtype_rounds_inputs_before_merging(tmp_path, families):
    p = families("llama")
    config = method_config("linear", p) | {"dtype": "float16", "out_dtype": "float32"}
    merged = load_state(run(tmp_path, config))
    a, b = load_state(p["ft_dense"]), load_state(p["ft_flip"])
    name = "model.layers.0.mlp.up_proj.weight"
    expected = 0.3 * a[name].astype(np.float16).astype(np.float64) + 0.7 * b[name].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(merged[name], expected, rtol=1e-6, atol=1e-7)


def test_existing_output_needs_force(tmp_path, families):
    p = families("llama")
    out = run(tmp_path, method_config("linear", p))
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(modelalloy.ModelAlloyError, match="already exists"):
        run(tmp_path, method_config("linear", p))
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    run(tmp_path, method_config("linear", p), force=True)


def test_mergekit_documentation_ties_config_runs(tmp_path, families):
    """mergekit's README TIES example, with its model names pointed at local tiny models."""
    from test_config import MERGEKIT_TIES

    p = families("llama")
    text = MERGEKIT_TIES
    for name, key in [("psmathur/orca_mini_v3_13b", "ft_dense"), ("garage-bAInd/Platypus2-13B", "ft_flip"), ("WizardLM/WizardMath-13B-V1.0", "ft_sparse"), ("TheBloke/Llama-2-13B-fp16", "base")]:
        text = text.replace(name, str(p[key]))
    cfg = tmp_path / "mergekit.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    modelalloy.merge(cfg, out)
    merged = load_state(out)
    states = {k: load_state(p[k]) for k in ("base", "ft_dense", "ft_flip", "ft_sparse")}
    # Layer 1 of 4: t = 1/3. density [1, 0.7, 0.1] -> 0.8; weight [0, 0.3, 0.7, 1] -> 0.3; mlp weight 0.5.
    name = "model.layers.1.mlp.up_proj.weight"
    base = states["base"][name].astype(np.float16).astype(np.float64)
    xs = [states[k][name].astype(np.float16).astype(np.float64) for k in ("ft_dense", "ft_flip", "ft_sparse")]
    densities, weights = [0.8, 0.5, 0.33], [1.0, 0.3, 0.5]
    masks = [ref.topk_mask(x - base, d) for x, d in zip(xs, densities)]
    expected = ref.task_family(base, xs, weights, masks, consensus="sum", normalize=True)
    np.testing.assert_allclose(merged[name], expected, rtol=2e-3, atol=2e-4)  # float16 output
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    forward(out, "llama")
