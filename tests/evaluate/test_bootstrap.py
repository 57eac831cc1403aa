"""The bootstrap against independent NumPy computations: resample units, recompute, take percentiles."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from modelalloy.evaluate import bootstrap
from modelalloy.evaluate.bootstrap import Bootstrap, compare, percentile_interval, statistic, value


def _units(n: int, seed: int, shift: float = 0.0) -> dict:
    """Perplexity units of very different lengths (3 to 300 tokens), so pooling matters."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 300, size=n)
    per_token = rng.gamma(4.0, 0.8, size=n) + shift  # each unit's mean NLL, nats
    return {"kind": "perplexity", "nll": (per_token * tokens).tolist(), "tokens": tokens.tolist()}


def _draws(set_name: str, seed: int, n: int, resamples: int) -> np.ndarray:
    """The documented draw: default_rng([seed, crc32(set name)]).integers(0, n, (resamples, n))."""
    return np.random.default_rng([seed, zlib.crc32(set_name.encode())]).integers(0, n, size=(resamples, n))


def test_perplexity_interval_matches_an_independent_numpy_bootstrap():
    units = _units(40, seed=1)
    nll, tokens = np.array(units["nll"]), np.array(units["tokens"])
    idx = _draws("news", seed=7, n=40, resamples=500)
    # Per resample: the drawn units' total NLL over their total tokens, exponentiated.
    expected = np.array([math.exp(nll[i].sum() / tokens[i].sum()) for i in idx])
    got = statistic(units, Bootstrap(resamples=500, seed=7).counts("news", 40))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert percentile_interval(got) == pytest.approx(list(np.percentile(expected, [2.5, 97.5])), rel=1e-12)
    # The point value pools tokens; a mean of per-unit perplexities would be another number.
    pooled = math.exp(nll.sum() / tokens.sum())
    assert value(units) == pytest.approx(pooled, rel=1e-12)
    assert abs(np.mean(np.exp(nll / tokens)) - pooled) > 0.05 * pooled
    lo, hi = percentile_interval(got)
    assert lo < pooled < hi


def test_interval_narrows_as_units_grow():
    widths = {}
    for n in (16, 64, 256):
        lo, hi = percentile_interval(statistic(_units(n, seed=3), Bootstrap(seed=0).counts("code", n)))
        widths[n] = hi - lo
    # Four times the units, about half the width (1/sqrt(4)); allow for the draw's own noise.
    assert widths[64] < 0.75 * widths[16]
    assert widths[256] < 0.75 * widths[64]


def test_resamples_are_fixed_by_seed_and_set_and_shared_by_models():
    b = Bootstrap(resamples=200, seed=5)
    counts = b.counts("poems", 30)
    assert counts.shape == (200, 30) and (counts.sum(axis=1) == 30).all()
    assert np.array_equal(counts, Bootstrap(resamples=200, seed=5).counts("poems", 30))
    assert not np.array_equal(counts, b.counts("news", 30))  # each set its own draws
    assert not np.array_equal(counts, Bootstrap(resamples=200, seed=6).counts("poems", 30))
    idx = _draws("poems", seed=5, n=30, resamples=200)
    assert np.array_equal(counts, np.stack([np.bincount(row, minlength=30) for row in idx]))
    with pytest.raises(ValueError, match="resamples must be at least 1"):
        Bootstrap(resamples=0)


def test_paired_comparison_resamples_the_same_units_for_both_models():
    # B is A with every unit 2 % better plus small noise: unpaired intervals overlap, the paired one does not.
    a = _units(50, seed=11)
    rng = np.random.default_rng(12)
    b = dict(a, nll=[x * 0.98 * (1 + rng.normal(0, 0.002)) for x in a["nll"]])
    counts = Bootstrap(resamples=1000, seed=2).counts("verse", 50)
    da, db = statistic(a, counts), statistic(b, counts)
    got = compare(value(b), value(a), db, da, higher_is_better=False)
    idx = _draws("verse", seed=2, n=50, resamples=1000)
    nll_a, nll_b, tok = (np.array(x) for x in (a["nll"], b["nll"], a["tokens"]))
    diff = np.array([math.exp(nll_b[i].sum() / tok[i].sum()) - math.exp(nll_a[i].sum() / tok[i].sum()) for i in idx])
    assert got["delta"] == pytest.approx(value(b) - value(a))
    assert got["ci95"] == pytest.approx(list(np.percentile(diff, [2.5, 97.5])), rel=1e-9)
    assert got["p_better"] == pytest.approx(np.mean(diff < 0))
    assert got["ci95"][1] < 0 and got["p_better"] == 1.0  # B is measurably better
    ia, ib = percentile_interval(da), percentile_interval(db)
    assert ib[1] > ia[0]  # ...though the two intervals alone overlap
    assert not bootstrap.within_noise(got["ci95"]) and bootstrap.within_noise([-0.1, 0.2])
    # Higher-is-better flips what "better" means.
    assert compare(0.6, 0.5, np.array([0.7, 0.4, 0.6]), np.array([0.5, 0.5, 0.5]), True)["p_better"] == pytest.approx(2 / 3)
    assert compare(1.0, 2.0, None, None, False) == {"delta": -1.0, "ci95": None, "p_better": None}


def _macro_f1(pred: np.ndarray, label: np.ndarray) -> float:
    f1s = []
    for c in sorted(set(pred) | set(label)):
        tp = np.sum((pred == c) & (label == c))
        fp = np.sum((pred == c) & (label != c))
        fn = np.sum((pred != c) & (label == c))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def test_accuracy_and_macro_f1_resample_items():
    rng = np.random.default_rng(4)
    label = rng.integers(0, 3, size=60)
    pred = np.where(rng.random(60) < 0.7, label, rng.integers(0, 3, size=60))
    units = {"kind": "classification", "predicted": pred.tolist(), "label": label.tolist()}
    counts = Bootstrap(resamples=300, seed=1).counts("reviews", 60)
    idx = _draws("reviews", seed=1, n=60, resamples=300)
    np.testing.assert_allclose(statistic(units, counts), [np.mean(pred[i] == label[i]) for i in idx], rtol=1e-12)
    np.testing.assert_allclose(statistic(units, counts, "macro_f1"), [_macro_f1(pred[i], label[i]) for i in idx], rtol=1e-12)
    assert value(units, "macro_f1") == pytest.approx(_macro_f1(pred, label))
    choice = {"kind": "items", "main": "accuracy", "accuracy": (pred == label).astype(int).tolist(), "accuracy_norm": [1] * 60}
    np.testing.assert_allclose(statistic(choice, counts), statistic(units, counts), rtol=1e-12)
    assert value(choice, "accuracy_norm") == 1.0
    assert bootstrap.n_units(choice) == 60 and bootstrap.n_tokens(choice) is None
    with pytest.raises(ValueError, match="no metric 'f2'"):
        statistic(choice, counts, "f2")
