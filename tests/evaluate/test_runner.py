"""Merging in memory, and `evaluate`/`rate` end to end on tiny real models."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import modelalloy
from modelalloy.config import parse_config
from modelalloy.evaluate import EvalError, EvalSet, evaluate, load_evals, method_variant, perplexity, rate
from modelalloy.inmemory import load_merged_model, merge_state_dict

TEXT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 3


def _config(family, method="ties", **top):
    return parse_config(yaml.safe_dump({
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [{"model": str(family["ft_a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(family["ft_b"]), "parameters": {"weight": 0.4, "density": 0.7}}],
        "parameters": top,
        "random_seed": 3,
    }))


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_in_memory_merge_equals_the_merge_written_to_disk(lm_family, tmp_path, method):
    cfg = _config(lm_family, method)
    state, plan, paths = merge_state_dict(cfg)
    modelalloy.merge(cfg, tmp_path / "out", threads=1)
    on_disk = load_file(tmp_path / "out" / "model.safetensors")
    assert set(state) == set(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name
    model, donor = load_merged_model(cfg)
    assert donor == lm_family["base"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_in_memory_merge_of_a_tied_model_ties_the_head(tmp_path):
    # SmolLM2 and many small LMs store no lm_head: it is the embedding. The in-memory model must tie it.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                                      num_hidden_layers=1, vocab_size=40, max_position_embeddings=32, tie_word_embeddings=True)
    for name in ("base", "a", "b"):
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / name)
    assert "lm_head.weight" not in load_file(tmp_path / "a" / "model.safetensors")
    cfg = parse_config(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}} for n in ("a", "b")]}))
    model, _ = load_merged_model(cfg)
    modelalloy.merge(cfg, tmp_path / "out", threads=1)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_evaluate_config_and_dirs_with_cache(lm_family, tmp_path):
    cfg = _config(lm_family)
    sets = [EvalSet(name="sonnet", texts=(TEXT,), max_tokens=200, window=64, stride=48)]
    cache = tmp_path / "scores.json"
    result = evaluate({"base": lm_family["base"], "merged": cfg}, sets, cache=cache)
    tok = transformers.AutoTokenizer.from_pretrained(lm_family["base"])
    base = transformers.AutoModelForCausalLM.from_pretrained(lm_family["base"])
    expected = perplexity(base, tok, [TEXT], max_tokens=200, window=64, stride=48)["perplexity"]
    assert result.table()["base"]["sonnet"] == pytest.approx(expected, rel=1e-6)
    # A second run reads every score from the cache: it no longer needs the models at all.
    calls = []
    again = evaluate({"base": lm_family["base"], "merged": cfg}, sets, cache=cache, progress=lambda *a: calls.append(a[0]))
    assert again.table() == result.table()
    assert calls == ["base (cached)", "merged (cached)"]


def test_rate_with_methods_ranks_every_method(lm_family, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "evals.yaml").write_text(yaml.safe_dump({"sets": [
        {"name": "poem", "path": "a.txt", "max_tokens": 120, "window": 64, "expert": "ft_a"},
        {"name": "control", "path": "a.txt", "max_tokens": 60, "window": 32},
    ]}))
    sets = load_evals(tmp_path / "evals.yaml")
    labels = {str(lm_family[k]): k for k in ("base", "ft_a", "ft_b")}
    result = rate(_config(lm_family), sets, methods=["linear", "task_arithmetic", "ties"], labels=labels)
    assert sorted(r.model for r in result.rates) == ["linear", "task_arithmetic", "ties"]
    table = result.evaluation.table()
    assert set(table) == {"base", "ft_a", "ft_b", "linear", "task_arithmetic", "ties"}
    for r in result.rates:
        poem = r.sets[0]
        expected_nai = (table["base"]["poem"] - table[r.model]["poem"]) / (table["base"]["poem"] - table["ft_a"]["poem"])
        if table["ft_a"]["poem"] < table["base"]["poem"]:
            assert poem.nai == pytest.approx(expected_nai)
        assert r.sets[1].forgetting == pytest.approx((table[r.model]["control"] - table["base"]["control"]) / table["base"]["control"])
    nais = [r.mean_nai if r.mean_nai is not None else -math.inf for r in result.rates]
    assert nais == sorted(nais, reverse=True)
    assert result.to_json()["kind"] == "rate"


def test_method_variant_keeps_what_each_method_takes(lm_family):
    cfg = _config(lm_family)
    linear = method_variant(cfg, "linear")
    assert linear.merge_method == "linear"
    assert [m.parameters for m in linear.models] == [{"weight": 0.6}, {"weight": 0.4}]
    assert [m.parameters for m in method_variant(cfg, "dare_ties").models] == [m.parameters for m in cfg.models]
    plain = cfg.model_copy(update={"models": [m.model_copy(update={"parameters": {}}) for m in cfg.models]})
    # linear requires a weight per model: a plain average gets weight 1 each.
    assert [m.parameters for m in method_variant(plain, "linear").models] == [{"weight": 1.0}, {"weight": 1.0}]


def test_eval_errors_are_one_line(lm_family, tmp_path):
    (tmp_path / "bad.yaml").write_text("sets:\n  - name: x\n    path: a.txt\n    windo: 3\n")
    with pytest.raises(EvalError, match=r"sets\.0\.windo: unknown key 'windo' \(did you mean 'window'"):
        load_evals(tmp_path / "bad.yaml")
    with pytest.raises(EvalError, match="not a model directory"):
        evaluate([str(tmp_path)], [EvalSet(name="t", texts=("abc",))])
    with pytest.raises(EvalError, match="expert 'nobody' is not one of the merged models"):
        rate(_config(lm_family), [EvalSet(name="t", texts=("abc",), expert="nobody")])
