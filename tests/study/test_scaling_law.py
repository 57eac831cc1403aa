"""The merging scaling law (arXiv 2509.24244) fitted to synthetic curves drawn from it with noise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from modelalloy.study.scaling_law import LawPoint, experts_for_target, fit_scaling_law, marginal_gain, public, target_between


def synthetic(l_inf, a, b, alpha, ks, *, per_k=6, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    points = []
    for k in ks:
        for i in range(per_k):
            loss = l_inf + a / (k + b) ** alpha + rng.normal() * noise
            points.append(LawPoint(k, tuple(f"e{k}-{i}-{j}" for j in range(k)), float(loss), half_width=1.96 * noise))
    return points


def test_the_papers_form_recovers_known_parameters_within_their_intervals():
    truth = {"L_inf": 2.0, "A": 1.5, "b": 0.5}
    fit = fit_scaling_law(synthetic(2.0, 1.5, 0.5, 1.0, range(1, 9)), free_alpha=False, resamples=400)
    assert fit["fitted"] and set(fit["params"]) == set(truth)
    for name, value in truth.items():
        low, high = fit["params"][name]["ci95"]
        assert low <= value <= high, (name, fit["params"][name])
    assert fit["r2"] > 0.99
    assert fit["max_residual_in_ci"] < 3
    # Each fitted point is the law at that k, evaluated independently.
    p = {n: fit["params"][n]["value"] for n in fit["params"]}
    for row in fit["points"]:
        assert row["fitted"] == pytest.approx(p["L_inf"] + p["A"] / (row["k"] + p["b"]), rel=1e-9)


def test_a_free_exponent_is_recovered_and_told_apart_from_one_over_k():
    points = synthetic(1.0, 2.0, 1.0, 0.5, range(1, 11), noise=0.002, seed=1)
    fit = fit_scaling_law(points, resamples=300)  # ten distinct k: the exponent is fitted
    assert "alpha" in fit["params"]
    low, high = fit["params"]["alpha"]["ci95"]
    assert low <= 0.5 <= high and high < 1.0


def test_leave_one_out_predicts_the_largest_k_of_a_curve_that_follows_the_law():
    fit = fit_scaling_law(synthetic(2.0, 1.5, 0.5, 1.0, range(1, 9)), free_alpha=False, resamples=300)
    loo = fit["loo"]
    assert loo["done"] and loo["k"] == 8 and loo["agrees"]
    assert loo["predicted"] == pytest.approx(2.0 + 1.5 / 8.5, abs=0.02)


def test_leave_one_out_flags_a_largest_k_that_breaks_the_law():
    points = synthetic(2.0, 1.5, 0.5, 1.0, range(1, 9))
    points = [LawPoint(p.k, p.subset, p.loss + (0.5 if p.k == 8 else 0.0), p.half_width) for p in points]
    assert not fit_scaling_law(points, free_alpha=False, resamples=300)["loo"]["agrees"]


def test_too_few_distinct_k_is_said_not_fitted():
    fit = fit_scaling_law(synthetic(2.0, 1.5, 0.5, 1.0, [2, 3, 4]), resamples=50)
    assert not fit["fitted"] and "3 distinct k" in fit["reason"] and "at least 4" in fit["reason"]
    assert not experts_for_target(fit, 2.5)["reachable"]


def test_planning_inverts_the_law_and_knows_when_the_floor_is_out_of_reach():
    # A rising curve (held-in loss grows as experts are added, A < 0) and a falling one.
    for a in (1.5, -1.5):
        fit = fit_scaling_law(synthetic(2.0, a, 0.5, 1.0, range(1, 9), noise=0.001), free_alpha=False, resamples=200)
        target = 2.0 + a / (5 + 0.5)
        plan = experts_for_target(fit, target)
        assert plan["reachable"] and plan["k"] == pytest.approx(5, abs=0.3)
        assert plan["meaning"] == ("needs" if a > 0 else "holds up to")  # rising: the most experts that still meet it
        assert plan["ci95"][0] <= 5 <= plan["ci95"][1] + 0.3
        assert not experts_for_target(fit, 2.0 - a)["reachable"]  # beyond the floor, on the wrong side
        gain = marginal_gain(fit, 4)
        assert gain["gain"] == pytest.approx(a / 4.5 - a / 5.5, abs=0.01)


def test_target_between_base_and_ceiling_and_the_json_form():
    assert target_between(3.0, 2.0, 0.75) == pytest.approx(2.25)
    fit = fit_scaling_law(synthetic(2.0, 1.5, 0.5, 1.0, range(1, 7)), free_alpha=False, resamples=50)
    stored = public(fit)
    assert "_bootstrap" not in stored and set(stored) >= {"form", "params", "r2", "loo", "points", "size_term"}
    assert all(set(v) == {"value", "ci95"} for v in stored["params"].values())


def test_the_fit_is_seeded():
    points = synthetic(2.0, 1.5, 0.5, 1.0, range(1, 7))
    a, b = (fit_scaling_law(points, free_alpha=False, resamples=100, seed=3) for _ in range(2))
    assert public(a) == public(b)
    assert list(itertools.islice(a["params"], 3)) == ["L_inf", "A", "b"]


def test_a_study_gets_one_law_per_method_and_strength_with_the_planning_answer():
    """study_scaling_laws reads study.json's own fields: the specialists alone are k = 1, the runs
    the rest, and the target sits between the base and oracle routing."""
    from modelalloy.study.scaling_law import study_scaling_laws, summary_line

    experts = [f"e{i}" for i in range(6)]
    sets = [{"name": f"s{i}", "expert": e, "metric": "perplexity"} for i, e in enumerate(experts)]
    ce = lambda k: 2.0 + 1.5 / (k + 0.5)  # noqa: E731 - the law the runs follow
    runs = [{"method": "linear", "strength": "all", "k": k, "experts": experts[j : j + k],
             "held_in_cross_entropy": {"value": ce(k) + 0.002 * ((j % 3) - 1), "ci95": [ce(k) - 0.01, ce(k) + 0.01]}}
            for k in range(2, 7) for j in range(0, 7 - k)]
    study = {
        "axes": {"sets": sets, "strengths": ["all"], "methods": ["linear"]},
        "specialists": {f"{e}@all": {"scores": {f"s{i}": {"value": float(np.exp(ce(1))), "ci95": [float(np.exp(ce(1) - 0.01)), float(np.exp(ce(1) + 0.01))]}}} for i, e in enumerate(experts)},
        "runs": runs,
        "fusion": [{"kind": "oracle_routing", "strength": "all", "k": 6, "experts": experts, "held_in_cross_entropy": {"value": 1.9}}],
        "base": {"scores": {f"s{i}": {"cross_entropy": 3.0} for i in range(6)}},
    }
    (entry,) = study_scaling_laws(study, resamples=200)
    assert entry["fitted"] and entry["method"] == "linear" and entry["points"][0]["k"] == 1
    assert entry["params"]["A"]["ci95"][0] <= 1.5 <= entry["params"]["A"]["ci95"][1]
    target = 3.0 + 0.75 * (1.9 - 3.0)  # 2.175: the law reaches it at k = 1.5/0.175 - 0.5 ≈ 8.07
    plan = entry["experts_for_target"]
    assert plan["target"] == pytest.approx(target) and plan["k"] == pytest.approx(1.5 / (target - 2.0) - 0.5, rel=0.1)
    assert entry["marginal_gain"]["k"] == 6
    assert "scaling law, linear @ all" in summary_line(entry) and "oracle routing needs k" in summary_line(entry)
