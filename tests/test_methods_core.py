"""The core methods on small hand-made tensors against tests/reference.py (NumPy, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference as ref
from modelalloy.methods import get_method

RNG = np.random.default_rng(42)


def arrays(n, shape=(6, 5)):
    return [RNG.standard_normal(shape) for _ in range(n)]


def t32(*xs):
    return [torch.tensor(x, dtype=torch.float32) for x in xs]


def call(name, tensors, base=None, seed=0, **params):
    method = get_method(name)
    defaults = {p.name: ([p.default] * len(tensors) if p.per_model else p.default) for p in method.params if not p.required}
    defaults.update(params)
    out = method(t32(*tensors), base=None if base is None else t32(base)[0], seed=seed, **defaults)
    return out.double().numpy()


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# --- linear -------------------------------------------------------------------------------

def test_linear_matches_weighted_average():
    xs = arrays(3)
    close(call("linear", xs, weight=[0.2, 0.5, 1.3]), ref.linear(xs, [0.2, 0.5, 1.3]))


def test_linear_without_normalize_is_weighted_sum():
    xs = arrays(2)
    close(call("linear", xs, weight=[2.0, -1.0], normalize=False), 2 * xs[0] - xs[1])


def test_linear_of_identical_inputs_is_the_input():
    x = arrays(1)[0]
    close(call("linear", [x, x, x], weight=[0.1, 0.7, 3.0]), x)


# --- slerp --------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_reference(t):
    a, b = arrays(2)
    close(call("slerp", [b], base=a, t=t), ref.slerp(t, a, b))


def test_slerp_endpoints_are_the_inputs_exactly():
    a, b = arrays(2)
    close(call("slerp", [b], base=a, t=0.0), a, 1e-6)
    close(call("slerp", [b], base=a, t=1.0), b, 1e-6)


def test_slerp_of_parallel_vectors_is_lerp():
    a = arrays(1)[0]
    b = 3.0 * a  # cos = 1: no plane to rotate in
    close(call("slerp", [b], base=a, t=0.3), 0.7 * a + 0.3 * b)


def test_slerp_keeps_the_norm_of_unit_vectors():
    a, b = arrays(2, shape=(50,))
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    out = call("slerp", [b], base=a, t=0.37)
    assert abs(np.linalg.norm(out) - 1.0) < 1e-5  # a lerp would shrink it


# --- nuslerp ------------------------------------------------------------------------------

@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_without_base(flatten, row_wise):
    a, b = arrays(2)
    got = call("nuslerp", [a, b], weight=[1.0, 3.0], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    close(got, ref.nuslerp([a, b], [1.0, 3.0], flatten=flatten, row_wise=row_wise))


def test_nuslerp_with_base_interpolates_task_vectors():
    base, a, b = arrays(3)
    got = call("nuslerp", [a, b], base=base, weight=[2.0, 1.0], nuslerp_flatten=False)
    close(got, ref.nuslerp([a, b], [2.0, 1.0], base=base, flatten=False))


def test_nuslerp_weight_endpoints():
    a, b = arrays(2)
    close(call("nuslerp", [a, b], weight=[1.0, 0.0]), a, 1e-5)
    close(call("nuslerp", [a, b], weight=[0.0, 1.0]), b, 1e-5)


def test_nuslerp_zero_task_vector_gives_no_nan():
    base, a = arrays(2)
    got = call("nuslerp", [a, base.copy()], base=base, weight=[1.0, 1.0], nuslerp_flatten=False)
    assert np.isfinite(got).all()
    close(got, base + 0.5 * (a - base))  # one direction is zero: lerp


# --- task arithmetic, TIES ----------------------------------------------------------------

def test_task_arithmetic_matches_reference():
    base, *xs = arrays(4)
    close(call("task_arithmetic", xs, base=base, weight=[0.5, 1.0, -0.3], lambda_=0.8), ref.task_family(base, xs, [0.5, 1.0, -0.3], lam=0.8))


def test_task_arithmetic_normalized():
    base, *xs = arrays(3)
    close(call("task_arithmetic", xs, base=base, weight=[0.5, 1.5], normalize=True), ref.task_family(base, xs, [0.5, 1.5], normalize=True))


def test_ties_hand_computed_4x1():
    """A worked example: base 0, two models; density 0.5 keeps 2 of 4 entries each."""
    base = np.zeros(4)
    m1 = np.array([3.0, -1.0, 0.5, -4.0])  # keeps 3 and -4
    m2 = np.array([-2.0, 2.5, 0.1, -1.0])  # keeps -2 and 2.5
    # weighted sums per entry: [3-2, 2.5, 0, -4] -> signs [+, +, + (0), -]
    # agreeing: entry0: only m1 (3) -> 3/1; entry1: m2 2.5 -> 2.5; entry2: none -> 0; entry3: m1 -4 -> -4
    got = call("ties", [m1, m2], base=base, weight=[1.0, 1.0], density=[0.5, 0.5])
    close(got, np.array([3.0, 2.5, 0.0, -4.0]))


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_matches_reference(consensus):
    base, *xs = arrays(4)
    weights, densities = [0.7, 1.0, 0.4], [0.5, 0.3, 0.8]
    masks = [ref.topk_mask(x - base, d) for x, d in zip(xs, densities)]
    expected = ref.task_family(base, xs, weights, masks, consensus=consensus, normalize=True)
    close(call("ties", xs, base=base, weight=weights, density=densities, consensus_method=consensus), expected)


def test_ties_density_one_is_sign_consensus_without_trimming():
    base, *xs = arrays(3)
    expected = ref.task_family(base, xs, [1.0, 1.0], None, consensus="sum", normalize=True)
    close(call("ties", xs, base=base, weight=[1.0, 1.0], density=[1.0, 1.0]), expected)


def test_ties_of_identical_models_is_that_model():
    base, x = arrays(2)
    close(call("ties", [x, x, x], base=base, weight=[1.0, 1.0, 1.0], density=[1.0] * 3), x)


def test_ties_keeps_exactly_k_entries_with_ties_in_magnitude():
    base = np.zeros(10)
    x = np.array([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 2.0, 0.0, 0.0, 0.0])
    got = call("ties", [x], base=base, weight=[1.0], density=[0.3])  # k = 3: 2.0 and two of the 1.0s
    assert np.count_nonzero(got) == 3 and got[6] == 2.0


# --- DARE ---------------------------------------------------------------------------------

def dare_masks(seed, shape, densities):
    """The documented scheme: one CPU generator per model, seeded with the tensor's seed + the
    model's index, drawn in index order."""
    return [(torch.rand(shape, generator=torch.Generator().manual_seed(seed + i)) < d).numpy() for i, d in enumerate(densities)]


