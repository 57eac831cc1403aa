"""The merging scaling law over the number of experts, fitted to a study's curves, and planning with it.

Wang et al., "Model Merging Scaling Laws in Large Language Models" (arXiv 2509.24244), fit the
merged model's cross-entropy over base size N and expert count k with one floor-plus-tail law,

    L(N, k) = L* + B·N^(−β) + A0·N^(−γ) / (k + b)

so that at one base size the curve over k is L(k) = L_inf + A / (k + b): a floor plus a tail
that falls as 1/k. We fit that form (`paper`, α = 1) and, where the study has enough distinct k
to identify a fourth parameter, the form with a free exponent, L(k) = L_inf + A / (k + b)^α
(`free_alpha`), to test the 1/k claim on the user's own models. A study of one base size cannot
fit the size term B·N^(−β) (nor γ): the fit says so.

How the fit is made. For fixed (b, α) the law is linear in (L_inf, A), so those two come from
least squares and (b, α) from a grid refined around its best cell: deterministic, no optimizer
to diverge. The points are the mean loss over the expert subsets at each k. Intervals come from
a bootstrap that resamples the subsets at each k (with replacement) and draws each subset's loss
from its own evaluation interval (normal, sd = half-width / 1.96: the evaluation units' share of
the noise, from the bootstrap over units the scores carry), then refits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# (b, α) grids: b ≥ 0 keeps k + b > 0 for every k ≥ 1, as in the paper; α over a range that
# covers "gains fall as 1/k" (α = 1) with room on both sides.
B_GRID = np.concatenate([np.linspace(0.0, 2.0, 21), np.linspace(2.5, 20.0, 36)])
ALPHA_GRID = np.linspace(0.2, 3.0, 57)
REFINE_STEPS = 2


@dataclass(frozen=True)
class LawPoint:
    """One merge's measured loss: k experts (the `subset`), mean held-in cross-entropy, and the
    half-width of its 95 % interval over evaluation units."""

    k: int
    subset: tuple[str, ...]
    loss: float
    half_width: float = 0.0


def law(k, l_inf: float, a: float, b: float, alpha: float = 1.0):
    """L(k) = L_inf + A / (k + b)^α."""
    return l_inf + a / (np.asarray(k, dtype=float) + b) ** alpha


def _linear_part(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of y ≈ L_inf + A·x along the last axis (broadcast): (L_inf, A, squared error)."""
    xm, ym = x.mean(-1, keepdims=True), y.mean(-1, keepdims=True)
    var = ((x - xm) ** 2).sum(-1)
    a = np.where(var > 0, ((x - xm) * (y - ym)).sum(-1) / np.where(var > 0, var, 1.0), 0.0)
    l_inf = ym[..., 0] - a * xm[..., 0]
    sse = ((l_inf[..., None] + a[..., None] * x - y) ** 2).sum(-1)
    return l_inf, a, sse


def _fit_batch(ks: np.ndarray, ys: np.ndarray, free_alpha: bool) -> np.ndarray:
    """(L_inf, A, b, α) per row of `ys` (rows: resamples, columns: the distinct k), minimising
    the squared error: (b, α) on a grid, refined twice around each row's best cell."""
    ys = np.atleast_2d(ys)
    rows = np.arange(len(ys))
    b_grid, a_grid = np.meshgrid(B_GRID, ALPHA_GRID if free_alpha else np.array([1.0]), indexing="ij")
    b, alpha = b_grid.ravel(), a_grid.ravel()  # (G,)
    x = (ks[None, :] + b[:, None]) ** -alpha[:, None]  # (G, K)
    _, _, sse = _linear_part(x[None], ys[:, None, :])  # (R, G)
    best = sse.argmin(1)
    b_best, alpha_best = b[best], alpha[best]
    db, da = float(B_GRID[1] - B_GRID[0]), float(ALPHA_GRID[1] - ALPHA_GRID[0]) if free_alpha else 0.0
    steps = np.linspace(-1.0, 1.0, 11)
    for _ in range(REFINE_STEPS):
        lb = np.maximum(0.0, b_best[:, None, None] + db * steps[None, :, None])  # (R, 11, 1)
        la = np.maximum(ALPHA_GRID[0], alpha_best[:, None, None] + da * steps[None, None, :]) if free_alpha else np.ones((len(ys), 1, 1))
        lb, la = np.broadcast_arrays(lb, la)
        lb, la = lb.reshape(len(ys), -1), la.reshape(len(ys), -1)  # (R, L)
        x = (ks[None, None, :] + lb[..., None]) ** -la[..., None]  # (R, L, K)
        _, _, sse = _linear_part(x, ys[:, None, :])
        best = sse.argmin(1)
        b_best, alpha_best = lb[rows, best], la[rows, best]
        db, da = db / 5, da / 5
    x = (ks[None, :] + b_best[:, None]) ** -alpha_best[:, None]
    l_inf, a, _ = _linear_part(x, ys)
    return np.stack([l_inf, a, b_best, alpha_best], axis=1)


