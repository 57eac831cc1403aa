"""The ensemble against probabilities averaged by hand; entropy recorded while scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

from modelalloy.evaluate.scoring import perplexity
from modelalloy.study.probes import Ensemble, hidden_states, prompts_from, repetition, greedy_continuations


def _models(study_models):
    load = lambda p: transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    tok = transformers.AutoTokenizer.from_pretrained(study_models["base"])
    return tok, [load(ps[1]) for ps in study_models["specialists"].values()]


def test_ensemble_is_the_mean_of_the_experts_probabilities(study_models):
    tok, experts = _models(study_models)
    text = study_models["held"]["prose"][0]
    text = text[:40]  # one token per character
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert ids.shape == (1, 40)
    with torch.no_grad():
        probs = np.mean([torch.softmax(e(input_ids=ids).logits, -1).double().numpy() for e in experts], axis=0)  # by hand
        logits = Ensemble(experts)(input_ids=ids).logits
    np.testing.assert_allclose(torch.softmax(logits, -1).double().numpy(), probs, rtol=1e-5, atol=1e-7)
    # Its perplexity is exp of the mean −log of the averaged probability of each next token.
    nll = -np.log(probs[0, np.arange(39), ids[0, 1:].numpy()])
    result = perplexity(Ensemble(experts), tok, [text], max_tokens=40, window=64)
    assert result["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)


def test_perplexity_keeps_the_entropy_of_the_scored_positions(study_models):
    tok, experts = _models(study_models)
    texts = study_models["held"]["digits"][:3]
    result = perplexity(experts[0], tok, texts, max_tokens=150, window=32, batch_size=3, entropy=True)
    from modelalloy.evaluate.scoring import token_stream, windows

    assert (150 - 1) % 31  # the last window is partial: its first positions predict nothing new
    # By hand: the same windows, one at a time; a window's last position predicts nothing in it.
    ids = token_stream(tok, texts, 150)
    hs = []
    for start, first, end in windows(len(ids), 32, 31):
        with torch.no_grad():
            logits = experts[0](input_ids=torch.tensor([ids[start:end]])).logits[0].double()
        p = torch.softmax(logits, -1).numpy()
        hs += list(-(p * np.log(p)).sum(-1)[first - start - 1 : end - start - 1])
    assert len(hs) == result["tokens"]
    assert result["entropy"] == pytest.approx(float(np.mean(hs)), rel=1e-5)
    assert "entropy" not in perplexity(experts[0], tok, texts, max_tokens=150, window=32)  # only when asked


def test_ensemble_of_top_layer_fine_tunes_runs_their_shared_bottom_once(study_models):
    tok, experts = _models(study_models)
    base = transformers.AutoModelForCausalLM.from_pretrained(study_models["base"], dtype=torch.float32).eval()
    bottom = {k: v for k, v in base.state_dict().items() if k.startswith(("model.embed_tokens.", "model.layers.0."))}
    for e in experts[:2]:
        e.load_state_dict(bottom, strict=False)  # the base's embedding and first layer: only the rest differs
    ensemble = Ensemble(experts[:2])
    assert ensemble.shared_depth == 1 and Ensemble(experts).shared_depth == 0  # the third expert shares nothing
    ids = torch.tensor([tok(study_models["held"]["prose"][0][:40], add_special_tokens=False)["input_ids"]] * 2)
    with torch.no_grad():
        probs = np.mean([torch.softmax(e(input_ids=ids).logits, -1).double().numpy() for e in experts[:2]], axis=0)
        got = torch.softmax(ensemble(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, -1).double().numpy()
    np.testing.assert_allclose(got, probs, rtol=1e-5, atol=1e-7)
    assert ensemble.shared_depth == 1  # the one-time check against the full forward passed


def test_prompts_continuations_and_hidden_states(study_models):
    tok, experts = _models(study_models)
    prompts = prompts_from(tok, study_models["held"]["shout"], n=5, tokens=6)
    assert len(prompts) == 5 and all(len(p) == 6 for p in prompts) and len({tuple(p) for p in prompts}) == 5
    cont = greedy_continuations(experts[2], prompts, 12, batch_size=2)
    assert [len(c) for c in cont] == [12] * 5
    rep = repetition(cont)
    assert 0 <= rep["distinct_2"] <= 1 and 0 <= rep["repeated_4gram"] <= 1 and rep["n_continuations"] == 5
    states = hidden_states(experts[0], prompts[0] * 3, window=7)
    assert len(states) == experts[0].config.num_hidden_layers and states[0].shape == (18, 32)


def test_ensemble_family_scores_each_subset_as_its_ensemble_alone(study_models):
    from modelalloy.evaluate.scoring import perplexities
    from modelalloy.evaluate.shared import SharedBottom
    from modelalloy.study.probes import EnsembleFamily

    tok, experts = _models(study_models)
    base = transformers.AutoModelForCausalLM.from_pretrained(study_models["base"], dtype=torch.float32).eval()
    bottom = {k: v for k, v in base.state_dict().items() if k.startswith(("model.embed_tokens.", "model.layers.0."))}
    for e in experts:
        e.load_state_dict(bottom, strict=False)  # one shared bottom layer, so the family runs it once per batch
    named = dict(zip("abc", experts))
    subsets = [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]
    texts = study_models["held"]["prose"][:4]
    kw = dict(max_tokens=200, window=48, batch_size=2, entropy=True)
    alone = {s: perplexity(Ensemble([named[n] for n in s]), tok, texts, **kw) for s in subsets}
    family = EnsembleFamily(named, subsets)
    assert family.ensemble.shared_depth == 1
    kept = SharedBottom(1)
    first = perplexities(family.logits_of(kept), tok, texts, **kw)
    assert len(kept.states) == 3  # 200 tokens in windows of 48: five windows, batches of two
    again = perplexities(family.logits_of(kept), tok, texts, **kw)  # from the kept states this time
    for s in subsets:
        for got in (first[s], again[s]):
            assert got["units"] == alone[s]["units"]  # per-unit sums: what the bootstrap resamples
            assert got["perplexity"] == pytest.approx(alone[s]["perplexity"], rel=1e-6)
            assert got["entropy"] == pytest.approx(alone[s]["entropy"], rel=1e-6)
