"""Merge methods: pure functions over one output tensor, listed explicitly in `REGISTRY`.

Third-party methods register through the ``modelalloy.methods`` entry-point group: each entry
point names a `MergeMethod` (made with `merge_method`); a name that clashes is an error. In a
plugin's pyproject.toml::

    [project.entry-points."modelalloy.methods"]
    my_method = "my_package.merging:my_method"
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from modelalloy.errors import ConfigError
from modelalloy.methods.arcee_fusion import arcee_fusion
from modelalloy.methods.data_aware import DATA_AWARE_METHODS
from modelalloy.methods.interpolation import linear, nuslerp, passthrough, slerp
from modelalloy.methods.model_stock import model_stock
from modelalloy.methods.nearswap import nearswap
from modelalloy.methods.ram import ram, ramplus_tl
from modelalloy.methods.registry import REQUIRED, MergeMethod, Param, Registry, in_range, merge_method
from modelalloy.methods.sce import sce
from modelalloy.methods.spherical import karcher, multislerp
from modelalloy.methods.subspace import SUBSPACE_METHODS
from modelalloy.methods.task_vectors import FAMILY_METHODS

__all__ = ["BUILTIN_METHODS", "REGISTRY", "MergeMethod", "Param", "REQUIRED", "build_registry", "get_method", "in_range", "merge_method"]

BUILTIN_METHODS: tuple[MergeMethod, ...] = (
    linear,
    slerp,
    nuslerp,
    multislerp,
    karcher,
    nearswap,
    passthrough,
    *FAMILY_METHODS,
    model_stock,
    sce,
    arcee_fusion,
    ram,
    ramplus_tl,
    *SUBSPACE_METHODS,
    *DATA_AWARE_METHODS,
)

PLUGIN_GROUP = "modelalloy.methods"


def build_registry(plugins: Iterable[EntryPoint] | None = None) -> Registry:
    """The built-in methods plus those of the installed plugins (or of `plugins`, for tests)."""
    registry = Registry()
    for method in BUILTIN_METHODS:
        registry.add(method)
    for ep in entry_points(group=PLUGIN_GROUP) if plugins is None else plugins:
        method = ep.load()
        if not isinstance(method, MergeMethod):
            raise ConfigError(f"entry point {ep.name!r} ({ep.value}) in {PLUGIN_GROUP} is not a MergeMethod; decorate it with modelalloy.methods.merge_method")
        if method.name in registry:
            raise ConfigError(
                f"entry point {ep.name!r} ({ep.value}) registers merge method {method.name!r}, which already exists; rename the plugin's method"
            )
        registry.add(method)
    return registry


REGISTRY = build_registry()


def get_method(name: str) -> MergeMethod:
    return REGISTRY.get(name)
