"""Properties every registered merge method must have, checked with hypothesis over the whole
registry, so a method added later is covered without touching this file.

Universal (every method): identical inputs give that input; finite inputs give a finite
result of the same shape and dtype (or a clear `MergeError` where the method declares degenerate
inputs it refuses); inputs are never modified; the same seed gives bit-identical output;
strided (non-contiguous) inputs give the same result as contiguous ones.

Declared per method in `TRAITS` (a method that is not listed gets only the universal ones):
symmetry under permuting the non-base models, averaging (identical non-base models give that
model), endpoints (parameter values whose result is known exactly). Inferred from the
parameters: `lambda` 0 gives the base; `density` 1 means no sparsification.

The regular suite draws a few hundred examples in all; for a long fuzzing run:
    MODELALLOY_PROPERTY_EXAMPLES=2000 .venv/bin/python -m pytest tests/methods/test_method_properties.py
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from modelalloy.errors import MergeError
from modelalloy.methods import REGISTRY, MergeMethod
from modelalloy.methods.task_vectors import FAMILY

EXAMPLES = int(os.environ.get("MODELALLOY_PROPERTY_EXAMPLES", "12"))
FEW = max(3, EXAMPLES // 3)  # for the narrower properties

# Values for required parameters, by name, when TRAITS gives none.
GENERIC_REQUIRED: dict[str, Any] = {"weight": 1.0, "t": 0.5}


@dataclass(frozen=True)
class Traits:
    params: dict[str, Any] = field(default_factory=dict)  # used in every property (per-model: one value for all)
    symmetric: bool = False  # permuting the non-base models (and their per-model parameters) changes nothing
    averages: dict[str, Any] | None = None  # with these params, identical non-base models give that model
    # (parameters, expected): expected is "base" or the index of the model the result must equal
    endpoints: tuple[tuple[dict[str, Any], str | int], ...] = ()
    refuses: tuple[type[Exception], ...] = ()  # errors it may raise on degenerate inputs instead of a result
    skip: str = ""  # why the generic properties cannot run (e.g. needs statistics files)


def _one_hot(n: int, k: int) -> list[float]:
    return [1.0 if i == k else 0.0 for i in range(n)]


ONE_HOT = "one-hot"  # placeholder: a weight list selecting model k, built for the drawn model count
_SPARSE = {"density": 0.6}
_FAMILY_ENDPOINTS = (({"weight": ONE_HOT + ":0", "density": 1.0}, 0), ({"weight": ONE_HOT + ":1", "density": 1.0}, 1))

TRAITS: dict[str, Traits] = {
    "linear": Traits(symmetric=True, averages={}, endpoints=(({"weight": ONE_HOT + ":0"}, 0), ({"weight": ONE_HOT + ":1"}, 1))),
    "slerp": Traits(endpoints=(({"t": 0.0}, "base"), ({"t": 1.0}, 0))),
    "nuslerp": Traits(symmetric=True, averages={}, endpoints=(({"weight": [1.0, 0.0]}, 0), ({"weight": [0.0, 1.0]}, 1))),
    "multislerp": Traits(symmetric=True, averages={}, refuses=(MergeError,), endpoints=(({"weight": ONE_HOT + ":0"}, 0), ({"weight": ONE_HOT + ":1"}, 1))),
    "karcher": Traits(symmetric=True, averages={}, endpoints=(({"weight": ONE_HOT + ":0"}, 0), ({"weight": ONE_HOT + ":1"}, 1))),
    "nearswap": Traits(params={"t": 0.05}, endpoints=(({"t": 1e6}, 0),)),
    "passthrough": Traits(endpoints=(({"scale": [1.0]}, 0),)),
    "task_arithmetic": Traits(symmetric=True, endpoints=(({"weight": ONE_HOT + ":0"}, 0), ({"weight": ONE_HOT + ":1"}, 1))),
    "ties": Traits(params=_SPARSE, symmetric=True, averages={"density": 1.0, "normalize": True}, endpoints=_FAMILY_ENDPOINTS),
    "dare_linear": Traits(params=_SPARSE, endpoints=_FAMILY_ENDPOINTS),
    "dare_ties": Traits(params=_SPARSE, averages={"density": 1.0, "normalize": True}, endpoints=_FAMILY_ENDPOINTS),
    "breadcrumbs": Traits(params={"density": 0.6, "gamma": 0.1}, symmetric=True, endpoints=_FAMILY_ENDPOINTS),
    "breadcrumbs_ties": Traits(params={"density": 0.6, "gamma": 0.1}, symmetric=True, averages={"density": 1.0, "normalize": True}, endpoints=_FAMILY_ENDPOINTS),
    "della": Traits(params={"density": 0.5, "epsilon": 0.2}, averages={"density": 1.0}, endpoints=_FAMILY_ENDPOINTS),
    "della_linear": Traits(params={"density": 0.5, "epsilon": 0.2, "rescale": "inverse_p"}, endpoints=_FAMILY_ENDPOINTS),
    "model_stock": Traits(symmetric=True, averages={}),
    "sce": Traits(params={"select_topk": 0.5}, symmetric=True, averages={"select_topk": 1.0}),
    "arcee_fusion": Traits(),
    # epsilon 0: every change is "active", so identical models average to themselves exactly.
    "ram": Traits(symmetric=True, averages={"epsilon": 0.0}, endpoints=(({"epsilon": 1e9}, "base"),)),
    "ramplus_tl": Traits(symmetric=True, averages={"epsilon": 0.0}, endpoints=(({"epsilon": 1e9}, "base"),)),
}

METHODS = [m.name for m in REGISTRY]


# ------------------------------------------------------------------------- drawing inputs


@dataclass
class Case:
    method: MergeMethod
    models: list[torch.Tensor]
    base: torch.Tensor | None
    params: dict[str, Any]
    stats: list[torch.Tensor] | None = None  # per-model statistics, for the data-aware methods

    def run(self, *, models=None, base=None, seed: int = 0, **overrides) -> torch.Tensor:
        params = {**self.params, **resolve(self.method, len(self.models), overrides)}
        chosen = self.models if models is None else models
        return self.method(chosen, base=self.base if base is None else base, seed=seed, stats=self.stats, **params)


def resolve(method: MergeMethod, n: int, values: dict[str, Any]) -> dict[str, Any]:
    """Per-model values broadcast to n models; "one-hot:k" becomes a weight list."""
    out = {}
    for name, value in values.items():
        p = method.param(name)
        if p is None:
            continue  # a trait for a parameter this method does not take
        if isinstance(value, str) and value.startswith(ONE_HOT):
            value = _one_hot(n, int(value.split(":")[1]))
        if p.per_model and not isinstance(value, list):
            value = [value] * n
        out[name] = value
    return out


def base_params(method: MergeMethod, n: int, drawn_weights: list[float] | None) -> dict[str, Any]:
    traits = TRAITS.get(method.name, Traits())
    values: dict[str, Any] = {}
    for p in method.params:
        if p.name in traits.params:
            values[p.name] = traits.params[p.name]
        elif p.name == "weight" and p.per_model and drawn_weights is not None:
            values[p.name] = drawn_weights
        elif not p.required:
            values[p.name] = p.default
        elif p.name in GENERIC_REQUIRED:
            values[p.name] = GENERIC_REQUIRED[p.name]
        else:
            pytest.fail(f"{method.name}: required parameter {p.name!r} has no value; add it to TRAITS in {__file__}")
    return resolve(method, n, values)


def model_count(method: MergeMethod) -> st.SearchStrategy[int]:
    high = min(method.max_models or 4, 4)
    return st.integers(min(max(method.min_models, 1), high), high)


SHAPES = st.sampled_from([(7,), (3, 5), (2, 3, 4)])
VALUES = st.floats(-4.0, 4.0, width=32)


@st.composite
def cases(draw, method: MergeMethod) -> Case:
    n = draw(model_count(method))
    shape = draw(SHAPES)
    base = torch.from_numpy(draw(arrays(np.float32, shape, elements=VALUES)))
    # Models near the base (as fine-tunes are), some entries left exactly equal to it.
    models = []
    for _ in range(n):
        delta = torch.from_numpy(draw(arrays(np.float32, shape, elements=st.floats(-1.0, 1.0, width=32))))
        models.append(base + delta)
    weights = draw(st.lists(st.floats(0.125, 2.0, width=32), min_size=n, max_size=n))
    params = base_params(method, n, weights)
    stats = None
    if method.stats == "fisher":  # diagonal Fisher information: nonnegative, one per entry
        stats = [torch.from_numpy(draw(arrays(np.float32, shape, elements=st.floats(0.0, 3.0, width=32)))) for _ in range(n)]
    elif method.stats == "gram" and len(shape) == 2:  # a linear layer [out, in]: Gram matrices XᵀX of its inputs
        xs = [torch.from_numpy(draw(arrays(np.float32, (6, shape[1]), elements=st.floats(-2.0, 2.0, width=32)))) for _ in range(n)]
        stats = [x.T @ x + 1e-3 * torch.eye(shape[1]) for x in xs]
        params["layout"] = "out_in"
    elif method.stats == "gram":
        params["layout"] = "vector"
    return Case(method, models, base if method.base != "unused" else None, params, stats)


def run_or_refuse(case: Case, **kwargs) -> torch.Tensor | None:
    try:
        return case.run(**kwargs)
    except TRAITS.get(case.method.name, Traits()).refuses:
        return None


def _settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def _check(name: str, examples: int, body: Callable[[Case], None]) -> None:
    method = REGISTRY.get(name)
    traits = TRAITS.get(name, Traits())
    if traits.skip:
        pytest.skip(traits.skip)

    @_settings(examples)
    @given(case=cases(method))
    def check(case: Case) -> None:
        body(case)

    check()


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other element of a wider buffer)."""
    wide = torch.full((*x.shape, 2), float("nan"), dtype=x.dtype)
    wide[..., 1] = x
    view = wide[..., 1]
    assert not view.is_contiguous()
    return view


