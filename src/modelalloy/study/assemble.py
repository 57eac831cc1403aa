"""From scored models to `study.json`: merge rates with intervals, curves, predictors.

Every model's score on a set shares that set's bootstrap resamples (`evaluate.EvalResult`), so a
merge's NAI, the curves' means over subsets and the fusion baselines are all paired. A subset's
held-in sets are those whose expert it merged; its other sets count as controls (forgetting).

Curves: per (method or fusion kind, strength, k), the mean over expert subsets of each run's mean
NAI, its interval from resamples that draw the subsets with replacement *and* take each run's
NAI on the same unit resample (so both the choice of experts and the eval text are uncertain).
The same for the held-in cross-entropy (mean over held-in sets of log perplexity, nats/token),
which the scaling-law fit reads. Per-run resampled values are kept in `OUT/draws.npz`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from modelalloy.evaluate import Bootstrap, EvalResult, SetInfo, merge_rate
from modelalloy.evaluate.bootstrap import percentile_interval
from modelalloy.study.diagnostics import DIAGNOSTICS
from modelalloy.study.measures import spearman, spearman_interval
from modelalloy.study.scaling_law import study_scaling_laws


def _num(v: float | None, ci: list[float] | None = None) -> dict:
    return {"value": None if v is None or not math.isfinite(v) else float(v), "ci95": ci}


def _oracle_sets(spec, models, subset, st) -> dict[str, dict]:
    """Each set scored by its own expert; a set without one in the subset by the subset's best."""
    out = {}
    for s in spec.sets:
        if s.expert in subset:
            out[s.name] = dict(models[f"{s.expert}@{st}"].sets[s.name])
        else:
            best = min(subset, key=lambda n: models[f"{n}@{st}"].sets[s.name]["score"] * (-1 if s.higher_is_better else 1))
            out[s.name] = dict(models[f"{best}@{st}"].sets[s.name])
    return out


def assemble(spec, models: dict, runs: list[dict], fusion: list[dict], divergence: dict, *, out: Path | None = None) -> dict:
    """The study's JSON (keys as the issue names them: axes, runs, fusion, divergence, prediction)."""
    result = EvalResult(list(spec.sets), bootstrap=Bootstrap(spec.bootstrap.resamples, spec.bootstrap.seed))
    result.scores = {label: {n: dict(r) for n, r in m.sets.items()} for label, m in models.items()}
    for r in runs:
        result.scores[r["label"]] = {n: dict(v) for n, v in r["scored"].sets.items()}
    for f in fusion:
        sets = f["scored"].sets if f["scored"] is not None else _oracle_sets(spec, models, f["experts"], f["strength"])
        result.scores[f["label"]] = {n: dict(v) for n, v in sets.items()}
    result.finish()
    table, draws = result.table(), result.draws()
    saved: dict[str, np.ndarray] = {}

    def rated(record: dict) -> dict:
        label, subset, st = record["label"], record["experts"], record["strength"]
        infos = [SetInfo(s.name, s.higher_is_better, f"{s.expert}@{st}" if s.expert in subset else None) for s in spec.sets]
        rate = merge_rate(table, merged=label, base="base", parents=[f"{n}@{st}" for n in subset], sets=infos, draws=draws)
        held = [s.name for s in spec.sets if s.expert in subset and s.kind == "perplexity"]
        scores = {n: {k: r.get(k) for k in ("value", "ci95", "n_units", "n_tokens", "entropy")} | {"cross_entropy": r.get("nll")}
                  for n, r in result.scores[label].items()}
        ce = float(np.mean([scores[n]["cross_entropy"] for n in held])) if held else None
        ce_draws = None
        if held and all(draws[label].get(n) is not None for n in held):
            ce_draws = np.mean([np.log(draws[label][n]) for n in held], axis=0)
            saved[f"{label}::held_in_cross_entropy"] = ce_draws
        if rate.draws.get("mean_nai") is not None:
            saved[f"{label}::nai"] = rate.draws["mean_nai"]
        entropy = {}
        for n in held:
            mine, theirs = scores[n]["entropy"], models[f"{dict((s.name, s.expert) for s in spec.sets)[n]}@{st}"].sets[n].get("entropy")
            entropy[n] = {"model": mine, "expert": theirs, "ratio": mine / theirs if mine is not None and theirs else None}
        ratios = [e["ratio"] for e in entropy.values() if e["ratio"] is not None]
        coherence = {"entropy": entropy, "entropy_ratio": float(np.mean(ratios)) if ratios else None}
        rep = record["scored"].repetition if record.get("scored") is not None else None
        if rep is not None:
            parents = [models[f"{n}@{st}"].repetition for n in subset]
            coherence |= {"distinct_2": rep["distinct_2"], "repeated_4gram": rep["repeated_4gram"], "n_continuations": rep["n_continuations"],
                          "parents_distinct_2": float(np.mean([p["distinct_2"] for p in parents])),
                          "parents_repeated_4gram": float(np.mean([p["repeated_4gram"] for p in parents]))}
        return {
            "id": label, "experts": list(subset), "k": len(subset), "strength": st,
            "scores": scores,
            "nai": _num(rate.mean_nai, rate.mean_nai_ci95),
            "nai_per_set": {r.set: _num(r.nai, r.nai_ci95) for r in rate.sets if r.expert is not None},
            "forgetting": _num(rate.mean_forgetting, rate.mean_forgetting_ci95),
            "held_in_cross_entropy": _num(ce, percentile_interval(ce_draws) if ce_draws is not None else None),
            "coherence": coherence,
        }

    out_runs = [{"method": r["method"]} | rated(r) | {"interference": r["interference"]} for r in runs]
    out_fusion = [{"kind": f["kind"]} | rated(f) | {k: f[k] for k in ("params", "active_params", "forward_passes") if k in f} for f in fusion]
    base_params = models["base"].params
    for r in out_runs:
        r |= {"params": base_params, "forward_passes": 1}
    data = {
        "kind": "study",
        "axes": {
            "methods": [m.label for m in spec.methods],
            "k": sorted({len(s) for s in spec.subsets()}),
            "strengths": list(spec.strength_labels),
            "subsets": [list(s) for s in spec.subsets()],
            "fusion": list(spec.fusion),
            "sets": [{"name": s.name, "expert": s.expert, "metric": s.metric} for s in spec.sets],
        },
        "base": {"scores": {n: {k: r.get(k) for k in ("value", "ci95", "n_units", "n_tokens", "entropy")} | {"cross_entropy": r.get("nll")}
                            for n, r in result.scores["base"].items()}, "params": base_params},
        "specialists": {label: {"scores": {n: {k: r.get(k) for k in ("value", "ci95", "entropy")} for n, r in result.scores[label].items()},
                                "repetition": m.repetition} for label, m in models.items() if label != "base"},
        "runs": out_runs,
        "fusion": out_fusion,
        "divergence": [{"strength": st} | p for st, pairs in divergence.items() for p in pairs],
        "curves": curves(out_runs, out_fusion, saved, spec.bootstrap.seed),
        "prediction": prediction(out_runs, resamples=spec.bootstrap.resamples, seed=spec.bootstrap.seed),
        "bootstrap": {"resamples": spec.bootstrap.resamples, "seed": spec.bootstrap.seed, "interval": "95 % percentile"},
        "warnings": result.warnings,
    }
    data["scaling_law"] = study_scaling_laws(data, resamples=spec.bootstrap.resamples, seed=spec.bootstrap.seed)
    if out is not None and saved:
        np.savez_compressed(Path(out) / "draws.npz", **saved)
    return data


