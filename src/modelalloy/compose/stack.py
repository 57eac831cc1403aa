"""Layer stacking (depth up-scaling, progressive stacking) and grafting, compiled to merge plans.

Stacking is a shortcut for mergekit's passthrough slices. From one model of n layers:

- ``layer_ranges: [[0, 24], [8, 32]]``: the ranges, concatenated (a frankenmerge of one model);
- ``depth_upscale: {overlap: k}``: SOLAR's depth up-scaling (Kim et al. 2023,
  https://arxiv.org/abs/2312.15166): layers [0, n−k) followed by [k, n), 2(n−k) layers;
- ``progressive: {copies: c}``: the whole stack c times over (Gong et al. 2019, progressive
  stacking, http://proceedings.mlr.press/v97/gong19a.html);
- ``interleave: {copies: c}``: every layer c times in a row (0, 0, 1, 1, …).

``repeated_scale: s`` multiplies the output projections (``scale_filter``, by default attention
``o_proj`` / MLP ``down_proj``, and GPT-2's ``c_proj``, biases included) of every repeated copy of a
layer (the second and later occurrences). With s = 0 a repeated layer adds nothing to the residual
stream, so the stacked model starts out computing exactly the original (LLaMA Pro's identity
initialisation, https://arxiv.org/abs/2401.02415); s = 0.5 is a common damping.

Grafting takes the tensors a filter selects (substrings of the name, optionally only in a range of
layers) from a donor and everything else from a recipient; every grafted tensor must exist in
the donor with the recipient's shape.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelalloy import arch
from modelalloy.config import MergeConfig, read_yaml_file, validation_line
from modelalloy.errors import ConfigError, PlanError
from modelalloy.io.opener import open_checkpoint

DEFAULT_SCALE_FILTER = ("o_proj", "down_proj", "c_proj")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Overlap(_Strict):
    overlap: int = Field(ge=1)


class Copies(_Strict):
    copies: int = Field(ge=2)


class StackConfig(_Strict):
    """One model stacked on itself; exactly one of layer_ranges, depth_upscale, progressive, interleave."""

    model: str
    layer_ranges: list[tuple[int, int]] | None = None
    depth_upscale: Overlap | None = None
    progressive: Copies | None = None
    interleave: Copies | None = None
    repeated_scale: float | None = None
    scale_filter: list[str] = Field(default_factory=lambda: list(DEFAULT_SCALE_FILTER))
    dtype: str | None = None
    out_dtype: str | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> StackConfig:
        given = [k for k in ("layer_ranges", "depth_upscale", "progressive", "interleave") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of layer_ranges, depth_upscale, progressive or interleave" + (f" (found {', '.join(given)})" if given else ""))
        if not self.scale_filter:
            raise ValueError("scale_filter is empty; leave it out for the default (o_proj, down_proj, c_proj)")
        return self


def load_stack_config(path: str | Path) -> StackConfig:
    path = Path(path)
    data = read_yaml_file(path, "stack config")
    return parse_stack_config(data, source=str(path))


def parse_stack_config(data: Any, *, source: str = "<stack config>") -> StackConfig:
    if isinstance(data, dict) and set(data) == {"stack"}:
        data = data["stack"]
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a stack config is a mapping with model and one of layer_ranges, depth_upscale, progressive, interleave")
    try:
        return StackConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_line(e, source, lambda loc: StackConfig.model_fields)) from None


def stack_layers(cfg: StackConfig, n_layers: int) -> list[int]:
    """The source layer of every output layer, in order."""
    if cfg.layer_ranges is not None:
        order: list[int] = []
        for i, (start, end) in enumerate(cfg.layer_ranges):
            if not 0 <= start < end <= n_layers:
                raise ConfigError(f"layer_ranges[{i}]: [{start}, {end}) must satisfy 0 <= start < end <= {n_layers} (the model's layers)")
            order += range(start, end)
        return order
    if cfg.depth_upscale is not None:
        k = cfg.depth_upscale.overlap
        if not 0 < k < n_layers:
            raise ConfigError(f"depth_upscale.overlap {k}: must be between 1 and {n_layers - 1} for a {n_layers}-layer model")
        return list(range(0, n_layers - k)) + list(range(k, n_layers))
    if cfg.progressive is not None:
        return list(range(n_layers)) * cfg.progressive.copies
    assert cfg.interleave is not None
    return [i for i in range(n_layers) for _ in range(cfg.interleave.copies)]


def compile_stack(cfg: StackConfig, n_layers: int) -> MergeConfig:
    """The passthrough-slices merge config the stack stands for (mergekit runs it unchanged)."""
    order = stack_layers(cfg, n_layers)
    seen: set[int] = set()
    runs: list[tuple[int, int, bool]] = []  # (start, end, repeated) of consecutive source layers
    scaling = cfg.repeated_scale is not None and cfg.repeated_scale != 1.0
    for layer in order:
        repeated = scaling and layer in seen  # split runs at repeats only when they are scaled
        seen.add(layer)
        if runs and runs[-1][1] == layer and runs[-1][2] == repeated:
            runs[-1] = (runs[-1][0], layer + 1, repeated)
        else:
            runs.append((layer, layer + 1, repeated))
    slices = []
    for start, end, repeated in runs:
        source: dict[str, Any] = {"model": cfg.model, "layer_range": [start, end]}
        if repeated:
            source["parameters"] = {"scale": [{"filter": f, "value": cfg.repeated_scale} for f in cfg.scale_filter]}
        slices.append({"sources": [source]})
    spec: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if cfg.dtype:
        spec["dtype"] = cfg.dtype
    if cfg.out_dtype:
        spec["out_dtype"] = cfg.out_dtype
    try:
        return MergeConfig.model_validate(spec)
    except ValidationError as e:
        raise ConfigError(f"stack: {e.errors()[0]['msg']}") from None


def stack(cfg: StackConfig | str | Path, out_dir: str | Path, **options):
    """Compile a stack config and run it as a passthrough merge; returns the `MergeResult`."""
    from modelalloy.api import merge

    return merge(compiled_stack(cfg), out_dir, **options)


def compiled_stack(cfg: StackConfig | str | Path) -> MergeConfig:
    cfg = cfg if isinstance(cfg, StackConfig) else load_stack_config(cfg)
    with open_checkpoint(cfg.model) as ckpt:
        n = arch.num_layers(ckpt.config, ckpt.tensors)
    return compile_stack(cfg, n)


def _selected(name: str, modules: list[str], layers: tuple[int, int] | None) -> bool:
    if not any(m in name for m in modules):
        return False
    if layers is None:
        return True
    layer = arch.layer_index(name)
    return layer is not None and layers[0] <= layer < layers[1]


def graft_plan(recipient: str, donor: str, checkpoints, *, modules: list[str], layers: tuple[int, int] | None = None):
    """A passthrough plan of `recipient` whose selected tensors are read from `donor` instead."""
    from modelalloy.plan import TensorSource, make_plan

    if not modules or not all(modules):
        raise ConfigError("--module: give at least one non-empty name fragment to graft (e.g. mlp, self_attn, layers.3.)")
    if layers is not None and not 0 <= layers[0] < layers[1]:
        raise ConfigError(f"--layers {layers[0]}-{layers[1]}: write START-END with START < END (END excluded)")
    if recipient == donor:
        raise ConfigError("the donor and the recipient are the same model; grafting would change nothing")
    config = MergeConfig(merge_method="passthrough", models=[{"model": recipient}])
    plan = make_plan(config, {recipient: checkpoints[recipient]})
    donor_tensors = checkpoints[donor].tensors
    grafted = 0
    recipes = []
    for r in plan.recipes:
        if _selected(r.name, modules, layers):
            loc = donor_tensors.get(r.name)
            if loc is None:
                raise PlanError(f"tensor {r.name!r} is selected for grafting but missing from the donor {donor}; narrow --module or --layers")
            if tuple(loc.shape) != tuple(r.shape):
                raise PlanError(f"tensor {r.name!r}: shape {list(loc.shape)} in the donor {donor} but {list(r.shape)} in the recipient {recipient}; these modules cannot be grafted")
            r = dataclasses.replace(r, inputs=(TensorSource(donor, r.name),))
            grafted += 1
        recipes.append(r)
    if not grafted:
        where = f" in layers [{layers[0]}, {layers[1]})" if layers else ""
        raise PlanError(f"no tensor of {recipient} matches --module {', '.join(modules)}{where}; nothing to graft")
    if layers is not None and layers[1] > arch.num_layers(checkpoints[recipient].config, checkpoints[recipient].tensors):
        raise ConfigError(f"--layers {layers[0]}-{layers[1]}: {recipient} has only {arch.num_layers(checkpoints[recipient].config, checkpoints[recipient].tensors)} layers")
    plan.recipes = recipes
    plan.notes.append(f"grafted {grafted} tensors from {donor}")
    return plan


def graft(recipient: str, donor: str, out_dir: str | Path, *, modules: list[str], layers: tuple[int, int] | None = None, **options):
    """Write `recipient` with the selected modules taken from `donor` (shapes checked first)."""
    from modelalloy.engine import MergeOptions, execute

    opts = MergeOptions(**options)
    with ExitStack() as stack_:
        checkpoints = {ref: stack_.enter_context(open_checkpoint(ref, allow_pickle=opts.allow_pickle)) for ref in (recipient, donor)}
        plan = graft_plan(recipient, donor, checkpoints, modules=modules, layers=layers)
        return execute(plan, checkpoints, out_dir, options=opts)