def _same(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------- the properties


@pytest.mark.parametrize("name", METHODS)
def test_finite_unmutated_deterministic_and_stride_blind(name):
    def body(case: Case) -> None:
        originals = [x.clone() for x in case.models] + ([case.base.clone()] if case.base is not None else [])
        out = run_or_refuse(case, seed=1)
        inputs = case.models + ([case.base] if case.base is not None else [])
        for before, after in zip(originals, inputs):
            assert torch.equal(before, after), f"{name} modified an input"
        if out is None:
            return
        assert out.shape == case.models[0].shape and out.dtype == case.models[0].dtype
        assert torch.isfinite(out).all(), f"{name} produced NaN/Inf from finite inputs"
        assert torch.equal(case.run(seed=1), out), f"{name}: same seed, different result"
        strided = case.run(seed=1, models=[_strided(x) for x in case.models], base=None if case.base is None else _strided(case.base))
        _same(strided, out, rtol=1e-6, atol=1e-6)

    _check(name, EXAMPLES, body)


@pytest.mark.parametrize("name", METHODS)
def test_identical_inputs_give_that_input(name):
    def body(case: Case) -> None:
        x = case.models[0]
        out = run_or_refuse(case, models=[x.clone() for _ in case.models], base=None if case.base is None else x.clone())
        assert out is not None, f"{name} refused identical inputs"
        _same(out, x)

    _check(name, FEW, body)


@pytest.mark.parametrize("name", [n for n in METHODS if TRAITS.get(n, Traits()).averages is not None])
def test_identical_models_average_to_that_model(name):
    def body(case: Case) -> None:
        x = case.models[0]
        out = run_or_refuse(case, models=[x.clone() for _ in case.models], **TRAITS[name].averages)
        assert out is not None
        _same(out, x)

    _check(name, FEW, body)


@pytest.mark.parametrize("name", [n for n in METHODS if TRAITS.get(n, Traits()).symmetric])
def test_permuting_models_changes_nothing(name):
    def body(case: Case) -> None:
        n = len(case.models)
        order = list(range(n))[::-1] if n > 1 else [0]
        params = {k: [v[i] for i in order] if REGISTRY.get(name).param(k).per_model else v for k, v in case.params.items()}
        out = run_or_refuse(case)
        permuted = Case(case.method, [case.models[i] for i in order], case.base, params, [case.stats[i] for i in order] if case.stats else None)
        again = run_or_refuse(permuted)
        if out is None or again is None:
            assert out is None and again is None
            return
        # Sums in another order round differently; sign elections on a sum that is ~0 may then
        # differ, so compare where the elected direction is not a rounding tie.
        _same(again, out, rtol=1e-4, atol=1e-4)

    _check(name, FEW, body)


def _endpoint_cases() -> list[tuple[str, int]]:
    out = []
    for name in METHODS:
        method = REGISTRY.get(name)
        count = len(TRAITS.get(name, Traits()).endpoints) + (1 if method.param("lambda") else 0)
        out += [(name, i) for i in range(count)]
    return out


@pytest.mark.parametrize("name, which", _endpoint_cases())
def test_endpoints(name, which):
    method = REGISTRY.get(name)
    endpoints = list(TRAITS.get(name, Traits()).endpoints)
    if method.param("lambda"):
        endpoints.append(({"lambda": 0.0}, "base"))  # no task vector at all
    overrides, expected = endpoints[which]

    def body(case: Case) -> None:
        if isinstance(expected, int) and expected >= len(case.models):
            return
        out = case.run(**overrides)
        target = case.base if expected == "base" else case.models[expected]
        _same(out, target)

    _check(name, FEW, body)


_ROWS = {row.name: row for row in FAMILY}


@pytest.mark.parametrize("name", [n for n in METHODS if REGISTRY.get(n).param("density")])
def test_density_one_is_no_sparsification(name):
    method = REGISTRY.get(name)

    def body(case: Case) -> None:
        dense = case.run(density=1.0, seed=1)
        # Nothing random or outlier-related may matter any more.
        others = {k: 0.3 for k in ("gamma", "epsilon") if method.param(k)}
        assert torch.equal(case.run(density=1.0, seed=2, **others), dense)
        row = _ROWS.get(name)
        if row is not None:  # the family: the same pipeline without a sparsifier, bit for bit
            reference = REGISTRY.get("ties" if row.consensus else "task_arithmetic")
            params = {k: v for k, v in case.params.items() if reference.param(k)}
            params["density" if reference.param("density") else "lambda"] = [1.0] * len(case.models) if reference.param("density") else case.params["lambda"]
            assert torch.equal(reference(case.models, base=case.base, **params), dense)

    _check(name, FEW, body)


def test_every_method_is_covered():
    """A registered method with a required parameter nobody gave a value breaks the properties loudly."""
    for method in REGISTRY:
        for p in method.params:
            if p.required and p.name not in GENERIC_REQUIRED:
                assert p.name in TRAITS.get(method.name, Traits()).params, f"{method.name}.{p.name}: add a value to TRAITS"
