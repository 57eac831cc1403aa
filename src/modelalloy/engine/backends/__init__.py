"""Backends: the ways to run a plan's unfinished shards. Each implements `Backend` and is looked up
by name (`--backend NAME`); `execute()` knows no backend by itself, so a third one (Dask, a GPU
worker pool) is one module and one `register_backend` call.

Built-in backends are named by import path and imported on first use: Ray is an optional extra,
and `alloy --help` should not pay for importing it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from modelalloy.errors import ConfigError

if TYPE_CHECKING:  # for annotations only: the engine's modules import this one
    from modelalloy.engine.inputs import NonFiniteInputs
    from modelalloy.engine.options import MergeOptions, Progress
    from modelalloy.engine.output import OutputJob
    from modelalloy.io.checkpoint import Checkpoint
    from modelalloy.plan import Plan


@dataclass
class ShardWork:
    """What a backend is handed: the output being written (layout, finished shards, manifest), the
    plan, the open inputs, the options, and where to note input tensors holding NaN or Inf."""

    job: OutputJob
    plan: Plan
    checkpoints: Mapping[str, Checkpoint]
    options: MergeOptions
    nonfinite: NonFiniteInputs


@dataclass
class ShardsWritten:
    """Every shard file in layout order (the index written), and each input model's content hash."""

    files: list[str]
    input_hashes: dict[str, str]


class Backend(Protocol):
    def check(self, options: MergeOptions) -> None:
        """Refuse options this backend cannot honour (a `ConfigError`), before any output exists."""
        ...

    def write_shards(self, work: ShardWork, progress: Callable[[Progress], None] | None) -> ShardsWritten:
        """Write every shard of `work.job` not already finished, recording each in the manifest as
        it completes (so an interrupted run resumes on any backend), then the index."""
        ...


_BACKENDS: dict[str, str | Callable[[], Backend]] = {
    "local": "modelalloy.engine.backends.local:LocalBackend",
    "ray": "modelalloy.engine.backends.ray_backend:RayBackend",
}


def register_backend(name: str, factory: str | Callable[[], Backend]) -> None:
    """Make `--backend NAME` available: `factory` builds the backend, or is "module:attribute" of it."""
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} is already registered")
    _BACKENDS[name] = factory


def backend_names() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    factory = _BACKENDS.get(name)
    if factory is None:
        raise ConfigError(f"--backend {name}: unknown backend; available: {', '.join(_BACKENDS)}")
    if isinstance(factory, str):
        module, attribute = factory.split(":")
        factory = getattr(importlib.import_module(module), attribute)
    return factory()
