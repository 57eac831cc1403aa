"""Merge methods: pure functions over one output tensor, listed explicitly in `REGISTRY`.

Third-party methods register through the ``modelalloy.methods`` entry-point group: each entry
point names a `MergeMethod` (made with `merge_method`); a name that clashes is an error.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from modelalloy.methods.data_aware import DATA_AWARE_METHODS
from modelalloy.methods.interpolation import linear, nuslerp, passthrough, slerp
from modelalloy.methods.registry import REQUIRED, MergeMethod, Param, Registry, in_range, merge_method
from modelalloy.methods.subspace import SUBSPACE_METHODS
from modelalloy.methods.task_vectors import FAMILY_METHODS

__all__ = ["REGISTRY", "MergeMethod", "Param", "REQUIRED", "get_method", "in_range", "merge_method"]

REGISTRY = Registry()
for _method in (linear, slerp, nuslerp, passthrough, *FAMILY_METHODS, *SUBSPACE_METHODS, *DATA_AWARE_METHODS):
    REGISTRY.add(_method)


def _load_plugins() -> None:
    for ep in entry_points(group="modelalloy.methods"):
        method = ep.load()
        if not isinstance(method, MergeMethod):
            raise TypeError(f"entry point {ep.name!r} ({ep.value}) is not a MergeMethod; decorate it with merge_method")
        REGISTRY.add(method)


_load_plugins()


def get_method(name: str) -> MergeMethod:
    return REGISTRY.get(name)
