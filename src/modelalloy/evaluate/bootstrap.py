"""Confidence intervals and paired comparisons: the bootstrap over evaluation units.

A score is a statistic of *units*, the pieces of an eval set that can be resampled independently:

- perplexity: documents (or fixed windows, when a set is one long text); a unit keeps the sum of
  its tokens' negative log-likelihoods and its token count, and perplexity is
  exp(Σ NLL / Σ tokens) over the units drawn, never a mean of per-unit perplexities;
- accuracy (multiple choice, classification, lm-eval's per-sample metrics): items, each right or
  wrong; macro-F1: items, each a (prediction, label) pair.

One resample draws n units with replacement from a set's n units; we keep it as counts, how often
each unit was drawn ([resamples, n]), so every statistic of a resample is a weighted sum over the
units. The units of set S are drawn by ``np.random.default_rng([seed, zlib.crc32(S)])`` as
``integers(0, n, size=(resamples, n))``: every model scored on S sees the *same* resamples, so a
comparison of two models is paired (each resample compares them on the same units), and results do
not depend on the order in which sets or models are scored.

An interval is the percentile interval, the 2.5th and 97.5th percentiles of the resampled
statistic (Efron & Tibshirani 1993, ch. 13). A paired comparison of merged model m and reference r
on one set is delta = m − r on all units, its interval from the resampled m − r, and p_better =
the share of resamples in which m is better (lower perplexity, higher accuracy). Fewer than
`MIN_UNITS` units give no interval: too few to resample.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
MIN_UNITS = 10  # below this a bootstrap interval says more about the few units than the model


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] int64: how often each of `n` units is drawn in each resample."""
    idx = rng.integers(0, n, size=(resamples, n))
    # One bincount over all rows at once: row r's draws are offset by r * n.
    flat = (idx + np.arange(resamples)[:, None] * n).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n)


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: `resamples` per set, seeded by (`seed`, set name)."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError(f"resamples must be at least 1, not {self.resamples}")

    def rng(self, set_name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(set_name.encode("utf-8"))])

    def counts(self, set_name: str, n: int) -> np.ndarray:
        return resample_counts(n, self.resamples, self.rng(set_name))


def n_units(units: Mapping) -> int:
    kind = units["kind"]
    column = {"perplexity": "tokens", "items": units.get("main"), "classification": "label"}.get(kind)
    if column is None:
        raise ValueError(f"unknown unit kind {kind!r}")
    return len(units[column])


def n_tokens(units: Mapping) -> int | None:
    return int(sum(units["tokens"])) if units["kind"] == "perplexity" else None


def statistic(units: Mapping, counts: np.ndarray, metric: str | None = None) -> np.ndarray:
    """The score on each resample: `counts` [resamples, n] -> [resamples].

    `units` is what the scorer recorded: ``{"kind": "perplexity", "nll": [...], "tokens": [...]}``;
    ``{"kind": "items", "main": "accuracy", "accuracy": [1, 0, ...], ...}`` (a column per metric,
    its mean the score) or ``{"kind": "classification", "predicted": [...], "label": [...]}``.
    `metric` picks another than the main one (``accuracy_norm``, ``macro_f1``).
    """
    counts = np.asarray(counts, dtype=np.float64)
    kind = units["kind"]
    if kind == "perplexity":
        nll = np.asarray(units["nll"], dtype=np.float64)
        tokens = np.asarray(units["tokens"], dtype=np.float64)
        total = counts @ tokens
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.exp((counts @ nll) / total)  # pooled over the units drawn, not a mean of ratios
    if kind == "items":
        column = metric or units["main"]
        if column not in units:
            raise ValueError(f"these units have no metric {column!r}")
        return counts @ np.asarray(units[column], dtype=np.float64) / counts.sum(axis=1)
    if kind == "classification":
        predicted, label = np.asarray(units["predicted"]), np.asarray(units["label"])
        if metric in (None, "accuracy"):
            return counts @ (predicted == label).astype(np.float64) / counts.sum(axis=1)
        if metric != "macro_f1":
            raise ValueError(f"classification units have no metric {metric!r}")
        # Per class c: tp, fp, fn are counts-weighted sums; F1 = 2tp / (2tp + fp + fn), averaged
        # over the classes that occur (as a label or a prediction) in the resample, as scoring does.
        f1_sum = np.zeros(counts.shape[0])
        present = np.zeros(counts.shape[0])
        for c in np.union1d(predicted, label):
            is_p, is_y = predicted == c, label == c
            tp = counts @ (is_p & is_y).astype(np.float64)
            fp = counts @ (is_p & ~is_y).astype(np.float64)
            fn = counts @ (~is_p & is_y).astype(np.float64)
            seen = (tp + fp + fn) > 0
            f1_sum += np.where(seen, 2 * tp / np.where(seen, 2 * tp + fp + fn, 1.0), 0.0)
            present += seen
        return f1_sum / present
    raise ValueError(f"unknown unit kind {kind!r}")


def value(units: Mapping, metric: str | None = None) -> float:
    """The statistic on all units (each drawn once)."""
    return float(statistic(units, np.ones((1, n_units(units))), metric)[0])


def percentile_interval(draws: np.ndarray) -> list[float] | None:
    """[2.5th, 97.5th] percentile of the finite draws; None when there are none."""
    draws = np.asarray(draws, dtype=np.float64)
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, [2.5, 97.5])
    return [float(low), float(high)]


def better(diff: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Where a difference (x − ref) means x is better, in the metric's own direction."""
    return diff > 0 if higher_is_better else diff < 0


def compare(x_value: float, ref_value: float, x_draws: np.ndarray | None, ref_draws: np.ndarray | None, higher_is_better: bool) -> dict:
    """The paired comparison of x against ref on one set: {"delta", "ci95", "p_better"}.

    delta = x − ref in the metric's units (perplexity: negative = x better). Without draws (a set
    too small to resample, or scores given by hand) ci95 and p_better are None.
    """
    out = {"delta": x_value - ref_value, "ci95": None, "p_better": None}
    if x_draws is not None and ref_draws is not None:
        diff = np.asarray(x_draws) - np.asarray(ref_draws)
        out["ci95"] = percentile_interval(diff)
        out["p_better"] = float(np.mean(better(diff, higher_is_better)))
    return out


def within_noise(ci95: list[float] | None) -> bool:
    """True when an interval of a difference includes zero: the two are not distinguishable."""
    return ci95 is not None and ci95[0] <= 0.0 <= ci95[1]


def half_width(ci95: list[float] | None) -> float | None:
    return None if ci95 is None else (ci95[1] - ci95[0]) / 2
