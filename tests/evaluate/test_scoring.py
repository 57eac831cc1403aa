"""Perplexity and multiple choice against computations written out token by token."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modelalloy.evaluate import EvalError, EvalSet, multiple_choice, perplexity, score
from modelalloy.evaluate.scoring import token_stream, windows

from .conftest import char_tokenizer, tiny_llama

TEXTS = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"]


def _logprob_of_next(model, context: list[int], target: int) -> float:
    """log p(target | context) from one forward over exactly `context`."""
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1].double()
    return float(torch.log_softmax(logits, -1)[target])


def test_perplexity_is_exp_of_mean_token_nll_in_one_window():
    model, tok = tiny_llama(1), char_tokenizer()
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    expected = math.exp(float(-logp.mean()))
    got = perplexity(model, tok, TEXTS, max_tokens=1000, window=128)
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert got["nll"] == pytest.approx(float(-logp.mean()), rel=1e-5)


@pytest.mark.parametrize("window,stride,batch", [(16, 15, 3), (16, 5, 2), (8, 1, 64)])
def test_sliding_windows_score_each_token_once_with_its_window_context(window, stride, batch):
    model, tok = tiny_llama(2), char_tokenizer()
    max_tokens = 60
    ids = token_stream(tok, TEXTS, max_tokens)
    assert len(ids) == max_tokens
    # Token t (t >= 1) falls in chunk k = (t - 1) // stride, whose window ends at the chunk's end and
    # reaches back `window` tokens: its context is ids[max(0, chunk_end - window):t].
    nll = []
    for t in range(1, len(ids)):
        chunk_end = min(1 + ((t - 1) // stride + 1) * stride, len(ids))
        start = max(0, chunk_end - window)
        nll.append(-_logprob_of_next(model, ids[start:t], ids[t]))
    got = perplexity(model, tok, TEXTS, max_tokens=max_tokens, window=window, stride=stride, batch_size=batch)
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_windows_cover_every_target_once():
    spans = windows(50, window=10, stride=4)
    targets = [t for _, first, end in spans for t in range(first, end)]
    assert targets == list(range(1, 50))
    assert all(end - start <= 10 and start < first for start, first, end in spans)
    with pytest.raises(EvalError, match="stride 10 must be below window 10"):
        windows(50, window=10, stride=10)


def test_multiple_choice_picks_the_highest_log_likelihood_by_hand():
    model, tok = tiny_llama(3), char_tokenizer()
    items = [("The cat sat on the", [" mat", " dog", " zzzz"], 0), ("1 + 1 =", [" 2", " 3"], 1), ("Hello", [" world!", " you"], 0)]
    right = right_norm = 0
    for context, choices, answer in items:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        lls = []
        for c in choices:
            cont = tok(c, add_special_tokens=False)["input_ids"]  # a character tokenizer: no boundary merges
            lls.append(sum(_logprob_of_next(model, ctx + cont[:j], cont[j]) for j in range(len(cont))))
        right += lls.index(max(lls)) == answer
        norm = [v / len(c) for v, c in zip(lls, choices)]
        right_norm += norm.index(max(norm)) == answer
    got = multiple_choice(model, tok, items)
    assert got == {"accuracy": right / 3, "accuracy_norm": right_norm / 3, "items": 3}
    assert 0 < got["accuracy"] < 1 or 0 < got["accuracy_norm"] < 1 or right in (0, 3)


def test_choice_set_from_jsonl_and_its_errors(tmp_path):
    model, tok = tiny_llama(3), char_tokenizer()
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"context": "1 + 1 =", "choices": [" 2", " 3"], "answer": " 3"}) + "\n")
    result = score(model, tok, EvalSet(name="mc", kind="choice", path=str(path)))
    assert result["metric"] == "accuracy" and result["items"] == 1 and result["score"] in (0.0, 1.0)
    path.write_text(json.dumps({"context": "x", "choices": [" a", " b"], "answer": 2}) + "\n")
    with pytest.raises(EvalError, match=r"mc\.jsonl item 1: 'answer' must be a choice index \(0 to 1\)"):
        score(model, tok, EvalSet(name="mc", kind="choice", path=str(path)))
