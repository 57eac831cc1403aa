"""Merging in memory, and `evaluate`/`rate` end to end on tiny real models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import modelalloy
from modelalloy.config import parse_config
from modelalloy.evaluate import Bootstrap, EvalError, EvalSet, evaluate, load_evals, method_variant, perplexity, rate
from modelalloy.evaluate.scoring import windows
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


DOCS = tuple(f"Line {i}: shall I compare thee to a summer's day? " for i in range(24))


def test_every_score_carries_an_interval_and_tiny_sets_a_warning(lm_family, tmp_path):
    sets = [EvalSet(name="lines", texts=DOCS, max_tokens=2000, window=64, unit="document"),
            EvalSet(name="three", texts=DOCS[:3], max_tokens=2000, window=64, unit="document")]
    result = evaluate({"base": lm_family["base"], "a": lm_family["ft_a"]}, sets, cache=tmp_path / "s.json", bootstrap=Bootstrap(resamples=200, seed=4))
    saved = result.to_json()
    for model in ("base", "a"):
        r = saved["scores"][model]["lines"]
        assert {"value", "ci95", "n_units", "n_tokens"} <= set(r) and "units" not in r
        assert r["value"] == r["score"] and r["n_units"] == 24 and r["n_tokens"] == r["tokens"]
        assert r["ci95"][0] < r["value"] < r["ci95"][1]
        assert saved["scores"][model]["three"]["ci95"] is None and saved["scores"][model]["three"]["n_units"] == 3
    assert result.warnings == ["eval set 'three' has 3 documents, too few for an interval (fewer than 10): its scores carry no ci95 and its comparisons no p_better"]
    assert saved["bootstrap"] == {"resamples": 200, "seed": 4, "interval": "95 % percentile"}
    draws = result.draws()
    assert draws["base"]["three"] is None and draws["base"]["lines"].shape == (200,)
    # The cached rerun gives the same intervals (the resamples are seeded, not stored).
    again = evaluate({"base": lm_family["base"], "a": lm_family["ft_a"]}, sets, cache=tmp_path / "s.json", bootstrap=Bootstrap(resamples=200, seed=4))
    assert again.to_json() == saved
    other = evaluate({"base": lm_family["base"]}, sets[:1], cache=tmp_path / "s.json", bootstrap=Bootstrap(resamples=200, seed=5))
    assert other.scores["base"]["lines"]["ci95"] != saved["scores"]["base"]["lines"]["ci95"]


def test_rate_json_has_paired_comparisons_and_each_merge_its_config(lm_family):
    sets = [EvalSet(name="poem", texts=DOCS, max_tokens=1500, window=64, expert="ft_a"),
            EvalSet(name="control", texts=(TEXT * 4,), max_tokens=400, window=24)]
    labels = {str(lm_family[k]): k for k in ("base", "ft_a", "ft_b")}
    result = rate(_config(lm_family), sets, methods=["linear", "ties"], labels=labels, bootstrap=Bootstrap(resamples=100))
    payload = result.to_json()
    assert {r["model"] for r in payload["rates"]} == {"linear", "ties"}
    for r in payload["rates"]:
        assert r["config"]["merge_method"] == r["model"]
        assert "mean over sets of p_better" in r["p_beats_base_basis"]
        assert r["p_beats_base"] == pytest.approx(sum(s["vs_base"]["p_better"] for s in r["sets"]) / 2)
        poem, control = r["sets"]
        for comparison in (poem["vs_base"], poem["vs_expert"], poem["vs_best_parent"], control["vs_base"]):
            assert set(comparison) == {"delta", "ci95", "p_better"} and len(comparison["ci95"]) == 2
        assert control["forgetting_ci95"] is not None and control["vs_expert"] is None
    assert payload["evaluation"]["scores"]["ties"]["control"]["n_units"] == len(windows(400, 24, 23))
    json.dumps(payload)  # plain JSON all the way down