def _fit_points(ks: np.ndarray, ys: np.ndarray, free_alpha: bool) -> tuple[float, float, float, float]:
    """(L_inf, A, b, α) for one curve."""
    return tuple(float(v) for v in _fit_batch(ks, ys, free_alpha)[0])


def _per_k(points: Sequence[LawPoint]) -> dict[int, list[LawPoint]]:
    grouped: dict[int, list[LawPoint]] = {}
    for p in sorted(points, key=lambda p: (p.k, p.subset)):
        grouped.setdefault(p.k, []).append(p)
    return grouped


def _means(grouped: Mapping[int, list[LawPoint]]) -> tuple[np.ndarray, np.ndarray]:
    ks = np.array(sorted(grouped), dtype=float)
    return ks, np.array([np.mean([p.loss for p in grouped[int(k)]]) for k in ks])


def _resampled_means(grouped: Mapping[int, list[LawPoint]], rng: np.random.Generator) -> np.ndarray:
    out = []
    for k in sorted(grouped):
        group = grouped[k]
        picks = rng.integers(0, len(group), len(group))
        losses = np.array([group[i].loss for i in picks]) + rng.normal(size=len(picks)) * np.array([group[i].half_width / 1.96 for i in picks])
        out.append(losses.mean())
    return np.array(out)


