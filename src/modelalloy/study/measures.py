"""The study's numbers, as plain functions of arrays: nothing here loads or runs a model.

- `linear_cka(X, Y)`: linear centered kernel alignment of two representations of the same n
  inputs (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited",
  eq. 5): ‖Yᶜᵀ Xᶜ‖_F² / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F) with columns centered; 1 = the same up to a
  rotation and isotropic scale, near 0 = unrelated.
- `distinct_n(tokens, n)`: distinct n-grams / n-grams of one sequence (Li et al. 2016, "A
  Diversity-Promoting Objective Function for Neural Conversation Models", §4.3).
- `repeated_ngram_share(tokens, n)`: the share of a sequence's n-grams already seen earlier in it
  (1 − distinct-n): how much of a greedy continuation is a loop.
- `spearman(x, y)`: Spearman's ρ, the Pearson correlation of average ranks (ties share a rank);
  `spearman_interval`: its percentile interval over seeded resamples of the (x, y) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of x [n, d1] and y [n, d2], rows the same n inputs (see module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same inputs: {x.shape[0]} rows against {y.shape[0]}")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    # Feature-space form: d×d products, cheaper than the n×n Gram matrices when n > d.
    cross = np.linalg.norm(y.T @ x) ** 2
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denom) if denom > 0 else float("nan")


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[int], n: int = 2) -> float | None:
    """Distinct n-grams / n-grams of one sequence; None when it is shorter than n."""
    grams = _ngrams(list(tokens), n)
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_share(tokens: Sequence[int], n: int = 4) -> float | None:
    """The share of n-gram positions whose n-gram occurred earlier in the sequence."""
    grams = _ngrams(list(tokens), n)
    if not grams:
        return None
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    out = np.empty(len(v))
    sorted_v = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        out[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ of paired values; None for fewer than 3 pairs or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else None


def spearman_interval(x: Sequence[float], y: Sequence[float], *, resamples: int = 1000, seed: int = 0) -> list[float] | None:
    """95 % percentile interval of ρ over resamples of the pairs (drawn with replacement, seeded).

    Resamples where ρ is undefined (a side constant in the draw) are left out; None if most are.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3:
        return None
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(resamples):
        idx = rng.integers(0, len(x), size=len(x))
        r = spearman(x[idx], y[idx])
        if r is not None:
            rhos.append(r)
    if len(rhos) < resamples / 2:
        return None
    low, high = np.percentile(rhos, [2.5, 97.5])
    return [float(low), float(high)]

