"""Each catalogue method against an independent NumPy implementation of METHODS.md's formula,
on small hand-written tensors, plus its limit cases. NumPy runs in float64; the methods in
float32 (the engine's compute dtype) unless a test says otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelalloy.errors import MergeError
from modelalloy.methods import get_method

BASE = np.array([[0.10, -0.20, 0.30, 0.00, 0.50], [0.40, 0.10, -0.30, 0.20, -0.10]])
DELTAS = [
    np.array([[0.30, -0.05, 0.00, 0.12, -0.40], [0.02, 0.25, -0.07, 0.00, 0.09]]),
    np.array([[-0.10, 0.20, 0.06, 0.15, -0.30], [0.01, -0.22, 0.11, 0.04, 0.00]]),
    np.array([[0.25, 0.08, -0.09, -0.20, 0.35], [-0.04, 0.18, 0.05, -0.14, 0.06]]),
]
MODELS = [BASE + d for d in DELTAS]


def t(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def run(name: str, models, base=None, *, seed: int = 0, dtype=torch.float32, **params):
    method = get_method(name)
    out = method([t(m, dtype) for m in models], base=None if base is None else t(base, dtype), seed=seed, **params)
    return out.to(torch.float64).numpy()


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------- multislerp


def multislerp_np(xs, w, base=None, normalize=True, eps=1e-8):
    w = np.asarray(w, float)
    if normalize:
        w = w / w.sum()
    x = np.stack([m - base if base is not None else m for m in xs]).reshape(len(xs), -1)
    norms = np.linalg.norm(x, axis=1)
    m = (w[:, None] * x / (norms[:, None] + eps)).sum(0)
    out = (m / np.linalg.norm(m) * (w * norms).sum()).reshape(xs[0].shape)
    return out + base if base is not None else out


def multislerp_with_tangent_step_np(xs, w, eps=1e-8):
    """mergekit's route: project onto the tangent space at the mean, average, exp-map back."""
    w = np.asarray(w, float) / np.sum(w)
    x = np.stack(xs).reshape(len(xs), -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / (norms + eps)
    mean = (u * w[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    tangent = ((u - (u @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    res = mean * np.cos(tn) + tangent * np.sin(tn) / tn
    return (res * (norms[:, 0] * w).sum()).reshape(xs[0].shape)


def test_multislerp_matches_numpy_with_and_without_base():
    w = [0.2, 0.3, 0.5]
    close(run("multislerp", MODELS, weight=w, normalize_weights=True, eps=1e-8), multislerp_np(MODELS, w))
    close(run("multislerp", MODELS, BASE, weight=w, normalize_weights=True, eps=1e-8), multislerp_np(MODELS, w, BASE))
    close(run("multislerp", MODELS, BASE, weight=[1.0, 2.0, 0.5], normalize_weights=False, eps=1e-8), multislerp_np(MODELS, [1.0, 2.0, 0.5], BASE, normalize=False))


def test_multislerp_tangent_step_is_a_no_op():
    w = [0.2, 0.3, 0.5]
    close(run("multislerp", MODELS, weight=w, normalize_weights=True, eps=1e-8), multislerp_with_tangent_step_np(MODELS, w))


def test_multislerp_limits():
    # One model: returned as is. Parallel inputs: the weighted mean of their lengths along them.
    close(run("multislerp", MODELS[:1], BASE, weight=[0.3], normalize_weights=False, eps=1e-8), MODELS[0])
    x = MODELS[0]
    close(run("multislerp", [x, 3 * x], weight=[0.5, 0.5], normalize_weights=True, eps=1e-8), 2 * x)
    # Antipodal pair: the directions cancel, two models fall back to the linear mix.
    # (base 0 so that ±d are exact in float32 and the directions cancel exactly.)
    d, zero = DELTAS[0], np.zeros_like(BASE)
    close(run("multislerp", [d, -d], zero, weight=[1.0, 1.0], normalize_weights=True, eps=1e-8), zero)
    close(run("multislerp", [d, -d], zero, weight=[1.0, 3.0], normalize_weights=True, eps=1e-8), -d)  # no cancelling
    with pytest.raises(MergeError, match="cancel out"):
        run("multislerp", [d, -d, zero], zero, weight=[1.0, 1.0, 1.0], normalize_weights=True, eps=1e-8)
    # In float32, (θ_0 + d) − θ_0 and (θ_0 − d) − θ_0 cancel only up to rounding: still cancelling,
    # not a unit "direction" made of rounding noise scaled to the full length.
    close(run("multislerp", [BASE + d, BASE - d], BASE, weight=[1.0, 1.0], normalize_weights=True, eps=1e-8), BASE, 1e-6)
    with pytest.raises(MergeError, match="cancel out"):
        run("multislerp", [BASE + d, BASE - d, BASE], BASE, weight=[1.0, 1.0, 1.0], normalize_weights=True, eps=1e-8)
    # All task vectors 0 (a tensor no model changed): the base, where mergekit raises with 3+ models.
    close(run("multislerp", [BASE, BASE, BASE], BASE, weight=[1.0, 2.0, 3.0], normalize_weights=True, eps=1e-8), BASE)


# ---------------------------------------------------------------- karcher


def slerp_np(a, b, t):
    cos = np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def sphere_log(mu, u):
    cos = np.clip(mu @ u, -1, 1)
    phi = np.arccos(cos)
    return np.zeros_like(u) if phi < 1e-12 else phi / np.sin(phi) * (u - cos * mu)


def test_karcher_two_points_is_slerp_of_directions():
    # On a sphere the weighted mean of two points lies on their geodesic at fraction α_2.
    a, b = MODELS[0].ravel(), MODELS[1].ravel()
    for w in ([1.0, 1.0], [1.0, 3.0]):
        alpha = np.array(w) / sum(w)
        ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
        expected = slerp_np(ua, ub, alpha[1]) * (alpha[0] * np.linalg.norm(a) + alpha[1] * np.linalg.norm(b))
        got = run("karcher", MODELS[:2], weight=w, max_iter=50, tol=1e-9).ravel()
        close(got, expected, 1e-5)


def test_karcher_weighted_mean_is_a_critical_point():
    # The Karcher mean μ solves Σ α_i log_μ(u_i) = 0 (first-order optimality on the sphere).
    w = [0.5, 0.2, 0.3]
    alpha = np.array(w) / sum(w)
    got = run("karcher", MODELS, weight=w, max_iter=100, tol=1e-9).ravel()
    flat = [m.ravel() for m in MODELS]
    norms = np.array([np.linalg.norm(f) for f in flat])
    close(np.linalg.norm(got), (alpha * norms).sum(), 1e-5)
    mu = got / np.linalg.norm(got)
    gradient = sum(a * sphere_log(mu, f / n) for a, f, n in zip(alpha, flat, norms))
    assert np.linalg.norm(gradient) < 1e-5
    # Weights matter (mergekit ignores them): unweighted is a different point, mergekit's.
    unweighted = run("karcher", MODELS, weight=[None, None, None], max_iter=100, tol=1e-9).ravel()
    equal = run("karcher", MODELS, weight=[1.0, 1.0, 1.0], max_iter=100, tol=1e-9).ravel()
    close(unweighted, equal)
    assert np.abs(unweighted - got).max() > 1e-3


def test_karcher_limits():
    close(run("karcher", MODELS, weight=[0.0, 1.0, 0.0], max_iter=10, tol=1e-5), MODELS[1])
    close(run("karcher", [MODELS[2]] * 3, weight=[None] * 3, max_iter=10, tol=1e-5), MODELS[2])
    zero = np.zeros_like(BASE)
    # A zero input has no direction; it still counts in the mean length (mergekit's rule).
    close(run("karcher", [zero, MODELS[0]], weight=[None, None], max_iter=10, tol=1e-5), MODELS[0] / 2)


# ---------------------------------------------------------------- nearswap


def nearswap_np(base, other, t):
    alpha = np.clip(t / np.maximum(np.abs(base - other), 1e-6), 0, 1)
    return alpha * other + (1 - alpha) * base


def test_nearswap_matches_numpy_and_limits():
    for threshold in (0.001, 0.05, 0.2):
        close(run("nearswap", MODELS[:1], BASE, t=threshold), nearswap_np(BASE, MODELS[0], threshold))
    close(run("nearswap", MODELS[:1], BASE, t=10.0), MODELS[0])  # every entry nearer than t: swapped
    close(run("nearswap", MODELS[:1], BASE, t=1e-9), BASE, 1e-5)  # nothing is that near: base
    close(run("nearswap", [BASE], BASE, t=0.1), BASE)  # equal models: the 1e-6 floor, no 0/0


# ---------------------------------------------------------------- breadcrumbs


def breadcrumbs_mask_np(delta, density, gamma):
    n = delta.size
    keep, top = int(density * n), int(gamma * n)
    top = min(top, n - keep)
    order = np.argsort(-np.abs(delta).ravel(), kind="stable")  # largest first, ties by index
    mask = np.zeros(n, bool)
    mask[order[top : top + keep]] = True
    return mask.reshape(delta.shape)


def test_breadcrumbs_matches_numpy():
    w, density, gamma = [0.5, 1.0, 0.7], 0.5, 0.1
    expected = BASE + sum(wi * d * breadcrumbs_mask_np(d, density, gamma) for wi, d in zip(w, DELTAS))
    got = run("breadcrumbs", MODELS, BASE, weight=w, density=[density] * 3, gamma=[gamma] * 3, **{"lambda": 1.0}, normalize=False, rescale=False)
    close(got, expected)
    # The outliers really are gone: the largest |δ_0| entry (0.40) is not in the merge.
    assert breadcrumbs_mask_np(DELTAS[0], density, gamma).ravel()[np.argmax(np.abs(DELTAS[0]))] == False  # noqa: E712


def test_breadcrumbs_ties_matches_numpy():
    w, density, gamma = [1.0, 1.0, 1.0], 0.6, 0.1
    d = np.stack([wi * x * breadcrumbs_mask_np(x, density, gamma) for wi, x in zip(w, DELTAS)])
    sign = np.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(d) == sign
    expected = BASE + (d * agree).sum(0)
    got = run("breadcrumbs_ties", MODELS, BASE, weight=w, density=[density] * 3, gamma=[gamma] * 3, **{"lambda": 1.0}, normalize=False, rescale=False, consensus_method="sum")
    close(got, expected)


def test_breadcrumbs_on_small_tensors_keeps_the_largest_entries():
    # 10 entries, gamma 0.01: int(0.1) = 0 outliers. mergekit's sorted[n_bot:-0] is empty and the
    # whole task vector vanishes; we keep the 5 largest |δ| (and drop the smallest 5).
    delta = DELTAS[0]
    got = run("breadcrumbs", [BASE + delta], BASE, weight=[1.0], density=[0.5], gamma=[0.01], **{"lambda": 1.0}, normalize=False, rescale=False)
    kept = np.abs(delta) >= np.sort(np.abs(delta).ravel())[-5]
    close(got, BASE + delta * kept)
    assert np.count_nonzero(got - t(BASE).double().numpy()) == 5


def test_breadcrumbs_limits():
    common = dict(weight=[1.0] * 3, **{"lambda": 1.0}, normalize=False, rescale=False)
    # density 1 prunes nothing, whatever gamma (mergekit returns the delta unchanged there).
    close(run("breadcrumbs", MODELS, BASE, density=[1.0] * 3, gamma=[0.3] * 3, **common), BASE + sum(DELTAS))
    # gamma 0 is TIES' magnitude trim.
    close(
        run("breadcrumbs", MODELS[:1], BASE, density=[0.4], gamma=[0.0], weight=[1.0], **{"lambda": 1.0}, normalize=False, rescale=False),
        run("ties", MODELS[:1], BASE, density=[0.4], weight=[1.0], **{"lambda": 1.0}, normalize=False, consensus_method="sum"),
    )
    # density + gamma > 1: fewer outliers are dropped so that the density is met.
    got = run("breadcrumbs", MODELS[:1], BASE, density=[0.9], gamma=[0.5], weight=[1.0], **{"lambda": 1.0}, normalize=False, rescale=False)
    close(got, BASE + DELTAS[0] * breadcrumbs_mask_np(DELTAS[0], 0.9, 0.5))
    assert np.count_nonzero(breadcrumbs_mask_np(DELTAS[0], 0.9, 0.5)) == 9


def test_breadcrumbs_ties_in_magnitudes_are_broken_by_index():
    delta = np.array([0.5, 0.5, 0.5, 0.5, 0.1, 0.1])
    got = run("breadcrumbs", [delta], np.zeros(6), weight=[1.0], density=[0.5], gamma=[0.2], **{"lambda": 1.0}, normalize=False, rescale=False)
    close(got, [0.0, 0.5, 0.5, 0.5, 0.0, 0.0])  # one outlier (index 0), then the next 3 in index order


# ---------------------------------------------------------------- della


def della_probability_np(delta, density, epsilon):
    rows = delta.reshape(-1, delta.shape[-1])
    n = rows.shape[1]
    rank = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    return ((density - epsilon) + 2 * epsilon * rank / (n - 1)).reshape(delta.shape)


def della_draws(shape, count, seed):
    """The uniform draws della makes: one generator per model (seed + index), float32."""
    return [torch.rand(shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float32).double().numpy() for i in range(count)]


@pytest.mark.parametrize("rescale", ["l1", "inverse_p", False])
def test_della_linear_matches_numpy(rescale):
    density, epsilon, w = 0.5, 0.2, [1.0, 0.5, 2.0]
    draws = della_draws(BASE.shape, 3, seed=7)
    total = np.zeros_like(BASE)
    for wi, d, u in zip(w, DELTAS, draws):
        p = della_probability_np(d, density, epsilon).astype(np.float32).astype(np.float64)
        kept = d * (u < p)
        if rescale == "l1":
            kept = kept * np.abs(d).sum() / np.abs(kept).sum()
        elif rescale == "inverse_p":
            kept = np.where(u < p, d / p, 0.0)
        total += wi * kept
    got = run("della_linear", MODELS, BASE, seed=7, weight=w, density=[density] * 3, epsilon=[epsilon] * 3, **{"lambda": 1.0}, normalize=False, rescale=rescale)
    close(got, BASE + total, 1e-5)


def test_della_matches_numpy():
    density, epsilon, w = 0.6, 0.3, [1.0, 1.0, 1.0]
    draws = della_draws(BASE.shape, 3, seed=3)
    d = []
    for wi, x, u in zip(w, DELTAS, draws):
        kept = x * (u < della_probability_np(x, density, epsilon))
        d.append(wi * kept * np.abs(x).sum() / np.abs(kept).sum())
    d = np.stack(d)
    sign = np.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(d) == sign
    divisor = (agree * np.array(w)[:, None, None]).sum(0)
    expected = BASE + 0.8 * (d * agree).sum(0) / np.where(divisor == 0, 1, divisor)
    got = run("della", MODELS, BASE, seed=3, weight=w, density=[density] * 3, epsilon=[epsilon] * 3, **{"lambda": 0.8}, normalize=True, rescale=True, consensus_method="sum")
    close(got, expected, 1e-5)


def test_della_keep_probabilities_follow_magnitude_rank():
    from modelalloy.methods.sparsifiers import della_keep_probability

    delta = np.array([[0.3, -0.1, 0.2, 0.0, -0.5], [1.0, 2.0, -3.0, 0.5, 0.5]])
    got = della_keep_probability(t(delta), 0.5, 0.2).double().numpy()
    close(got, della_probability_np(delta, 0.5, 0.2))
    close(got[0], [0.6, 0.4, 0.5, 0.3, 0.7])  # ranks 3, 1, 2, 0, 4 of 0..4
    close(got.mean(axis=1), [0.5, 0.5])  # the density on average
    # A row of one entry has no ranking: p = density (mergekit divides 0 by 0).
    close(della_keep_probability(torch.tensor([[0.7], [0.1]]), 0.4, 0.2).numpy(), [[0.4], [0.4]])


def test_della_limits():
    common = dict(weight=[1.0] * 3, **{"lambda": 1.0}, normalize=False, rescale=True)
    # epsilon 0: every entry kept with probability density, the same draws as DARE's: identical.
    della = run("della_linear", MODELS, BASE, seed=11, density=[0.4] * 3, epsilon=[0.0] * 3, **common)
    dare = run("dare_linear", MODELS, BASE, seed=11, density=[0.4] * 3, **common)
    np.testing.assert_array_equal(della, dare)
    # density 1 is no pruning, whatever epsilon.
    close(run("della_linear", MODELS, BASE, density=[1.0] * 3, epsilon=[0.15] * 3, **common), BASE + sum(DELTAS))


# ---------------------------------------------------------------- options of the family


def test_consensus_count_elects_by_vote_not_mass():
    base = np.zeros(3)
    models = [np.array([1.0, -0.1, 0.2]), np.array([-0.1, -0.1, 0.3]), np.array([-0.2, 0.9, -0.1])]
    d = np.stack(models)
    for consensus, sign in (("sum", np.sign(d.sum(0))), ("count", np.sign(np.sign(d).sum(0)))):
        sign = np.where(sign >= 0, 1.0, -1.0)
        agree = np.sign(d) == sign
        expected = (d * agree).sum(0) / agree.sum(0)
        got = run("ties", models, base, weight=[1.0] * 3, density=[1.0] * 3, **{"lambda": 1.0}, normalize=True, consensus_method=consensus, int8_mask=False)
        close(got, expected)
    # entry 0: mass says + (1.0 − 0.3), the vote says − (two of three).
    assert run("ties", models, base, weight=[1.0] * 3, density=[1.0] * 3, **{"lambda": 1.0}, normalize=True, consensus_method="count", int8_mask=False)[0] == pytest.approx(-0.15)


def test_rescale_l1_and_inverse_p_for_dare():
    density = 0.5
    g = torch.Generator().manual_seed(5)
    u = torch.rand(BASE.shape, generator=g, dtype=torch.float32).double().numpy()
    kept = DELTAS[0] * (u < density)
    expected = {
        "l1": kept * np.abs(DELTAS[0]).sum() / np.abs(kept).sum(),
        True: kept * np.abs(DELTAS[0]).sum() / np.abs(kept).sum(),
        "inverse_p": kept / density,
        False: kept,
    }
    for rescale, value in expected.items():
        got = run("dare_linear", MODELS[:1], BASE, seed=5, weight=[1.0], density=[density], **{"lambda": 1.0}, normalize=False, rescale=rescale)
        close(got, BASE + value)


def test_int8_mask_and_lambda():
    args = dict(weight=[1.0, 0.5, 0.3], density=[0.6] * 3, normalize=True, consensus_method="sum")
    plain = run("ties", MODELS, BASE, **args, **{"lambda": 1.0}, int8_mask=False)
    np.testing.assert_array_equal(run("ties", MODELS, BASE, **args, **{"lambda": 1.0}, int8_mask=True), plain)
    close(run("ties", MODELS, BASE, **args, **{"lambda": 0.3}, int8_mask=True), BASE + 0.3 * (plain - BASE))


# ---------------------------------------------------------------- model_stock


def model_stock_np(base, models, filter_wise):
    rows = base.reshape(-1, base.shape[-1]) if filter_wise else base.reshape(1, -1)
    xs = [m.reshape(rows.shape) for m in models]
    d = [x - rows for x in xs]
    n = len(xs)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append(np.clip((d[i] * d[j]).sum(-1) / np.maximum(np.linalg.norm(d[i], axis=-1) * np.linalg.norm(d[j], axis=-1), 1e-6), -1, 1))
    c = np.mean(cos, axis=0)[:, None]
    tt = n * c / (1 + (n - 1) * c)
    return (tt * np.mean(xs, axis=0) + (1 - tt) * rows).reshape(base.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_numpy(filter_wise):
    close(run("model_stock", MODELS, BASE, filter_wise=filter_wise), model_stock_np(BASE, MODELS, filter_wise))
    close(run("model_stock", MODELS[:2], BASE, filter_wise=filter_wise), model_stock_np(BASE, MODELS[:2], filter_wise))


def test_model_stock_limits():
    # Orthogonal task vectors (cos 0): t = 0, the base. Parallel equal ones (cos 1): t = 1, their mean.
    base = np.zeros(4)
    close(run("model_stock", [np.array([1.0, 0, 0, 0]), np.array([0, 2.0, 0, 0])], base, filter_wise=False), base)
    close(run("model_stock", [MODELS[0], MODELS[0]], BASE, filter_wise=False), MODELS[0])
    # Opposite task vectors: 1 + cosθ = 0; mergekit writes inf/NaN, we keep the base.
    got = run("model_stock", [BASE + DELTAS[0], BASE - 2 * DELTAS[0]], BASE, filter_wise=False)
    close(got, BASE)
    # A 1-D tensor with filter_wise is one row.
    v = BASE[0]
    close(run("model_stock", [m[0] for m in MODELS], v, filter_wise=True), model_stock_np(v[None], [m[0][None] for m in MODELS], False)[0])


# ---------------------------------------------------------------- sce


def sce_np(base, models, topk):
    tau = np.stack([m - base for m in models])
    if topk < 1:
        var = tau.var(axis=0).ravel()
        k = int(np.count_nonzero(var) * topk)
        mask = np.zeros(var.size, bool)
        mask[np.argsort(-var, kind="stable")[:k]] = True
        tau = tau * mask.reshape(base.shape)
    energy = (tau**2).reshape(len(models), -1).mean(axis=1)
    w = energy / energy.sum() if energy.sum() >= 1e-6 else np.full(len(models), 1 / len(models))
    sign = np.where(tau.sum(0) >= 0, 1.0, -1.0)
    m = np.sign(tau) == sign
    ww = w[:, None, None] * m
    return base + (ww * tau).sum(0) / np.maximum(ww.sum(0), 1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_matches_numpy(topk):
    close(run("sce", MODELS, BASE, select_topk=topk, int8_mask=False), sce_np(BASE, MODELS, topk))


def test_sce_limits():
    # One model: its energy weight is 1 and every nonzero entry agrees with itself.
    close(run("sce", MODELS[:1], BASE, select_topk=1.0, int8_mask=False), MODELS[0])
    # No change anywhere: uniform weights, the base.
    close(run("sce", [BASE, BASE], BASE, select_topk=0.5, int8_mask=False), BASE)


# ---------------------------------------------------------------- arcee_fusion


def arcee_fusion_np(base, other):
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(other) + 1e-8, softmax(base) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    importance = np.abs(other - base) * kl
    s = np.sort(importance.ravel())
    q1, med, q3 = (s[int(f * (s.size - 1))] for f in (0.25, 0.5, 0.75))
    keep = importance >= med + 1.5 * (q3 - q1)
    return base + keep * (other - base), keep


def test_arcee_fusion_matches_numpy():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 8))
    other = base + rng.normal(size=(6, 8)) * np.where(rng.random((6, 8)) < 0.2, 1.0, 0.05)
    expected, keep = arcee_fusion_np(base, other)
    assert 0 < keep.sum() < keep.size  # a real selection, not all or nothing
    close(run("arcee_fusion", [other], base), expected, 1e-5)


def test_arcee_fusion_keeps_the_input_dtype():
    out = get_method("arcee_fusion")([t(MODELS[0], torch.bfloat16)], base=t(BASE, torch.bfloat16), seed=0)
    assert out.dtype == torch.bfloat16  # mergekit promotes to float32


def test_arcee_fusion_samples_large_tensors_from_the_seed(monkeypatch):
    import importlib

    af = importlib.import_module("modelalloy.methods.arcee_fusion")  # the package attribute is the method

    monkeypatch.setattr(af, "QUANTILE_SAMPLE", 16)  # make a 2×40 tensor "large"
    rng = np.random.default_rng(1)
    base, other = rng.normal(size=(2, 40)), rng.normal(size=(2, 40))
    a, b = run("arcee_fusion", [other], base, seed=1), run("arcee_fusion", [other], base, seed=1)
    np.testing.assert_array_equal(a, b)
    # The threshold comes from 16 entries drawn (with replacement) by the seeded generator.
    _, _ = arcee_fusion_np(base, other)
    g = torch.Generator().manual_seed(1)
    picks = torch.randint(80, (16,), generator=g).numpy()
    p = np.exp(other) / np.exp(other).sum(-1, keepdims=True) + 1e-8
    q = np.exp(base) / np.exp(base).sum(-1, keepdims=True) + 1e-8
    importance = np.abs(other - base) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(importance.ravel()[picks])
    threshold = s[int(0.5 * 15)] + 1.5 * (s[int(0.75 * 15)] - s[int(0.25 * 15)])
    close(a, base + (importance >= threshold) * (other - base), 1e-5)


# ---------------------------------------------------------------- ram, ramplus_tl


def ram_np(base, models, eps, r=None, alpha=None):
    tau = np.stack([m - base for m in models])
    a = np.abs(tau) > eps
    c = a.sum(0)
    unique, shared = c == 1, c > 1
    lam = np.ones(len(models))
    if r is not None:
        for i in range(len(models)):
            rho = (a[i] & shared).sum() / max((a[i] & unique).sum(), eps)
            lam[i] = 1 + r * np.clip(rho, 0, alpha)
    out = base.copy()
    for i in range(len(models)):
        out += a[i] * tau[i] * (unique * lam[i] + shared / np.maximum(c, 1))
    return out


# Task vectors with real overlap structure: some entries changed by one model, some by several.
RAM_DELTAS = [
    np.array([[0.3, 0.0, 0.0, 0.1, 0.0], [0.2, 0.0, 0.0, 0.0, 0.4]]),
    np.array([[0.1, 0.5, 0.0, 0.0, 0.0], [0.2, -0.3, 0.0, 0.0, 0.0]]),
    np.array([[-0.2, 0.0, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.2]]),
]
RAM_MODELS = [BASE + d for d in RAM_DELTAS]


def test_ram_matches_numpy():
    close(run("ram", RAM_MODELS, BASE, epsilon=1e-5), ram_np(BASE, RAM_MODELS, 1e-5))
    # by hand, entry (0,0): all three changed it → mean 0.2/3; entry (0,2): only model 2 → 0.7.
    got = run("ram", RAM_MODELS, BASE, epsilon=1e-5)
    assert got[0, 0] - BASE[0, 0] == pytest.approx(0.2 / 3, abs=1e-6)
    assert got[0, 2] - BASE[0, 2] == pytest.approx(0.7, abs=1e-6)


def test_ramplus_tl_matches_numpy():
    close(run("ramplus_tl", RAM_MODELS, BASE, r=0.1, alpha=0.2, epsilon=1e-5), ram_np(BASE, RAM_MODELS, 1e-5, 0.1, 0.2))
    close(run("ramplus_tl", RAM_MODELS, BASE, r=0.5, alpha=5.0, epsilon=1e-5), ram_np(BASE, RAM_MODELS, 1e-5, 0.5, 5.0))


def test_ram_limits():
    # Disjoint changes: nothing is shared, RAM is task arithmetic; ramplus_tl with no overlap (ρ 0) too.
    disjoint = [BASE + d * (np.arange(10).reshape(2, 5) % 3 == i) for i, d in enumerate(DELTAS)]
    expected = BASE + sum(m - BASE for m in disjoint)
    close(run("ram", disjoint, BASE, epsilon=1e-5), expected)
    close(run("ramplus_tl", disjoint, BASE, r=0.1, alpha=0.2, epsilon=1e-5), expected)
    # Everyone changed everything: the plain mean. r = 0: ramplus_tl is ram.
    everywhere = [BASE + np.random.default_rng(i).uniform(0.1, 0.5, BASE.shape) * np.sign(d + 1e-3) for i, d in enumerate(DELTAS)]
    close(run("ram", everywhere, BASE, epsilon=1e-5), np.mean(everywhere, axis=0))
    close(run("ramplus_tl", RAM_MODELS, BASE, r=0.0, alpha=0.2, epsilon=1e-5), run("ram", RAM_MODELS, BASE, epsilon=1e-5))
    # A threshold above every change: the base.
    close(run("ram", MODELS, BASE, epsilon=1.0), BASE)


def test_sce_weights_are_uniform_below_the_energy_floor():
    # METHODS.md (and mergekit 0.1.5): Σ mean(τ_i²) < 1e-6 gives equal weights. Task vectors of
    # |τ| ~ 1e-4 are below it; ten times larger ones are not.
    def uniform(models):
        tau = np.stack([m - BASE for m in models])
        agree = np.sign(tau) == np.where(tau.sum(0) >= 0, 1.0, -1.0)
        return BASE + (agree * tau).sum(0) / np.maximum(agree.sum(0), 1e-6)

    small = [BASE + d * 1e-3 for d in DELTAS]
    close(run("sce", small, BASE, select_topk=1.0, int8_mask=False, dtype=torch.float64), uniform(small), 1e-12)
    larger = [BASE + d * 1e-2 for d in DELTAS]
    got = run("sce", larger, BASE, select_topk=1.0, int8_mask=False, dtype=torch.float64)
    close(got, sce_np(BASE, larger, 1.0), 1e-12)
    assert np.abs(got - uniform(larger)).max() > 1e-5


def breadcrumbs_mask_mergekit_015(delta, density, gamma):
    """mergekit 0.1.5's rule, written from its definition: sort |δ| ascending, n_top = int(gamma·n),
    target = int(density·n), skip the n_bot = max(0, n − target − n_top) smallest, keep the next target."""
    n = delta.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    ascending = np.argsort(np.abs(delta).ravel())
    mask = np.zeros(n, bool)
    mask[ascending[n_bot : n_bot + target]] = True
    return mask.reshape(delta.shape)


@pytest.mark.parametrize("n", [7, 64, 256])
@pytest.mark.parametrize("density, gamma", [(0.7, 0.01), (0.8, 0.05), (0.9, 0.03), (0.9, 0.2), (0.5, 0.15)])
def test_breadcrumbs_counts_match_mergekit_015_on_small_tensors(n, density, gamma):
    """On 1-D tensors (norms, biases) the entries kept are mergekit 0.1.5's whenever |δ| are distinct:
    the same count kept, the same number of outliers dropped (fewer when density + gamma > 1)."""
    rng = np.random.default_rng(n)
    base = rng.normal(size=n).astype(np.float32)
    delta = (rng.permutation(n) + 1).astype(np.float32) * rng.choice([-1.0, 1.0], n).astype(np.float32) * 1e-3  # distinct |δ|
    mask = breadcrumbs_mask_mergekit_015(delta, density, gamma)
    got = run("breadcrumbs", [base + delta], base, weight=[1.0], density=[density], gamma=[gamma], **{"lambda": 1.0}, normalize=False, rescale=False)
    close(got, base + delta * mask, 1e-6)
    assert np.count_nonzero(mask) == int(density * n)
    dropped_top = np.count_nonzero(~mask & (np.abs(delta) > np.abs(delta[mask]).max()))
    assert dropped_top == min(int(gamma * n), n - int(density * n))


@pytest.mark.parametrize("n", [7, 64, 256])
def test_breadcrumbs_with_tied_magnitudes_differs_from_mergekit_only_in_which_tied_entries_stay(n):
    """Equal |δ| at a cut: ranked by index here (larger rank to the lower index), by torch.sort's
    unstable order in mergekit 0.1.5. The same count and the same magnitudes are kept either way."""
    import torch

    density, gamma = 0.7, 0.05
    rng = np.random.default_rng(100 + n)
    # Multiples of 2^-10, so that (base + δ) − base is δ exactly and the ties survive the subtraction.
    base = (rng.integers(-1024, 1024, n) / 1024).astype(np.float32)
    delta = (rng.choice([1.0, 2.0, 3.0, 4.0], n) * rng.choice([-1.0, 1.0], n) / 1024).astype(np.float32)  # many ties
    got = run("breadcrumbs", [base + delta], base, weight=[1.0], density=[density], gamma=[gamma], **{"lambda": 1.0}, normalize=False, rescale=False)
    keep, top = int(density * n), min(int(gamma * n), n - int(density * n))
    by_rank = np.lexsort((np.arange(n), -np.abs(delta)))  # decreasing |δ|, ties in index order
    ours = np.zeros(n, bool)
    ours[by_rank[top : top + keep]] = True
    close(got, base + delta * ours, 1e-6)
    ascending = torch.sort(torch.from_numpy(np.abs(delta))).indices.numpy()  # as mergekit 0.1.5 sorts
    theirs = np.zeros(n, bool)
    n_bot = max(0, n - keep - int(gamma * n))
    theirs[ascending[n_bot : n_bot + keep]] = True
    assert ours.sum() == theirs.sum() == keep
    np.testing.assert_array_equal(np.sort(np.abs(delta[ours])), np.sort(np.abs(delta[theirs])))
