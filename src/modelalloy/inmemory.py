"""Merging into memory instead of onto disk: for evaluating a config, or a search trial, cheaply.

`merge_state_dict` runs the same plan and the same per-tensor code (`engine.merge_tensor`) as
`merge`, so the tensors are bit-identical to what `alloy merge` writes; `load_merged_model` puts
them into a transformers model without a file in between. Memory: the whole merged model is held,
so it must fit in RAM (checked before any tensor is read).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import psutil
import torch

from modelalloy.api import as_config, open_models
from modelalloy.config import MergeConfig
from modelalloy.errors import OutputError
from modelalloy.engine import MergeOptions, merge_tensor, resolve_device
from modelalloy.plan import Plan, make_plan


def merge_state_dict(
    config: str | Path | MergeConfig,
    *,
    options: MergeOptions = MergeOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], Plan, dict[str, Path]]:
    """The merged tensors as a state dict; also the plan and each input model's directory."""
    cfg = as_config(config)
    device = resolve_device(options.device)
    with ExitStack() as stack:
        models = open_models(cfg, allow_pickle=options.allow_pickle, stack=stack)
        plan = make_plan(cfg, models, allow_crimes=options.allow_crimes)
        free = psutil.virtual_memory().available
        if plan.output_bytes + plan.peak_memory_estimate(1, streaming=False) > free:
            raise OutputError(
                f"the merged model needs {plan.output_bytes / 1e9:.2f} GB of RAM but only {free / 1e9:.2f} GB is free; "
                "merge it to disk with `alloy merge` and evaluate that directory instead"
            )
        state: dict[str, torch.Tensor] = {}
        for i, recipe in enumerate(plan.recipes):
            state[recipe.name] = merge_tensor(recipe, lambda m, t: models[m].read(t), plan, device)
            if progress is not None:
                progress(i + 1, len(plan.recipes))
        paths = {ref: ckpt.path for ref, ckpt in models.items()}
    return state, plan, paths


def load_merged_model(
    config: str | Path | MergeConfig,
    *,
    options: MergeOptions = MergeOptions(),
    progress: Callable[[int, int], None] | None = None,
    model_class=None,
):
    """A transformers model holding the merge of `config`, built in memory; also the donor's directory.

    The donor (the model whose config.json and tokenizer `alloy merge` would copy) is where the
    tokenizer lives. `model_class` defaults to the one the donor's architecture names
    (`model_class_for`).
    """
    import transformers

    state, plan, paths = merge_state_dict(config, options=options, progress=progress)
    hf_config = transformers.AutoConfig.for_model(**plan.output_config)
    cls = model_class or model_class_for(plan.output_config)
    with _no_init_weights():  # the random init of weights we are about to replace is wasted time
        model = cls.from_config(hf_config)
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()  # a tied head shares the embedding's storage and is not stored on its own
    loaded = {model.get_parameter(n).data_ptr() for n in state if _is_parameter(model, n)}
    missing = [n for n in result.missing_keys if not (_is_parameter(model, n) and model.get_parameter(n).data_ptr() in loaded)]
    if missing:
        raise OutputError(f"the merged state has no tensor for {missing[0]} ({len(missing)} missing); the config does not produce a whole model")
    if result.unexpected_keys:
        raise OutputError(f"the merged tensor {result.unexpected_keys[0]} has no place in a {hf_config.model_type} model ({len(result.unexpected_keys)} such)")
    model.eval()
    return model, paths[plan.donor]


def model_class_for(config: dict):
    """The transformers auto class for a config.json: a sequence classifier when its architecture
    says so (`*ForSequenceClassification`), else a causal LM."""
    import transformers

    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ()):
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def _is_parameter(model, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def _no_init_weights():
    """transformers' context that skips weight init (its home moved between versions)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
