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
    rights, rights_norm = [], []
    for context, choices, answer in items:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        lls = []
        for c in choices:
            cont = tok(c, add_special_tokens=False)["input_ids"]  # a character tokenizer: no boundary merges
            lls.append(sum(_logprob_of_next(model, ctx + cont[:j], cont[j]) for j in range(len(cont))))
        rights.append(int(lls.index(max(lls)) == answer))
        norm = [v / len(c) for v, c in zip(lls, choices)]
        rights_norm.append(int(norm.index(max(norm)) == answer))
    right, right_norm = sum(rights), sum(rights_norm)
    got = multiple_choice(model, tok, items)
    assert got == {"accuracy": right / 3, "accuracy_norm": right_norm / 3, "items": 3,
                   "units": {"kind": "items", "main": "accuracy", "accuracy": rights, "accuracy_norm": rights_norm}}
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


@pytest.mark.parametrize("unit", ["document", "window"])
def test_perplexity_units_sum_to_the_whole_and_follow_documents_or_windows(unit):
    model, tok = tiny_llama(2), char_tokenizer()
    texts = ["abc " * 5, "to be or not " * 3, "xyz" * 7, "q" * 4]
    window, stride = 16, 6
    got = perplexity(model, tok, texts, max_tokens=70, window=window, stride=stride, batch_size=3, unit=unit)
    units = got["units"]
    assert units["kind"] == "perplexity" and units["unit"] == unit
    assert sum(units["tokens"]) == got["tokens"]
    assert math.exp(sum(units["nll"]) / sum(units["tokens"])) == pytest.approx(got["perplexity"], rel=1e-9)
    ids = token_stream(tok, texts, 70)
    if unit == "window":  # one unit per window, `stride` targets each (the last one shorter)
        assert units["tokens"] == [end - first for _, first, end in windows(len(ids), window, stride)]
    else:  # one unit per document: its tokens after the stream's first, and the EOS that ends it
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        expected, left = [], 70
        for i, n in enumerate(lengths):
            take = min(n + (i < len(texts) - 1), left)  # + its EOS, except the last text's
            expected.append(take)
            left -= take
        expected[0] -= 1  # the first token of the stream is context only
        assert units["tokens"] == [n for n in expected if n > 0]
    # The unit sums are the per-token NLLs of the one-window computation, grouped.
    reference = perplexity(model, tok, texts, max_tokens=70, window=window, stride=stride, batch_size=1, unit="window")
    assert sum(reference["units"]["nll"]) == pytest.approx(sum(units["nll"]), rel=1e-6)


def test_auto_units_cut_one_long_text_into_windows_and_keep_many_short_documents():
    model, tok = tiny_llama(2), char_tokenizer()
    one_text = perplexity(model, tok, ["the long text " * 20], max_tokens=200, window=32, unit="auto")["units"]
    assert one_text["unit"] == "window" and len(one_text["tokens"]) == len(windows(200, 32, 31))
    many = perplexity(model, tok, [f"doc {i}." for i in range(30)], max_tokens=400, window=64, unit="auto")["units"]
    assert many["unit"] == "document" and len(many["tokens"]) == 30
    with pytest.raises(EvalError, match="unit 'pages': use one of auto, document, window"):
        perplexity(model, tok, TEXTS, unit="pages")
