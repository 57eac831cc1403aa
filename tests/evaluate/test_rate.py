"""The merge-rate metrics on hand-made score tables, both metric directions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelalloy.evaluate import EvalError, SetInfo, merge_rate, nai, normalized_score
from modelalloy.evaluate.bootstrap import Bootstrap, statistic, value
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


# --- with bootstrap draws ----------------------------------------------------------------------

def _ppl_units(per_token_nll: np.ndarray, tokens: np.ndarray) -> dict:
    return {"kind": "perplexity", "nll": (per_token_nll * tokens).tolist(), "tokens": tokens.tolist()}


def _study(n: int = 60):
    """Per-unit NLLs for base, two experts and two merges on two expert sets and a control.

    Units are shared by every model of a set (same documents); each model shifts the NLL.
    """
    rng = np.random.default_rng(0)
    shift = {  # mean NLL change per token against the base, per set
        "code": {"base": 0.0, "coder": -0.50, "poet": 0.05, "good": -0.30, "twin": -0.299},
        "poems": {"base": 0.0, "coder": 0.05, "poet": -0.40, "good": -0.25, "twin": -0.251},
        "news": {"base": 0.0, "coder": 0.02, "poet": 0.03, "good": 0.01, "twin": 0.01},
    }
    units = {}
    for s, by_model in shift.items():
        tokens = rng.integers(20, 200, size=n)
        base = rng.gamma(6.0, 0.4, size=n)
        noise = {m: rng.normal(0, 0.02, size=n) for m in by_model}
        for m, d in by_model.items():
            units.setdefault(m, {})[s] = _ppl_units(base + d + noise[m], tokens)
    return units


def _draws_and_scores(units, resamples=400, seed=1):
    boot = Bootstrap(resamples=resamples, seed=seed)
    counts = {s: boot.counts(s, len(u["tokens"])) for s, u in units["base"].items()}
    draws = {m: {s: statistic(u, counts[s]) for s, u in per.items()} for m, per in units.items()}
    scores = {m: {s: value(u) for s, u in per.items()} for m, per in units.items()}
    return scores, draws, counts


STUDY_SETS = [SetInfo("code", False, "coder"), SetInfo("poems", False, "poet"), SetInfo("news", False)]


def test_intervals_are_ratios_of_paired_differences_on_the_same_resamples():
    units = _study()
    scores, draws, counts = _draws_and_scores(units)
    r = merge_rate(scores, merged="good", base="base", parents=["coder", "poet"], sets=STUDY_SETS, draws=draws)
    by = {x.set: x for x in r.sets}
    # Independently: per resample, each model's pooled perplexity on the drawn units, then NAI.
    def ppl(model, s, row):
        u = units[model][s]
        nll, tok = np.array(u["nll"]), np.array(u["tokens"])
        return np.exp((row * nll).sum() / (row * tok).sum())

    nai_code = [(ppl("base", "code", c) - ppl("good", "code", c)) / (ppl("base", "code", c) - ppl("coder", "code", c)) for c in counts["code"]]
    assert by["code"].nai_ci95 == pytest.approx(list(np.percentile(nai_code, [2.5, 97.5])), rel=1e-9)
    assert by["code"].nai_ci95[0] < by["code"].nai < by["code"].nai_ci95[1]
    forget = [(ppl("good", "news", c) - ppl("base", "news", c)) / ppl("base", "news", c) for c in counts["news"]]
    assert by["news"].forgetting_ci95 == pytest.approx(list(np.percentile(forget, [2.5, 97.5])), rel=1e-9)
    # Paired comparisons carry the exact keys other tools read.
    assert set(by["code"].vs_base) == {"delta", "ci95", "p_better"}
    assert by["code"].vs_base["delta"] == pytest.approx(scores["good"]["code"] - scores["base"]["code"])
    assert by["code"].vs_base["p_better"] == 1.0 and by["code"].vs_expert["p_better"] == 0.0
    diff = [ppl("good", "news", c) - ppl("base", "news", c) for c in counts["news"]]
    assert by["news"].vs_base["p_better"] == pytest.approx(np.mean(np.array(diff) < 0))
    # The summary's P is the mean over sets of p_better against the base, and says so.
    assert r.p_beats_base == pytest.approx(np.mean([x.vs_base["p_better"] for x in r.sets]))
    assert "mean over sets of p_better" in r.summary()["p_beats_base_basis"]
    mean_nai = (np.array(nai_code) + np.array([(ppl("base", "poems", c) - ppl("good", "poems", c)) / (ppl("base", "poems", c) - ppl("poet", "poems", c)) for c in counts["poems"]])) / 2
    assert r.mean_nai_ci95 == pytest.approx(list(np.percentile(mean_nai, [2.5, 97.5])), rel=1e-9)


def test_rank_says_when_two_merges_are_not_distinguishable():
    units = _study()
    units["weak"] = {s: dict(u, nll=[x * 0.99 if s != "news" else x for x in u["nll"]]) for s, u in units["base"].items()}
    scores, draws, _ = _draws_and_scores(units)
    rates = [merge_rate(scores, merged=m, base="base", parents=["coder", "poet"], sets=STUDY_SETS, draws=draws) for m in ("weak", "twin", "good")]
    ranked = rank(rates)
    assert [r.model for r in ranked][2] == "weak"
    top, second, last = ranked
    assert top.next_model == second.model and top.tied_with_next  # good and twin differ by noise only
    assert second.vs_next["ci95"][0] > 0 and not second.tied_with_next  # both clearly beat weak
    assert last.vs_next is None and not last.tied_with_next
    assert set(top.summary()["vs_next"]) == {"delta", "ci95", "p_better"}


def test_without_draws_intervals_are_none_and_p_is_a_count():
    r = merge_rate(SCORES, merged="merged", base="base", parents=["coder", "poet"], sets=SETS)
    assert r.mean_nai_ci95 is None and r.sets[0].nai_ci95 is None
    assert r.sets[0].vs_base == {"delta": 7.0 - 10.0, "ci95": None, "p_better": None}
    assert r.p_beats_base == pytest.approx(3 / 4) and "share of sets" in r.p_beats_base_basis
