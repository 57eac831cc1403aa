"""The merge-rate table: did the merged model beat its parents, by how much, and on what.

Everything here works on plain score tables, {model: {eval set: score}}, so it can be checked by
hand. Each eval set says whether higher is better (accuracy) or lower is better (perplexity), and
which parent is its expert (the model fine-tuned for it); a set with no expert is a held-out
control, where the question is how much the merge forgot.

"Better" is always read in the set's own direction through `improvement(x, ref)`:
x − ref when higher is better, ref − x when lower is better; positive means x is better.

Per set, for a merged model m, base b and expert e (definitions after Yadav et al. 2023, TIES, and
the "normalized accuracy improvement" of Ortiz-Jimenez et al. 2023):
  normalized score   m / e (higher is better) or e / m (lower is better): 1.0 = as good as the expert
  NAI                improvement(m, b) / improvement(e, b): the share of the expert's gain over the
                     base that the merge kept; undefined (None) when the expert did not beat the base
  gain over best     improvement(m, best parent) / abs(best parent): relative, so sets mix
  forgetting         on control sets, improvement(b, m) / abs(b): how much worse than the base, relative
  beats base         improvement(m, b) > 0 on all units

With bootstrap draws (`evaluate.bootstrap`: each model's score on the same resamples of a set's
units), every one of these gets a 95 % interval, computed per resample from the paired scores
(NAI: the ratio of the paired differences), and each set gets paired comparisons of the merged
model against the base, its expert and the best parent: {"delta": m − ref, "ci95", "p_better"}.
The summary's means get intervals from the per-resample means over sets, and `p_beats_base`
becomes the mean over sets of p_better against the base (`p_beats_base_basis` says which it is).
Without draws (scores given by hand, or sets too small to resample) the intervals are None.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from modelalloy.evaluate.bootstrap import compare, percentile_interval, within_noise
from modelalloy.evaluate.sets import EvalError

# {model: {set: the score on each bootstrap resample, or None}}
Draws = Mapping[str, Mapping[str, "np.ndarray | None"]]

P_FROM_BOOTSTRAP = "mean over sets of p_better against the base (paired bootstrap)"
P_FROM_COUNT = "share of sets where the merged model beats the base (no intervals: no bootstrap draws)"


@dataclass(frozen=True)
class SetInfo:
    """What the rate table needs to know about one eval set."""

    name: str
    higher_is_better: bool
    expert: str | None = None  # the parent fine-tuned for this set; None = held-out control


def improvement(x: float, ref: float, higher_is_better: bool) -> float:
    """How much better x is than ref in the set's direction (positive = better)."""
    return x - ref if higher_is_better else ref - x


def normalized_score(merged: float, expert: float, higher_is_better: bool) -> float:
    if higher_is_better:
        return merged / expert if expert != 0 else math.nan
    return expert / merged if merged != 0 else math.nan


def nai(merged: float, base: float, expert: float, higher_is_better: bool) -> float | None:
    """Share of the expert's gain over the base kept by the merge; None if the expert gained nothing."""
    gained = improvement(expert, base, higher_is_better)
    if not gained > 0:
        return None
    return improvement(merged, base, higher_is_better) / gained


@dataclass
class SetRate:
    set: str
    merged: float
    base: float
    expert: str | None
    expert_score: float | None
    best_parent: str
    best_parent_score: float
    normalized_score: float | None
    nai: float | None
    gain_over_best: float
    forgetting: float | None  # only on control sets
    beats_base: bool
    # Paired comparisons, {"delta": merged − ref, "ci95", "p_better"}; ci95/p_better None without draws.
    vs_base: dict | None = None
    vs_expert: dict | None = None
    vs_best_parent: dict | None = None
    normalized_score_ci95: list[float] | None = None
    nai_ci95: list[float] | None = None
    gain_over_best_ci95: list[float] | None = None
    forgetting_ci95: list[float] | None = None


