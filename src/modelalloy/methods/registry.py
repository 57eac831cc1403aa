"""How a merge method declares itself, and the registry that `alloy` looks methods up in.

A method is one pure function over the tensors of one output tensor:

    fn(tensors: list[Tensor], *, base: Tensor (if it takes one), seed: int (if random), **params)

or, declared with ``blockwise=True``, a factory of the same method in row blocks (see
`modelalloy.methods.blockwise`): ``fn(spec: TensorSpec, *, seed (if random), **params) -> BlockMerge``;
calling the method then runs that factory's merge on the whole tensor, so both paths are one code.

``tensors`` are the non-base inputs in config order; per-model parameters arrive as lists aligned
with them, global ones as scalars. A data-aware method declares the statistic it reads
(``stats="fisher"`` or ``"gram"``, see `modelalloy.io.stats_file`); it then also receives a keyword
of that name: each input's statistic tensor, aligned with ``tensors``, or None where the plan
found this tensor needs none (e.g. a norm under regmean). A parameter named ``lambda`` arrives as ``lambda_`` (Python
keyword). The declaration says everything `plan/` checks before any tensor is read: whether a
base is needed, how many models, which parameters exist, their defaults and valid ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelalloy.errors import ConfigError, did_you_mean
from modelalloy.methods.blockwise import BlockMerge, TensorSpec, merge_whole

REQUIRED = object()  # sentinel: the parameter has no default


@dataclass(frozen=True)
class Param:
    """One method parameter. `check(value)` returns an error message or None."""

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    kind: type = float
    doc: str = ""
    check: Callable[[Any], str | None] | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def kwarg(self) -> str:
        return self.name + "_" if self.name in ("lambda",) else self.name

    def coerce(self, value: Any, where: str) -> Any:
        """Validate one resolved value for this parameter; returns it in its declared kind."""
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(f"{where}: {self.name}={value!r} is not one of {', '.join(map(repr, self.choices))}")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {self.name} must be true or false, not {value!r}")
        elif self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: {self.name} must be a number, not {value!r}")
            value = self.kind(value)
        if self.check is not None and (problem := self.check(value)):
            raise ConfigError(f"{where}: {self.name}={value!r} {problem}")
        return value


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], str | None]:
    def check(value: float) -> str | None:
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            return f"is outside {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        return None

    return check


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    base: str  # "required", "optional" or "unused"
    min_models: int = 1  # non-base inputs
    max_models: int | None = None
    randomized: bool = False
    reference: str = ""
    doc: str = ""
    vs_mergekit: str = ""  # where and why we differ from mergekit, shown by `alloy methods`
    exact_count: bool = field(default=False)  # with a base, exactly min_models others
    # Rules between parameters (e.g. DELLA's density ± epsilon inside (0, 1)), checked by plan/
    # per tensor: check(resolved params, names of the non-base models) -> one-line problem or None.
    check: Callable[[dict[str, Any], Sequence[str]], str | None] | None = None
    stats: str | None = None  # the per-model statistic the method reads ("fisher", "gram"), if any
    blockwise: bool = False  # fn is a BlockMerge factory: the engine streams it in row blocks

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def _kwargs(self, params: dict[str, Any], seed: int | None) -> dict[str, Any]:
        kwargs = {self.param(k).kwarg if self.param(k) else k: v for k, v in params.items()}
        if self.randomized:
            kwargs["seed"] = 0 if seed is None else seed
        return kwargs

    def block_merge(self, spec: TensorSpec, *, seed: int | None = None, **params: Any) -> BlockMerge:
        """This tensor's merge in row blocks (only for methods declared `blockwise`)."""
        assert self.blockwise, self.name
        return self.fn(spec, **self._kwargs(params, seed))

    def __call__(self, tensors: Sequence[Any], *, base: Any = None, seed: int | None = None, stats: Sequence[Any] | None = None, **params: Any) -> Any:
        tensors = list(tensors)
        if self.blockwise:
            first = tensors[0]
            spec = TensorSpec(tuple(first.shape), first.dtype, first.device)
            return merge_whole(self.block_merge(spec, seed=seed, **params), spec, tensors, None if self.base == "unused" else base)
        kwargs = self._kwargs(params, seed)
        if self.base != "unused":
            kwargs["base"] = base
        if self.stats is not None:
            kwargs[self.stats] = list(stats) if stats is not None else None
        return self.fn(tensors, **kwargs)


def merge_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    base: str = "unused",
    min_models: int = 1,
    max_models: int | None = None,
    randomized: bool = False,
    reference: str = "",
    vs_mergekit: str = "",
    check: Callable[[dict[str, Any], Sequence[str]], str | None] | None = None,
    stats: str | None = None,
    blockwise: bool = False,
) -> Callable[[Callable[..., Any]], MergeMethod]:
    """Decorator: declares a method; the docstring's first paragraph is its one-line doc."""
    if base not in ("required", "optional", "unused"):
        raise ValueError(f"method {name!r}: base must be required, optional or unused, not {base!r}")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"method {name!r} declares a parameter twice: {names}")
    for p in params:
        if not p.required and p.default is not None:
            p.coerce(p.default, f"method {name!r} default")  # a bad default is our bug, caught at import

    def wrap(fn: Callable[..., Any]) -> MergeMethod:
        doc = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())  # one line, indentation gone
        return MergeMethod(name, fn, tuple(params), base, min_models, max_models, randomized, reference, doc, vs_mergekit, check=check, stats=stats, blockwise=blockwise)

    return wrap


class Registry:
    """Methods by name; a repeated name is an error, not a silent override."""

    def __init__(self) -> None:
        self._methods: dict[str, MergeMethod] = {}

    def add(self, method: MergeMethod) -> None:
        if method.name in self._methods:
            raise ValueError(f"merge method {method.name!r} is registered twice")
        self._methods[method.name] = method

    def get(self, name: str) -> MergeMethod:
        method = self._methods.get(name)
        if method is None:
            raise ConfigError(f"merge_method: unknown method {name!r}{did_you_mean(name, self._methods)}; `alloy methods` lists them")
        return method

    def __contains__(self, name: str) -> bool:
        return name in self._methods

    def __iter__(self):
        return iter(sorted(self._methods.values(), key=lambda m: m.name))

    def names(self) -> list[str]:
        return sorted(self._methods)
