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
  beats base         improvement(m, b) > 0, counted over all sets: P[merged > base]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from modelalloy.evaluate.sets import EvalError


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


@dataclass
class MergeRate:
    """The merge rate of one merged model: per set, and summarised over sets."""

    model: str
    sets: list[SetRate]
    mean_nai: float | None = None  # over sets with an expert that beat the base
    mean_normalized_score: float | None = None  # over sets with an expert
    mean_gain_over_best: float = 0.0  # over all sets
    mean_forgetting: float | None = None  # over control sets
    p_beats_base: float = 0.0  # over all sets
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "model": self.model,
            "mean_nai": self.mean_nai,
            "mean_normalized_score": self.mean_normalized_score,
            "mean_gain_over_best": self.mean_gain_over_best,
            "mean_forgetting": self.mean_forgetting,
            "p_beats_base": self.p_beats_base,
            "notes": self.notes,
            "sets": [vars(s) for s in self.sets],
        }


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def merge_rate(
    scores: Mapping[str, Mapping[str, float]],
    *,
    merged: str,
    base: str,
    parents: Sequence[str],
    sets: Sequence[SetInfo],
) -> MergeRate:
    """Rate `merged` against `base` and `parents` on every set of `sets` (see module docstring).

    Args:
        scores: {model: {set name: score}}; every model named here must have every set.
        merged, base: keys of `scores`.
        parents: the models that were merged (without the base), keys of `scores`.
        sets: the eval sets, with their direction and expert (one of `parents`, or None).
    """
    if not parents:
        raise EvalError("merge rate: at least one parent model is needed")
    for model in (merged, base, *parents):
        if model not in scores:
            raise EvalError(f"merge rate: no scores for model {model!r}")
        missing = [s.name for s in sets if s.name not in scores[model]]
        if missing:
            raise EvalError(f"merge rate: model {model!r} has no score on {', '.join(missing)}")
    rows: list[SetRate] = []
    notes: list[str] = []
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
            )
        )
    return MergeRate(
        model=merged,
        sets=rows,
        mean_nai=_mean([r.nai for r in rows]),
        mean_normalized_score=_mean([r.normalized_score for r in rows]),
        mean_gain_over_best=_mean([r.gain_over_best for r in rows]) or 0.0,
        mean_forgetting=_mean([r.forgetting for r in rows if r.expert is None]),
        p_beats_base=sum(r.beats_base for r in rows) / len(rows) if rows else 0.0,
        notes=notes,
    )


def rank(rates: Sequence[MergeRate]) -> list[MergeRate]:
    """Best first: highest mean NAI (undefined last), then least forgetting, then largest gain."""

    def key(r: MergeRate) -> tuple:
        return (
            -(r.mean_nai if r.mean_nai is not None else -math.inf),
            r.mean_forgetting if r.mean_forgetting is not None else 0.0,
            -r.mean_gain_over_best,
        )

    return sorted(rates, key=key)
