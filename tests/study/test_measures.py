"""The study's measures against independent NumPy (and SciPy) computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from modelalloy.evaluate.scoring import predictive_entropy as entropy
from modelalloy.study.measures import distinct_n, linear_cka, ranks, repeated_ngram_share, spearman, spearman_interval


def cka_by_gram(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019 eq. 3 with linear kernels: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), H = I − 11ᵀ/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_matches_the_gram_matrix_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    y = x @ rng.normal(size=(8, 5)) + 0.5 * rng.normal(size=(40, 5))
    assert linear_cka(x, y) == pytest.approx(cka_by_gram(x, y), rel=1e-10)
    assert linear_cka(x, rng.normal(size=(40, 6))) == pytest.approx(cka_by_gram(x, rng.normal(size=(40, 6))), abs=0.5)


def test_linear_cka_is_one_under_rotation_and_scale():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(x, x[:5])


def test_entropy_matches_numpy():
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(0))
    p = np.exp(logits.numpy().astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(entropy(logits).numpy(), expected, rtol=1e-5)
    assert float(entropy(torch.zeros(1, 16))[0]) == pytest.approx(np.log(16))


def test_distinct_and_repeated_ngrams_match_numpy():
    rng = np.random.default_rng(2)
    seq = rng.integers(0, 4, size=50).tolist()
    for n in (2, 3, 4):
        grams = np.lib.stride_tricks.sliding_window_view(np.array(seq), n)
        unique = np.unique(grams, axis=0)
        assert distinct_n(seq, n) == pytest.approx(len(unique) / len(grams))
        # Repeated = positions minus first occurrences: 1 − distinct-n.
        assert repeated_ngram_share(seq, n) == pytest.approx(1 - len(unique) / len(grams))
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 / 5)
    assert distinct_n([5, 5, 5, 5], 2) == pytest.approx(1 / 3)
    assert distinct_n([1], 2) is None and repeated_ngram_share([1, 2, 3], 4) is None


def test_spearman_matches_numpy_and_scipy():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=25), rng.normal(size=25)
    y = y + x
    # No ties: 1 − 6 Σ d² / (n (n² − 1)), ranks by a double argsort.
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    n = len(x)
    assert spearman(x, y) == pytest.approx(1 - 6 * ((rx - ry) ** 2).sum() / (n * (n * n - 1)))
    # Ties: average ranks, the Pearson correlation of the ranks.
    xt, yt = np.round(x), np.round(y * 2) / 2
    np.testing.assert_allclose(ranks(xt), scipy.stats.rankdata(xt))
    assert spearman(xt, yt) == pytest.approx(scipy.stats.spearmanr(xt, yt).statistic)
    assert spearman([1, 2], [3, 4]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_spearman_interval_is_seeded_and_covers_rho():
    rng = np.random.default_rng(4)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    ci = spearman_interval(x, y, resamples=300, seed=0)
    assert ci == spearman_interval(x, y, resamples=300, seed=0)
    assert ci[0] < spearman(x, y) < ci[1] and ci[0] > 0
    wide = spearman_interval(x[:8], y[:8], resamples=300, seed=0)
    assert wide[1] - wide[0] > ci[1] - ci[0]  # fewer merges, less certainty


def test_interference_against_numpy_with_tensors_no_specialist_changed(tmp_path):
    """Sign conflicts, cosines, norm ratio and relative norm over the whole model, by hand; the
    specialists change only the top layer, so most tensors take the no-change shortcut."""
    from itertools import combinations

    from safetensors.numpy import load_file

    from modelalloy.study.diagnostics import interference

    from .conftest import tiny_llama

    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    names = ["a", "b", "c"]
    for i, n in enumerate(names):
        model = tiny_llama()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("model.layers.1.mlp."):  # the top layer's MLP only
                    noise = torch.randn_like(p) * 0.01
                    noise[torch.rand_like(p) < 0.3 + 0.2 * i] = 0.0  # zeros, so some entries have fewer than two movers
                    p.add_(noise)
        model.save_pretrained(tmp_path / n)
    subsets = [("a", "b"), ("a", "c"), ("a", "b", "c")]
    got = interference(str(tmp_path / "base"), {n: str(tmp_path / n) for n in names}, subsets)
    b = load_file(tmp_path / "base" / "model.safetensors")
    ds = {n: np.concatenate([(load_file(tmp_path / n / "model.safetensors")[k].astype(np.float64) - b[k].astype(np.float64)).ravel() for k in sorted(b)]) for n in names}
    base_norm = np.sqrt(sum(float((b[k].astype(np.float64) ** 2).sum()) for k in b))
    for s in subsets:
        stack = np.stack([ds[n] for n in s])
        pos, neg = (stack > 0).sum(0), (stack < 0).sum(0)
        norms = np.linalg.norm(stack, axis=1)
        cos = [stack[i] @ stack[j] / (norms[i] * norms[j]) for i, j in combinations(range(len(s)), 2)]
        assert got[s]["sign_conflict"] == pytest.approx(((pos > 0) & (neg > 0)).sum() / ((pos + neg) >= 2).sum(), rel=1e-12)
        assert got[s]["mean_cosine"] == pytest.approx(np.mean(cos), rel=1e-9)
        assert got[s]["norm_ratio"] == pytest.approx(norms.max() / norms.min(), rel=1e-9)
        assert got[s]["relative_norm"] == pytest.approx(norms.mean() / base_norm, rel=1e-9)