@dataclass
class MergeRate:
    """The merge rate of one merged model: per set, and summarised over sets."""

    model: str
    sets: list[SetRate]
    mean_nai: float | None = None  # over sets with an expert that beat the base
    mean_normalized_score: float | None = None  # over sets with an expert
    mean_gain_over_best: float = 0.0  # over all sets
    mean_forgetting: float | None = None  # over control sets
    p_beats_base: float = 0.0  # see p_beats_base_basis
    p_beats_base_basis: str = P_FROM_COUNT
    notes: list[str] = field(default_factory=list)
    mean_nai_ci95: list[float] | None = None
    mean_normalized_score_ci95: list[float] | None = None
    mean_gain_over_best_ci95: list[float] | None = None
    mean_forgetting_ci95: list[float] | None = None
    # Set by `rank`: the paired comparison of mean NAI with the next method down.
    next_model: str | None = None
    vs_next: dict | None = None
    # Per-resample values of the summary means, for paired comparisons between merges.
    draws: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def tied_with_next(self) -> bool:
        """Not distinguishable from the next method down: the paired interval includes zero."""
        return self.vs_next is not None and within_noise(self.vs_next["ci95"])

    def summary(self) -> dict:
        return {
            "model": self.model,
            "mean_nai": self.mean_nai,
            "mean_nai_ci95": self.mean_nai_ci95,
            "mean_normalized_score": self.mean_normalized_score,
            "mean_normalized_score_ci95": self.mean_normalized_score_ci95,
            "mean_gain_over_best": self.mean_gain_over_best,
            "mean_gain_over_best_ci95": self.mean_gain_over_best_ci95,
            "mean_forgetting": self.mean_forgetting,
            "mean_forgetting_ci95": self.mean_forgetting_ci95,
            "p_beats_base": self.p_beats_base,
            "p_beats_base_basis": self.p_beats_base_basis,
            "next_model": self.next_model,
            "vs_next": self.vs_next,
            "notes": self.notes,
            "sets": [vars(s) for s in self.sets],
        }


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _improvement_draws(x: np.ndarray, ref: np.ndarray, higher_is_better: bool) -> np.ndarray:
    return x - ref if higher_is_better else ref - x


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def _mean_draws(rows: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Per resample, the mean over sets; None if any set has no draws (no honest interval then)."""
    if not rows or any(r is None for r in rows):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where every set is undefined stays NaN
        return np.nanmean(np.stack(rows), axis=0)


def merge_rate(
    scores: Mapping[str, Mapping[str, float]],
    *,
    merged: str,
    base: str,
    parents: Sequence[str],
    sets: Sequence[SetInfo],
    draws: Draws | None = None,
) -> MergeRate:
    """Rate `merged` against `base` and `parents` on every set of `sets` (see module docstring).

    Args:
        scores: {model: {set name: score}}; every model named here must have every set.
        merged, base: keys of `scores`.
        parents: the models that were merged (without the base), keys of `scores`.
        sets: the eval sets, with their direction and expert (one of `parents`, or None).
        draws: optional {model: {set name: score per bootstrap resample}}, the same resamples for
            every model of a set (`EvalResult.draws()`); then every number gets an interval.
    """
    if not parents:
        raise EvalError("merge rate: at least one parent model is needed")
    for model in (merged, base, *parents):
        if model not in scores:
            raise EvalError(f"merge rate: no scores for model {model!r}")
        missing = [s.name for s in sets if s.name not in scores[model]]
        if missing:
            raise EvalError(f"merge rate: model {model!r} has no score on {', '.join(missing)}")

    def drawn(model: str, set_name: str) -> np.ndarray | None:
        return None if draws is None else (draws.get(model) or {}).get(set_name)

    rows: list[SetRate] = []
    notes: list[str] = []
    per_set: dict[str, dict[str, np.ndarray | None]] = {}
    for s in sets:
        if s.expert is not None and s.expert not in parents:
            raise EvalError(f"eval set {s.name!r}: expert {s.expert!r} is not one of the merged models ({', '.join(parents)})")
        hib = s.higher_is_better
        m, b = scores[merged][s.name], scores[base][s.name]
        best = max(parents, key=lambda p: improvement(scores[p][s.name], 0.0, hib))
        best_score = scores[best][s.name]
        e = scores[s.expert][s.name] if s.expert else None
        rate_nai = nai(m, b, e, hib) if e is not None else None
        if e is not None and rate_nai is None:
            notes.append(f"{s.name}: the expert {s.expert} is not better than the base, so NAI is undefined there")
        dm, db, dbest = drawn(merged, s.name), drawn(base, s.name), drawn(best, s.name)
        de = drawn(s.expert, s.name) if s.expert else None
        have = dm is not None and db is not None and dbest is not None and (e is None or de is not None)
        d = {"nai": None, "normalized_score": None, "gain_over_best": None, "forgetting": None}
        if have:
            if e is not None:
                gained = _improvement_draws(de, db, hib)
                # NAI per resample: the ratio of the paired differences; undefined where the
                # expert did not beat the base in that resample.
                d["nai"] = np.where(gained > 0, _ratio(_improvement_draws(dm, db, hib), gained), np.nan) if rate_nai is not None else None
                d["normalized_score"] = _ratio(dm, de) if hib else _ratio(de, dm)
                if d["nai"] is not None:
                    undefined = float(np.mean(~np.isfinite(d["nai"])))
                    if undefined > 0.025:
                        notes.append(f"{s.name}: in {100 * undefined:.0f} % of resamples the expert {s.expert} is not better than the base; "
                                     "NAI's interval there leaves them out, read it with care")
            d["gain_over_best"] = _ratio(_improvement_draws(dm, dbest, hib), np.abs(dbest))
            if s.expert is None:
                d["forgetting"] = _ratio(_improvement_draws(db, dm, hib), np.abs(db))
        per_set[s.name] = d
        rows.append(
            SetRate(
                set=s.name,
                merged=m,
                base=b,
                expert=s.expert,
                expert_score=e,
                best_parent=best,
                best_parent_score=best_score,
                normalized_score=normalized_score(m, e, hib) if e is not None else None,
                nai=rate_nai,
                gain_over_best=improvement(m, best_score, hib) / abs(best_score) if best_score else math.nan,
                forgetting=improvement(b, m, hib) / abs(b) if s.expert is None and b else None,
                beats_base=improvement(m, b, hib) > 0,
                vs_base=compare(m, b, dm, db, hib),
                vs_expert=compare(m, e, dm, de, hib) if e is not None else None,
                vs_best_parent=compare(m, best_score, dm, dbest, hib),
                normalized_score_ci95=percentile_interval(d["normalized_score"]) if d["normalized_score"] is not None else None,
                nai_ci95=percentile_interval(d["nai"]) if d["nai"] is not None else None,
                gain_over_best_ci95=percentile_interval(d["gain_over_best"]) if d["gain_over_best"] is not None else None,
                forgetting_ci95=percentile_interval(d["forgetting"]) if d["forgetting"] is not None else None,
            )
        )
    mean_draws = {
        "mean_nai": _mean_draws([per_set[r.set]["nai"] for r in rows if r.nai is not None]),
        "mean_normalized_score": _mean_draws([per_set[r.set]["normalized_score"] for r in rows if r.normalized_score is not None]),
        "mean_gain_over_best": _mean_draws([per_set[r.set]["gain_over_best"] for r in rows]),
        "mean_forgetting": _mean_draws([per_set[r.set]["forgetting"] for r in rows if r.expert is None]),
    }
    p_values = [r.vs_base["p_better"] for r in rows]
    from_bootstrap = bool(rows) and all(p is not None for p in p_values)
    rate = MergeRate(
        model=merged,
        sets=rows,
        mean_nai=_mean([r.nai for r in rows]),
        mean_normalized_score=_mean([r.normalized_score for r in rows]),
        mean_gain_over_best=_mean([r.gain_over_best for r in rows]) or 0.0,
        mean_forgetting=_mean([r.forgetting for r in rows if r.expert is None]),
        p_beats_base=(sum(p_values) / len(rows) if from_bootstrap else sum(r.beats_base for r in rows) / len(rows)) if rows else 0.0,
        p_beats_base_basis=P_FROM_BOOTSTRAP if from_bootstrap else P_FROM_COUNT,
        notes=notes,
        draws={k: v for k, v in mean_draws.items() if v is not None},
    )
    for key, v in mean_draws.items():
        setattr(rate, f"{key}_ci95", percentile_interval(v) if v is not None else None)
    return rate


def rank(rates: Sequence[MergeRate]) -> list[MergeRate]:
    """Best first: highest mean NAI (undefined last), then least forgetting, then largest gain.

    Each rate gets `vs_next`, the paired comparison of its mean NAI with the next one's (delta,
    ci95, p_better); `tied_with_next` says when the two are not distinguishable.
    """

    def key(r: MergeRate) -> tuple:
        return (
            -(r.mean_nai if r.mean_nai is not None else -math.inf),
            r.mean_forgetting if r.mean_forgetting is not None else 0.0,
            -r.mean_gain_over_best,
        )

    ranked = sorted(rates, key=key)
    # Paired, on the same resamples: is each method measurably better than the next one down?
    for upper, lower in zip(ranked, ranked[1:]):
        upper.next_model = lower.model
        if upper.mean_nai is not None and lower.mean_nai is not None:
            upper.vs_next = compare(upper.mean_nai, lower.mean_nai, upper.draws.get("mean_nai"), lower.draws.get("mean_nai"), True)
    return ranked
