"""What a config asks for, normalised before any tensor is planned: the models, their layer
ranges and parameters as a list of slices (a `models:` config is one slice over every layer), and
the checks a config can fail without looking at a tensor (parameter names and values, architectures)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelalloy import arch
from modelalloy.config import MergeConfig, check_setting
from modelalloy.errors import ConfigError, PlanError, did_you_mean
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.methods import MergeMethod, Param



@dataclass
class SliceSource:
    model: str
    start: int
    end: int
    parameters: dict
    stats: str | None = None  # statistics file (models: form only)


@dataclass
class LayerSlice:
    sources: list[SliceSource]
    base: str | None
    parameters: dict

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


def check_parameter_names(config: MergeConfig, method: MergeMethod, notes: list[str]) -> None:
    def check(params: dict, where: str, *, per_model_scope: bool) -> None:
        for key, value in params.items():
            p = method.param(key)
            if p is None:
                raise ConfigError(
                    f"{where}: unknown parameter {key!r} for {method.name}{did_you_mean(key, method.param_names)}"
                    + (f"; {method.name} takes {', '.join(method.param_names)}" if method.param_names else "; it takes none")
                )
            if per_model_scope and not p.per_model:
                raise ConfigError(f"{where}: {key!r} is a global parameter of {method.name}; set it in the top-level or slice parameters")
            _check_written_values(p, check_setting(value, f"{where}.{key}"), f"{where}.{key}")

    check(config.parameters, "parameters", per_model_scope=False)
    for i, m in enumerate(config.models or []):
        check(m.parameters, f"models[{i}] ({m.model}).parameters", per_model_scope=True)
    for i, s in enumerate(config.slices or []):
        check(s.parameters, f"slices[{i}].parameters", per_model_scope=False)
        for j, src in enumerate(s.sources):
            check(src.parameters, f"slices[{i}].sources[{j}] ({src.model}).parameters", per_model_scope=True)


def _check_written_values(p: Param, setting: Any, where: str) -> None:
    """Range-check every value the user wrote, even one a higher-precedence scope overrides."""
    if isinstance(setting, list):
        for entry in setting:
            _check_written_values(p, entry.value if hasattr(entry, "value") else entry, where)
    elif not (isinstance(setting, str) and p.kind in (int, float)):  # strings pick from lists per layer
        p.coerce(setting, where)


def check_architectures(config: MergeConfig, checkpoints: Mapping[str, Checkpoint], allow_crimes: bool) -> None:
    refs = config.all_model_refs()
    archs = {ref: arch.architecture(checkpoints[ref].config) for ref in refs}
    if len(set(archs.values())) > 1 and not allow_crimes:
        listing = ", ".join(f"{ref} is {a}" for ref, a in archs.items())
        raise PlanError(f"the models have different architectures ({listing}); pass --allow-crimes if you mean it")


def normalise_slices(config: MergeConfig, method: MergeMethod, checkpoints: Mapping[str, Checkpoint]) -> list[LayerSlice]:
    """`models:` becomes one slice over all layers; every slice is checked against the method."""
    def layers(ref: str) -> int:
        c = checkpoints[ref]
        return arch.num_layers(c.config, c.tensors)

    if config.models is not None:
        counts = {m.model: layers(m.model) for m in config.models}
        if config.base_model:
            counts.setdefault(config.base_model, layers(config.base_model))
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{ref} has {n}" for ref, n in counts.items())
            raise PlanError(f"the models have different layer counts ({listing}); use slices to pick matching layer ranges")
        n = next(iter(counts.values()))
        sources = [SliceSource(m.model, 0, n, dict(m.parameters), m.stats) for m in config.models]
        if config.base_model and method.base != "unused" and config.base_model not in [s.model for s in sources]:
            sources.insert(0, SliceSource(config.base_model, 0, n, {}))
        slices = [LayerSlice(sources, config.base_model, {})]
    else:
        slices = []
        for i, s in enumerate(config.slices or []):
            sources = []
            for j, src in enumerate(s.sources):
                start, end = src.layer_range
                n = layers(src.model)
                if end > n:
                    raise PlanError(f"slices[{i}].sources[{j}]: layer_range [{start}, {end}) is outside {src.model}, which has {n} layers")
                sources.append(SliceSource(src.model, start, end, dict(src.parameters)))
            slices.append(LayerSlice(sources, s.base_model or config.base_model, dict(s.parameters)))

    for i, sl in enumerate(slices):
        where = "models" if config.models is not None else f"slices[{i}]"
        refs = [s.model for s in sl.sources]
        if method.base == "required" and not sl.base:
            raise ConfigError(f"{method.name} needs a base_model (the model the task vectors are taken from)")
        if method.base != "unused" and sl.base and sl.base not in refs:
            raise ConfigError(f"{where}: base_model {sl.base} is not among the sources; add it with the same layer_range")
        if method.base != "unused" and sl.base:
            for src in sl.sources:
                if src.model == sl.base and src.parameters:
                    names = ", ".join(sorted(src.parameters))
                    # mergekit ignores these silently; we at least say so.
                    warnings.warn(f"{where}: parameters of the base model {sl.base} ({names}) are not used by {method.name}", stacklevel=3)
        others = len([r for r in refs if not (method.base != "unused" and r == sl.base)])
        if len(set(refs)) != len(refs) and method.name != "passthrough":
            raise ConfigError(f"{where}: a model appears twice among the sources of one merge")
        if method.stats:
            for src in sl.sources:
                if src.stats is None and not (method.base != "unused" and src.model == sl.base):
                    how = f"add `stats: FILE` to it, made by `alloy stats {src.model} --data TEXT FILE`"
                    if config.models is None:
                        how = "give the models with `models:` (slices cannot carry stats) and " + how
                    raise ConfigError(f"{where}: {method.name} needs {method.stats} statistics for {src.model}; {how}")
        elif any(src.stats for src in sl.sources):
            warnings.warn(f"{where}: {method.name} reads no statistics; the models' stats files are not used", stacklevel=3)
        low, high = method.min_models, method.max_models
        if others < low or (high is not None and others > high):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            base_note = " besides the base" if method.base != "unused" and sl.base else ""
            raise ConfigError(f"{where}: {method.name} takes {want} model(s){base_note}, got {others}")
    return slices


def pick_donor(config: MergeConfig, slices: list[LayerSlice]) -> str:
    source = config.tokenizer_source
    if config.tokenizer is not None:
        source = config.tokenizer.source
    if source not in (None, "base", "union"):
        if source not in config.all_model_refs():
            raise ConfigError(f"tokenizer_source: {source!r} is not one of the models{did_you_mean(source, config.all_model_refs())}")
        return source
    return config.base_model or slices[0].base or slices[0].sources[0].model
