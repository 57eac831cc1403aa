"""The merge-rate metrics on hand-made score tables, both metric directions."""

from __future__ import annotations

import math

import pytest

from modelalloy.evaluate import EvalError, SetInfo, merge_rate, nai, normalized_score
from modelalloy.evaluate.rate import rank

# Perplexity (lower is better) on three sets and accuracy (higher is better) on one.
SCORES = {
    "base": {"code": 10.0, "poems": 20.0, "news": 8.0, "quiz": 0.50},
    "coder": {"code": 6.0, "poems": 22.0, "news": 8.4, "quiz": 0.60},
    "poet": {"code": 11.0, "poems": 12.0, "news": 8.8, "quiz": 0.40},
    "merged": {"code": 7.0, "poems": 16.0, "news": 8.2, "quiz": 0.70},
}
SETS = [
    SetInfo("code", higher_is_better=False, expert="coder"),
    SetInfo("poems", higher_is_better=False, expert="poet"),
    SetInfo("news", higher_is_better=False),  # control: nobody's specialty
    SetInfo("quiz", higher_is_better=True, expert="coder"),
]


def test_worked_example():
    r = merge_rate(SCORES, merged="merged", base="base", parents=["coder", "poet"], sets=SETS)
    by = {s.set: s for s in r.sets}
    # code: base 10 -> expert 6 is a gain of 4; merged 7 keeps 3 of it.
    assert by["code"].nai == pytest.approx(3 / 4)
    assert by["code"].normalized_score == pytest.approx(6 / 7)  # lower is better: expert / merged
    assert by["code"].best_parent == "coder"
    assert by["code"].gain_over_best == pytest.approx((6 - 7) / 6)  # one perplexity point worse, relative
    # poems: 20 -> 12 is a gain of 8; merged 16 keeps 4.
    assert by["poems"].nai == pytest.approx(0.5)
    assert by["poems"].normalized_score == pytest.approx(12 / 16)
    # quiz (higher is better): 0.5 -> 0.6 gained 0.1; merged 0.7 gained 0.2 -> NAI 2; beats the best parent.
    assert by["quiz"].nai == pytest.approx(2.0)
    assert by["quiz"].normalized_score == pytest.approx(0.7 / 0.6)
    assert by["quiz"].gain_over_best == pytest.approx((0.7 - 0.6) / 0.6)
    # news is a control: forgetting = how much worse than the base, relative (8 -> 8.2 is 2.5 %).
    assert by["news"].forgetting == pytest.approx(0.2 / 8)
    assert by["news"].nai is None and by["code"].forgetting is None
    assert by["news"].best_parent == "coder"  # 8.4 < 8.8
    assert [s.beats_base for s in r.sets] == [True, True, False, True]
    assert r.p_beats_base == pytest.approx(3 / 4)
    assert r.mean_nai == pytest.approx((0.75 + 0.5 + 2.0) / 3)
    assert r.mean_normalized_score == pytest.approx((6 / 7 + 12 / 16 + 0.7 / 0.6) / 3)
    assert r.mean_forgetting == pytest.approx(0.025)
    assert r.mean_gain_over_best == pytest.approx(((6 - 7) / 6 + (12 - 16) / 12 + (8.4 - 8.2) / 8.4 + 0.1 / 0.6) / 4)


def test_sign_handling_mirrors_between_directions():
    # The same story told as perplexity and as its negation with higher-is-better: same NAI.
    assert nai(7.0, 10.0, 6.0, higher_is_better=False) == pytest.approx(0.75)
    assert nai(-7.0, -10.0, -6.0, higher_is_better=True) == pytest.approx(0.75)
    # A merge worse than the base has negative NAI in both directions.
    assert nai(11.0, 10.0, 6.0, higher_is_better=False) == pytest.approx(-0.25)
    assert nai(0.45, 0.5, 0.6, higher_is_better=True) == pytest.approx(-0.5)
    # An expert that did not beat the base leaves NAI undefined (not a huge or flipped number).
    assert nai(7.0, 10.0, 10.0, higher_is_better=False) is None
    assert nai(7.0, 10.0, 12.0, higher_is_better=False) is None
    assert normalized_score(8.0, 4.0, higher_is_better=False) == 0.5
    assert normalized_score(0.3, 0.6, higher_is_better=True) == 0.5


def test_undefined_nai_is_noted_and_left_out_of_the_mean():
    scores = {m: dict(v) for m, v in SCORES.items()}
    scores["poet"]["poems"] = 21.0  # the poet got worse than the base on its own set
    r = merge_rate(scores, merged="merged", base="base", parents=["coder", "poet"], sets=SETS)
    assert r.sets[1].nai is None
    assert r.mean_nai == pytest.approx((0.75 + 2.0) / 2)
    assert any("poems" in n and "not better than the base" in n for n in r.notes)


def test_rank_prefers_higher_nai_then_less_forgetting():
    good = merge_rate(SCORES, merged="merged", base="base", parents=["coder", "poet"], sets=SETS)
    scores = dict(SCORES, worse={"code": 9.0, "poems": 19.0, "news": 9.0, "quiz": 0.5})
    worse = merge_rate(scores, merged="worse", base="base", parents=["coder", "poet"], sets=SETS)
    assert [r.model for r in rank([worse, good])] == ["merged", "worse"]
    assert worse.mean_nai == pytest.approx((0.25 + 1 / 8 + 0.0) / 3)
    assert not math.isnan(worse.mean_gain_over_best)


def test_bad_tables_are_one_line_errors():
    with pytest.raises(EvalError, match="no scores for model 'ghost'"):
        merge_rate(SCORES, merged="ghost", base="base", parents=["coder"], sets=SETS)
    with pytest.raises(EvalError, match="expert 'poet' is not one of the merged models"):
        merge_rate(SCORES, merged="merged", base="base", parents=["coder"], sets=SETS)
    partial = dict(SCORES, merged={"code": 7.0})
    with pytest.raises(EvalError, match="'merged' has no score on poems, news, quiz"):
        merge_rate(partial, merged="merged", base="base", parents=["coder", "poet"], sets=SETS)
