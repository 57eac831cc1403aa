"""The search space (SEARCH.yaml), and turning one optuna trial into a plain merge config.

    base_model: ./base
    models: [./coder, ./writer]
    methods: [ties, dare_ties]       # one or several; the method is then a searched choice
    layer_groups: 4                  # each varied parameter is a 4-anchor gradient over depth
    filters: [self_attn, mlp]        # separate values for these tensors (plus one for the rest)
    parameters:                      # what varies, with bounds
      weight: {low: 0.0, high: 1.0}  # per-model parameters get one value per model
      density: {low: 0.2, high: 1.0}
    fixed: {normalize: true}         # passed through unchanged
    objective:
      evals: evals.yaml              # the measurement issue's eval sets file
      search: [code, shakespeare]    # sets the search optimises
      holdout: [code_holdout]        # sets reported for the final candidates only
      pareto: false                  # true: one objective per search set, a Pareto front
    sampler: tpe                     # tpe, cmaes, random, grid, nsga2
    trials: 40

A trial's parameter names say where a value goes: ``ties/density/m1/mlp/g2`` is the third
depth anchor of model 1's density on MLP tensors under TIES. The config built from a trial is an
ordinary merge config, so the best one is written out as `best.yaml` and runs with `alloy merge`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelalloy.config import MergeConfig, model_ref, read_yaml_file
from modelalloy.errors import ConfigError, did_you_mean
from modelalloy.methods import get_method


class Bounds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0, description="grid spacing (needed by the grid sampler)")

    @model_validator(mode="after")
    def _order(self) -> Bounds:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log-scaled bounds need low > 0")
        return self

    def grid(self) -> list[float]:
        if self.step is None:
            raise ValueError("the grid sampler needs a step for every parameter")
        return [float(x) for x in np.round(np.arange(self.low, self.high + self.step / 2, self.step), 10)]


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    evals: str
    search: list[str] = Field(min_length=1)
    holdout: list[str] = Field(default_factory=list)
    pareto: bool = False


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str | None = None
    models: list[str] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    layer_groups: int = Field(1, ge=1)
    filters: list[str] = Field(default_factory=list)
    parameters: dict[str, Bounds] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    random_seed: int = 0
    objective: Objective
    sampler: Literal["tpe", "cmaes", "random", "grid", "nsga2"] = "tpe"
    trials: int = Field(40, ge=1)
    seed: int = 0
    parallel: int = Field(1, ge=1, description="trials evaluated at once (Ray workers)")
    num_cpus: float = Field(1, gt=0, description="CPUs each trial declares to Ray")
    num_gpus: float = Field(0, ge=0, description="GPUs each trial declares to Ray")

    @model_validator(mode="before")
    @classmethod
    def _refs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if data.get("base_model") is not None:
                data["base_model"] = model_ref(data["base_model"])
            if isinstance(data.get("models"), list):
                data["models"] = [model_ref(m["model"] if isinstance(m, dict) and "model" in m and set(m) <= {"model"} else m) for m in data["models"]]
        return data

    @model_validator(mode="after")
    def _methods(self) -> SearchSpec:
        for name in self.methods:
            method = get_method(name)
            if method.base == "required" and not self.base_model:
                raise ValueError(f"method {name} needs base_model")
            known = set(method.param_names)
            for p in self.parameters:
                if p not in known and not any(p in get_method(m).param_names for m in self.methods):
                    every = sorted({q for m in self.methods for q in get_method(m).param_names})
                    raise ValueError(f"parameters: {p!r} is not a parameter of {', '.join(self.methods)}{did_you_mean(p, every)}")
        if self.sampler == "cmaes" and self.objective.pareto:
            raise ValueError("cmaes optimises one objective; use tpe or nsga2 for a Pareto search")
        if self.sampler == "grid" and len(self.methods) > 1:
            raise ValueError("the grid sampler searches one method at a time")
        return self

    def directions(self, higher_is_better: dict[str, bool]) -> list[str]:
        if not self.objective.pareto:
            return ["minimize"]
        return ["maximize" if higher_is_better[s] else "minimize" for s in self.objective.search]


def load_spec(path: str | Path) -> SearchSpec:
    path = Path(path)
    data = read_yaml_file(path, "search file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a search file is a mapping (models, methods, parameters, objective)")
    try:
        spec = SearchSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            key = str(first["loc"][-1])
            owner = {"objective": Objective}.get(str(first["loc"][0]), SearchSpec)
            msg = f"unknown key {key!r}{did_you_mean(key, owner.model_fields)}"
        raise ConfigError(f"{path}: {where}: {msg}") from None
    except ConfigError as e:  # an unknown method, from get_method
        raise ConfigError(f"{path}: {e}") from None
    # Relative paths are relative to the search file, like the evals file's are.
    return spec.model_copy(update={"objective": spec.objective.model_copy(update={"evals": str(path.parent / spec.objective.evals)})})


def _slots(spec: SearchSpec, method: str) -> list[tuple[str, str, int | None]]:
    """(optuna name prefix, parameter, model index or None) for every varied parameter of `method`."""
    m = get_method(method)
    slots = []
    for name in spec.parameters:
        p = m.param(name)
        if p is None:
            continue
        if p.per_model:
            slots += [(f"{method}/{name}/m{i}", name, i) for i in range(len(spec.models))]
        else:
            slots.append((f"{method}/{name}", name, None))
    return slots


def _value_names(spec: SearchSpec, prefix: str) -> list[tuple[str | None, list[str]]]:
    """[(filter or None for the rest, [names of its depth anchors])] for one slot."""
    scopes: list[str | None] = [*spec.filters, None]
    return [(f, [f"{prefix}/{f or 'rest'}/g{g}" for g in range(spec.layer_groups)]) for f in scopes]


def search_space(spec: SearchSpec) -> dict[str, list[float]]:
    """For the grid sampler: every optuna parameter name with its grid values."""
    space: dict[str, list[float]] = {}
    for method in spec.methods:
        for prefix, name, _ in _slots(spec, method):
            for _, names in _value_names(spec, prefix):
                for n in names:
                    space[n] = spec.parameters[name].grid()
    return space


def suggest_config(spec: SearchSpec, trial) -> MergeConfig:
    """Ask `trial` for every varied value and build the merge config it describes."""
    method = spec.methods[0] if len(spec.methods) == 1 else trial.suggest_categorical("method", spec.methods)
    values: dict[str, float] = {}
    for prefix, name, _ in _slots(spec, method):
        b = spec.parameters[name]
        for _, names in _value_names(spec, prefix):
            for n in names:
                values[n] = trial.suggest_float(n, b.low, b.high, log=b.log)
    return build_config(spec, method, values)


def build_config(spec: SearchSpec, method: str, values: dict[str, float]) -> MergeConfig:
    """The merge config for `method` with the varied values (optuna names -> numbers)."""

    def setting(prefix: str) -> Any:
        scopes = []
        for flt, names in _value_names(spec, prefix):
            anchors = [values[n] for n in names]
            value: Any = anchors[0] if len(anchors) == 1 else anchors
            scopes.append((flt, value))
        if len(scopes) == 1:
            return scopes[0][1]
        return [{"filter": f, "value": v} if f else {"value": v} for f, v in scopes]

    m = get_method(method)
    top: dict[str, Any] = {k: v for k, v in spec.fixed.items() if m.param(k) is not None and not m.param(k).per_model}
    per_model: list[dict[str, Any]] = [{k: v for k, v in spec.fixed.items() if m.param(k) is not None and m.param(k).per_model} for _ in spec.models]
    for prefix, name, i in _slots(spec, method):
        if i is None:
            top[name] = setting(prefix)
        else:
            per_model[i][name] = setting(prefix)
    config: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": ref, "parameters": params} if params else {"model": ref} for ref, params in zip(spec.models, per_model)],
        "random_seed": spec.random_seed,
    }
    if spec.base_model and m.base != "unused":
        config["base_model"] = spec.base_model
    if top:
        config["parameters"] = top
    if spec.dtype:
        config["dtype"] = spec.dtype
    return MergeConfig.model_validate(config)