def _mean_over(records: list[dict], saved: dict, what: str, rng: np.random.Generator) -> dict:
    values = [r[what]["value"] for r in records if r[what]["value"] is not None]
    rows = [saved.get(f"{r['id']}::{what}") for r in records]
    ci = None
    if rows and all(d is not None for d in rows):
        d = np.stack(rows)  # [subsets, resamples]
        pick = rng.integers(0, len(rows), size=(d.shape[1], len(rows)))  # subsets drawn per resample
        with np.errstate(invalid="ignore"):
            ci = percentile_interval(np.nanmean(d[pick, np.arange(d.shape[1])[:, None]], axis=1))
    return _num(float(np.mean(values)) if values else None, ci) | {"n_subsets": len(records)}


def curves(runs: list[dict], fusion: list[dict], saved: dict, seed: int) -> dict:
    """Mean NAI and held-in cross-entropy over subsets: vs k per (method, strength), vs strength per method."""
    rng = np.random.default_rng(seed)
    by_k, by_strength = defaultdict(list), defaultdict(list)
    for r in runs + fusion:
        name, family = (r["method"], "merge") if "method" in r else (r["kind"], "fusion")
        by_k[(family, name, r["strength"], r["k"])].append(r)
        by_strength[(family, name, r["strength"])].append(r)
    return {
        "vs_k": [{"family": f, "method": m, "strength": st, "k": k, "mean_nai": _mean_over(rs, saved, "nai", rng),
                  "held_in_cross_entropy": _mean_over(rs, saved, "held_in_cross_entropy", rng)} for (f, m, st, k), rs in by_k.items()],
        "vs_strength": [{"family": f, "method": m, "strength": st, "mean_nai": _mean_over(rs, saved, "nai", rng)} for (f, m, st), rs in by_strength.items()],
    }


def prediction(runs: list[dict], *, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Per pre-evaluation diagnostic: Spearman ρ with the runs' mean NAI, its bootstrap interval, n;
    over all runs, and in `by_method` within each method. The diagnostics describe an expert
    subset, the same whatever the method, so pooled over methods ρ also ranks methods against each
    other; within a method it says only which subsets merge worse."""
    def rho(rs: list[dict], d: str) -> dict:
        pairs = [(r["interference"].get(d), r["nai"]["value"]) for r in rs]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        return {"spearman_rho": spearman(xs, ys), "ci95": spearman_interval(xs, ys, resamples=resamples, seed=seed), "n": len(pairs)}

    methods = list(dict.fromkeys(r["method"] for r in runs))
    return [{"diagnostic": d} | rho(runs, d) | {"by_method": {m: rho([r for r in runs if r["method"] == m], d) for m in methods}} for d in DIAGNOSTICS]
