"""The library's front door: `merge`, `plan_merge` and `plan_summary`, what `alloy merge` and `alloy plan` call."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

from modelalloy.config import MergeConfig, load_config
from modelalloy.engine import MergeOptions, MergeResult, Progress, execute
from modelalloy.errors import ConfigError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.opener import open_checkpoint
from modelalloy.io.stats_file import open_stats
from modelalloy.plan import Plan, make_plan


def as_config(config: str | Path | MergeConfig) -> MergeConfig:
    """A config object, or the one a YAML file at that path holds."""
    return config if isinstance(config, MergeConfig) else load_config(config)


def open_models(config: MergeConfig, *, allow_pickle: bool = False, stack: ExitStack | None = None) -> dict[str, Checkpoint]:
    """Open every model the config names (headers only), each once, and their statistics files.

    A statistics file (a model's ``stats:``) is opened like a model and keyed by its path as
    written, so that plan and execute read it through the same mapping.
    """
    models = {}
    for ref in config.all_model_refs():
        ckpt = open_checkpoint(ref, allow_pickle=allow_pickle)
        if stack is not None:
            stack.enter_context(ckpt)
        models[ref] = ckpt
    refs = set(models)
    for m in config.models or []:
        if m.stats in refs:
            raise ConfigError(f"models ({m.model}): stats {m.stats!r} is a model; give the file `alloy stats` wrote")
        if m.stats is None or m.stats in models:
            continue
        stats = open_stats(m.stats)
        if stack is not None:
            stack.enter_context(stats)
        models[m.stats] = stats
    return models


def plan_merge(config: str | Path | MergeConfig, *, options: MergeOptions = MergeOptions()) -> tuple[Plan, dict[str, Checkpoint]]:
    """Everything `merge` checks, without computing or writing; returns the plan and open models."""
    cfg = as_config(config)
    models = open_models(cfg, allow_pickle=options.allow_pickle)
    return make_plan(cfg, models, allow_crimes=options.allow_crimes), models


def plan_summary(plan: Plan, models: Mapping[str, Checkpoint], *, threads: int, tensors: bool = False) -> dict:
    """What `alloy plan` reports: method, models, sizes, the peak-RAM estimate for `threads`, notes;
    the vocabulary report when tokenizers are aligned, and with `tensors` every output tensor's recipe."""
    summary = {
        "method": plan.method.name,
        "models": list(models),
        "base_model": plan.config.base_model,
        "tensors": len(plan.recipes),
        "output_bytes": plan.output_bytes,
        "input_bytes": plan.input_bytes(models),
        "peak_memory_bytes": plan.peak_memory_estimate(threads),
        "layers": plan.output_config.get("num_hidden_layers", plan.output_config.get("n_layer")),
        "notes": plan.notes,
    }
    if plan.vocab is not None:
        summary["vocabulary"] = plan.vocab.report
    if tensors:
        summary["recipes"] = [
            {"name": r.name, "method": r.method, "inputs": [f"{s.model}:{s.tensor}" for s in r.sources()], "shape": list(r.shape), "dtype": str(r.out_dtype).removeprefix("torch."), "params": r.params}
            for r in plan.recipes
        ]
    return summary


def merge(
    config: str | Path | MergeConfig,
    out_dir: str | Path,
    *,
    options: MergeOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
    **option_fields,
) -> MergeResult:
    """Merge the models a mergekit-style config describes into the HF checkpoint `out_dir`.

    Options can be given as a `MergeOptions` or as its fields: ``merge(cfg, out, threads=1)``.

    Example:
        >>> import modelalloy
        >>> modelalloy.merge("merge.yaml", "./merged")  # doctest: +SKIP
    """
    opts = options or MergeOptions(**option_fields)
    cfg = as_config(config)
    with ExitStack() as stack:
        models = open_models(cfg, allow_pickle=opts.allow_pickle, stack=stack)
        plan = make_plan(cfg, models, allow_crimes=opts.allow_crimes)
        return execute(plan, models, out_dir, options=opts, progress=progress)