@pytest.mark.parametrize("name,consensus", [("dare_linear", None), ("dare_ties", "sum")])
def test_dare_matches_reference(name, consensus):
    base, *xs = arrays(3, shape=(20, 10))
    weights, densities = [0.6, 0.9], [0.5, 0.7]
    masks = dare_masks(123, base.shape, densities)
    expected = ref.task_family(base, xs, weights, masks, consensus=consensus, rescale_l1=True)
    close(call(name, xs, base=base, seed=123, weight=weights, density=densities), expected)


def test_dare_single_model_keeps_about_density_and_restores_l1_norm():
    base, x = arrays(2, shape=(200, 50))
    out = call("dare_linear", [x], base=base, seed=7, weight=[1.0], density=[0.3])
    kept = out - base.astype(np.float32)  # dropped entries leave the float32 base untouched
    frac = np.count_nonzero(np.abs(kept) > 0) / kept.size
    assert abs(frac - 0.3) < 0.02
    np.testing.assert_allclose(np.abs(kept).sum(), np.abs(x - base).sum(), rtol=1e-4)


def test_dare_density_one_is_task_arithmetic():
    base, *xs = arrays(3)
    close(call("dare_linear", xs, base=base, weight=[0.5, 0.5], density=[1.0, 1.0]), ref.task_family(base, xs, [0.5, 0.5]))


def test_dare_inverse_p_rescale():
    base, x = arrays(2)
    (mask,) = dare_masks(5, base.shape, [0.5])
    got = call("dare_linear", [x], base=base, seed=5, weight=[1.0], density=[0.5], rescale="inverse_p")
    close(got, base + (x - base) * mask / 0.5)


def test_dare_same_seed_bit_identical_other_seed_differs():
    base, *xs = arrays(3, shape=(30, 30))
    a = call("dare_ties", xs, base=base, seed=1, weight=[1, 1], density=[0.5, 0.5])
    b = call("dare_ties", xs, base=base, seed=1, weight=[1, 1], density=[0.5, 0.5])
    c = call("dare_ties", xs, base=base, seed=2, weight=[1, 1], density=[0.5, 0.5])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# --- passthrough, purity ------------------------------------------------------------------

def test_passthrough_copies_and_scales():
    (x,) = arrays(1)
    close(call("passthrough", [x]), x)
    close(call("passthrough", [x], scale=[0.5]), 0.5 * x)


@pytest.mark.parametrize("name", ["linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_methods_never_modify_their_inputs(name):
    base, a, b = t32(*arrays(3))
    method = get_method(name)
    tensors = [a] if name == "slerp" else [a, b]
    params = {p.name: ([1.0] * len(tensors) if p.per_model else p.default) for p in method.params}
    if "density" in params:
        params["density"] = [0.5] * len(tensors)
    if name == "slerp":
        params["t"] = 0.4
    snapshot = [x.clone() for x in (base, a, b)]
    method(tensors, base=base, seed=0, **params)
    for before, after in zip(snapshot, (base, a, b)):
        assert torch.equal(before, after)
