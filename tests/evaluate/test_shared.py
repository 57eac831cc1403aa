"""Shared bottom layers: computed once per set, and the scores are exactly those of full forwards."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers
import yaml

from modelalloy.config import parse_config
from modelalloy.evaluate import EvalSet, evaluate, shared

from .conftest import char_tokenizer

TEXTS = tuple(f"Doc {i}: Shall I compare thee to a summer's day? Thou art more lovely." for i in range(12))


def _llama(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                                      vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def top_tuned(tmp_path_factory):
    """A base and two fine-tunes that changed only the top decoder layer (as the demo's do)."""
    root = tmp_path_factory.mktemp("top")
    tok = char_tokenizer()
    paths = {}
    g = torch.Generator().manual_seed(3)
    for name, scale in (("base", 0.0), ("ft_a", 0.05), ("ft_b", 0.05)):
        model = _llama(0)
        with torch.no_grad():
            for p in model.model.layers[2].parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def _models(paths):
    ties = parse_config(yaml.safe_dump({"merge_method": "ties", "base_model": str(paths["base"]), "name": "ties",
                                        "models": [{"model": str(paths[k]), "parameters": {"weight": 1.0, "density": 0.5}} for k in ("ft_a", "ft_b")]}))
    return {"base": paths["base"], "ft_a": paths["ft_a"], "ft_b": paths["ft_b"], "ties": ties}


def test_models_sharing_their_bottom_score_exactly_as_with_full_forwards(top_tuned, monkeypatch):
    sets = [EvalSet(name="verse", texts=TEXTS, max_tokens=600, window=48, batch_size=3)]
    full = evaluate(_models(top_tuned), sets, share_bottom=False)
    reused = []
    real = shared._top_only

    @contextlib.contextmanager
    def counting(inner, layers, depth):
        reused.append(depth)
        with real(inner, layers, depth):
            yield

    monkeypatch.setattr(shared, "_top_only", counting)
    fast = evaluate(_models(top_tuned), sets, share_bottom=True)
    # Every model after the base ran only its top layer (two shared), batch by batch.
    n_batches = -(-len(shared_windows(sets[0])) // 3)
    assert reused == [2] * (3 * n_batches)
    for model in ("base", "ft_a", "ft_b", "ties"):
        assert fast.scores[model]["verse"]["units"]["nll"] == pytest.approx(full.scores[model]["verse"]["units"]["nll"], rel=1e-6)
        assert fast.scores[model]["verse"]["ci95"] == pytest.approx(full.scores[model]["verse"]["ci95"], rel=1e-6)
    assert not fast.warnings


def shared_windows(eval_set):
    from modelalloy.evaluate.scoring import token_stream, windows

    return windows(len(token_stream(char_tokenizer(), eval_set.texts, eval_set.max_tokens)), eval_set.window, eval_set.window - 1)


def test_depth_comes_from_the_weights():
    a, b = _llama(0), _llama(0)
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3  # one entry of the middle layer
    ha, hb = shared.model_hashes(a), shared.model_hashes(b)
    assert shared.shared_depth(ha, hb) == 1
    assert shared.shared_depth(ha, shared.model_hashes(_llama(0))) == 3
    with torch.no_grad():
        b.model.embed_tokens.weight[5, 0] += 1.0
    assert shared.shared_depth(ha, shared.model_hashes(b)) == 0  # another embedding: nothing shared


def test_a_forward_that_does_not_match_turns_sharing_off_and_scores_stay_right(top_tuned, monkeypatch):
    sets = [EvalSet(name="verse", texts=TEXTS, max_tokens=400, window=48, batch_size=3)]
    full = evaluate(_models(top_tuned), sets, share_bottom=False)

    @contextlib.contextmanager
    def wrong(inner, layers, depth):  # e.g. a model that scales its embeddings: states re-enter at the bottom
        yield

    monkeypatch.setattr(shared, "_top_only", wrong)
    fast = evaluate(_models(top_tuned), sets, share_bottom=True)
    for model in ("base", "ft_a", "ft_b", "ties"):
        assert fast.scores[model]["verse"]["perplexity"] == pytest.approx(full.scores[model]["verse"]["perplexity"], rel=1e-6)
    assert any("differs from its full forward" in w for w in fast.warnings)