def _interval(values: np.ndarray) -> list[float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def _param_names(free_alpha: bool) -> tuple[str, ...]:
    return ("L_inf", "A", "b", "alpha") if free_alpha else ("L_inf", "A", "b")


def fit_scaling_law(points: Sequence[LawPoint], *, free_alpha: bool | None = None, resamples: int = 1000, seed: int = 0) -> dict:
    """Fit the law to a method's points over k; the `scaling_law` entry of study.json.

    `free_alpha`: None fits α when there are at least five distinct k (a four-parameter curve
    needs a point to spare), else the paper's α = 1. Returns `form`, `params` (each `value` and
    `ci95`), `r2`, `max_residual_in_ci` (largest |measured − fitted| over that point's interval
    half-width), `points` (per k: measured mean, its ci95, fitted), `loo` (fit without the largest
    k, predicted vs measured there), `size_term` (why B·N^(−β) was not fitted), or `fitted: False`
    with the `reason` when the points cannot determine the law.
    """
    grouped = _per_k(points)
    ks, ys = _means(grouped)
    if free_alpha is None:
        free_alpha = len(ks) >= 5
    names = _param_names(free_alpha)
    if len(ks) < len(names) + 1:
        return {
            "fitted": False,
            "form": _form(free_alpha),
            "reason": f"{len(ks)} distinct k ({', '.join(str(int(k)) for k in ks)}); the {len(names)}-parameter law needs at least {len(names) + 1}",
            "n_points": len(points),
        }
    rng = np.random.default_rng(seed)
    value = _fit_points(ks, ys, free_alpha)
    boot_means = np.array([_resampled_means(grouped, rng) for _ in range(resamples)])
    boot_params = _fit_batch(ks, boot_means, free_alpha)
    fitted = law(ks, *value)
    total = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float(((ys - fitted) ** 2).sum()) / total if total > 0 else math.nan
    point_ci = [_interval(boot_means[:, i]) for i in range(len(ks))]
    half = np.array([(high - low) / 2 for low, high in point_ci])
    residual_units = np.abs(ys - fitted) / np.where(half > 0, half, np.nan)
    result = {
        "fitted": True,
        "form": _form(free_alpha),
        "params": {name: {"value": value[i], "ci95": _interval(boot_params[:, i])} for i, name in enumerate(names)},
        "r2": r2,
        "max_residual_in_ci": float(np.nanmax(residual_units)) if np.isfinite(residual_units).any() else math.nan,
        "points": [{"k": int(k), "measured": float(y), "ci95": ci, "fitted": float(f)} for k, y, ci, f in zip(ks, ys, point_ci, fitted)],
        "n_points": len(points),
        "loo": _leave_largest_out(free_alpha, boot_means, ks=ks, ys=ys, point_ci=point_ci),
        "size_term": "not fitted: the study has one base size (B·N^(−β) needs several)",
        "_bootstrap": boot_params,  # for planning intervals; dropped from JSON by `public`
    }
    return result


def _leave_largest_out(free_alpha: bool, boot_means: np.ndarray, *, ks: np.ndarray, ys: np.ndarray, point_ci: list) -> dict:
    """Fit without the largest k and predict it: the check that the law extrapolates here."""
    names = _param_names(free_alpha)
    if len(ks) - 1 < len(names):
        return {"done": False, "reason": f"without k = {int(ks[-1])} only {len(ks) - 1} distinct k remain for {len(names)} parameters"}
    held_k = ks[-1]
    params = _fit_points(ks[:-1], ys[:-1], free_alpha)
    predicted = float(law(held_k, *params))
    boot = law(held_k, *_fit_batch(ks[:-1], boot_means[:, :-1], free_alpha).T)
    ci = _interval(boot)
    measured_ci = point_ci[-1]
    return {
        "done": True,
        "k": int(held_k),
        "predicted": predicted,
        "predicted_ci95": ci,
        "measured": float(ys[-1]),
        "measured_ci95": measured_ci,
        "agrees": bool(ci[0] <= measured_ci[1] and measured_ci[0] <= ci[1]),  # the two intervals overlap
    }


def _form(free_alpha: bool) -> str:
    return "L(k) = L_inf + A / (k + b)^alpha" if free_alpha else "L(k) = L_inf + A / (k + b)  (arXiv 2509.24244, eq. of the unified law at one base size)"


def experts_for_target(fit: Mapping, target: float) -> dict:
    """The number of experts at which the fitted law reaches loss `target`, with the bootstrap's
    interval; `reachable: False` (and why) when the law never gets there."""

    def solve(l_inf, a, b, alpha=1.0):
        gap = target - l_inf
        if a == 0 or gap == 0 or (gap > 0) != (a > 0):  # the tail never crosses the target
            return math.inf
        return max(1.0, (a / gap) ** (1.0 / alpha) - b)

    if not fit.get("fitted"):
        return {"target": target, "reachable": False, "reason": fit.get("reason", "the law was not fitted")}
    value = solve(*[fit["params"][n]["value"] for n in fit["params"]])
    boot = np.array([solve(*row) for row in np.asarray(fit["_bootstrap"])])
    if not math.isfinite(value):
        floor = fit["params"]["L_inf"]["value"]
        return {"target": target, "reachable": False, "reason": f"the law levels off at L_inf = {floor:.4f}, which does not reach {target:.4f}"}
    finite = boot[np.isfinite(boot)]
    ci = _interval(finite) if len(finite) else [math.nan, math.nan]
    if len(finite) < len(boot) * 0.975:  # some resampled laws never get there: the interval is open above
        ci[1] = math.inf
    # A rising loss (A < 0: each expert dilutes the others on their own sets) crosses the target on
    # its way up: k is then the most experts a merge can take while still meeting the target.
    meaning = "needs" if fit["params"]["A"]["value"] > 0 else "holds up to"
    return {"target": target, "reachable": True, "k": value, "ci95": ci, "meaning": meaning}


def target_between(base_loss: float, ceiling_loss: float, share: float) -> float:
    """The loss `share` of the way from the base's to the fusion ceiling's (e.g. oracle routing)."""
    return base_loss + share * (ceiling_loss - base_loss)


def marginal_gain(fit: Mapping, k: int) -> dict:
    """L(k) − L(k + 1): what one more expert changes at k (positive: the loss falls), with interval."""
    if not fit.get("fitted"):
        return {"k": k, "reason": fit.get("reason", "the law was not fitted")}
    params = [fit["params"][n]["value"] for n in fit["params"]]
    rows = np.asarray(fit["_bootstrap"]).T
    boot = law(k, *rows) - law(k + 1, *rows)
    return {"k": k, "gain": float(law(k, *params) - law(k + 1, *params)), "ci95": _interval(boot)}


def public(fit: Mapping) -> dict:
    """The fit as study.json stores it (without the bootstrap draws)."""
    return {key: value for key, value in fit.items() if not key.startswith("_")}


def _log_point(score: Mapping) -> tuple[float, float] | None:
    """Cross-entropy and its 95 % half-width from a perplexity score (log of the value and interval)."""
    if score.get("value") is None or not score["value"] > 0:
        return None
    ci = score.get("ci95") or [score["value"], score["value"]]
    return math.log(score["value"]), (math.log(ci[1]) - math.log(ci[0])) / 2 if ci[0] and ci[0] > 0 else 0.0


def study_scaling_laws(study: Mapping, *, share: float = 0.75, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """The `scaling_law` entries of study.json: one per (method, strength), over the runs' mean
    held-in cross-entropy, with each specialist alone on its own set as the k = 1 point (a merge of
    one expert is that expert). The target for planning is `share` of the way from the base's
    held-in cross-entropy to oracle routing's (the fusion ceiling) on all the study's sets."""
    sets = {s["name"]: s["expert"] for s in study["axes"]["sets"] if s.get("expert") and s.get("metric", "perplexity") == "perplexity"}
    out = []
    for strength in study["axes"]["strengths"]:
        singles = []
        for name, expert in sets.items():
            score = study["specialists"].get(f"{expert}@{strength}", {}).get("scores", {}).get(name)
            if score is not None and (p := _log_point(score)) is not None:
                singles.append(LawPoint(1, (expert,), p[0], p[1]))
        oracle = [f for f in study["fusion"] if f["kind"] == "oracle_routing" and f["strength"] == strength]
        ceiling = max(oracle, key=lambda f: f["k"], default=None)
        for method in study["axes"]["methods"]:
            runs = [r for r in study["runs"] if r["method"] == method and r["strength"] == strength and r["held_in_cross_entropy"]["value"] is not None]
            points = singles + [
                LawPoint(r["k"], tuple(r["experts"]), r["held_in_cross_entropy"]["value"], _half(r["held_in_cross_entropy"].get("ci95"))) for r in runs
            ]
            fit = fit_scaling_law(points, resamples=resamples, seed=seed)
            entry = {"method": method, "strength": strength} | public(fit)
            if fit.get("fitted") and ceiling is not None and runs:
                top = max(runs, key=lambda r: r["k"])
                held = [n for n, e in sets.items() if e in ceiling["experts"]]
                base_ce = float(np.mean([study["base"]["scores"][n]["cross_entropy"] for n in held]))
                target = target_between(base_ce, ceiling["held_in_cross_entropy"]["value"], share)
                entry["experts_for_target"] = {"share_of_ceiling": share, "ceiling": "oracle_routing"} | experts_for_target(fit, target)
                entry["marginal_gain"] = marginal_gain(fit, top["k"])
            out.append(entry)
    return out


def _half(ci) -> float:
    return (ci[1] - ci[0]) / 2 if ci else 0.0


def summary_line(entry: Mapping) -> str:
    """One line for the CLI: the fit, its check, and the planning answer."""
    head = f"scaling law, {entry['method']} @ {entry['strength']}: "
    if not entry.get("fitted"):
        return head + "not fitted (" + entry["reason"] + ")"
    p = entry["params"]
    parts = [f"{name} {v['value']:.3g} [{v['ci95'][0]:.3g}, {v['ci95'][1]:.3g}]" for name, v in p.items()]
    text = head + ", ".join(parts) + f"; R² {entry['r2']:.3f}"
    loo = entry["loo"]
    if loo.get("done"):
        text += f"; k={loo['k']} predicted {loo['predicted']:.3f} vs measured {loo['measured']:.3f} ({'agrees' if loo['agrees'] else 'does not agree'})"
    plan = entry.get("experts_for_target")
    if plan:
        text += (f"; {plan['share_of_ceiling']:.0%} of the way to oracle routing {plan.get('meaning', 'needs')} k ≈ {plan['k']:.1f} [{plan['ci95'][0]:.1f}, {plan['ci95'][1]:.1f}]"
                 if plan["reachable"] else f"; {plan['share_of_ceiling']:.0%} of the way to oracle routing: {plan['reason']}")
    if entry.get("marginal_gain", {}).get("gain") is not None:
        g = entry["marginal_gain"]
        text += f"; one more expert at k={g['k']}: {g['gain']:+.4f} nats"
    return text
