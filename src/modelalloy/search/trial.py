"""One search trial: merge in memory into a model that stays loaded, then score it.

Trials differ only in their parameters, so everything else is done once per worker: the input
checkpoints are opened once and each input tensor is read from disk once (kept in memory, in
its stored dtype), and one transformers model is built once; each trial computes the merged
tensors with the same per-tensor code as `alloy merge` (`engine.merge_tensor`) and loads them
into that model's parameters. No file is written.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from modelalloy.config import MergeConfig
from modelalloy.errors import ConfigError
from modelalloy.engine import merge_tensor, resolve_device
from modelalloy.io.opener import open_checkpoint
from modelalloy.methods.task_vectors import FAMILY
from modelalloy.plan import make_plan

_TASK_VECTOR_METHODS = frozenset(row.name for row in FAMILY)


class TrialEvaluator:
    """Holds the inputs, one model and the eval sets of a search; `scores(config)` runs a trial."""

    def __init__(self, refs: Sequence[str], eval_sets, *, device: str = "cpu", cache_inputs: bool = True):
        self.checkpoints = {ref: open_checkpoint(ref) for ref in dict.fromkeys(refs)}
        self.sets = {s.name: s for s in eval_sets}
        self.device = resolve_device(device)
        self.cache_inputs = cache_inputs
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()
        self._equal_base: dict[tuple, bool] = {}
        self.model = None
        self.tokenizer = None

    def _read(self, model: str, tensor: str) -> torch.Tensor:
        key = (model, tensor)
        if not self.cache_inputs:
            return self.checkpoints[model].read(tensor)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self.checkpoints[model].read(tensor)
            return self._cache[key]

    def merged_state(self, config: MergeConfig) -> tuple[dict[str, torch.Tensor], object]:
        plan = make_plan(config, self.checkpoints)
        state = {r.name: self._unchanged(r, plan) if self._all_equal_base(r) else merge_tensor(r, self._read, plan, self.device) for r in plan.recipes}
        return state, plan

    def _all_equal_base(self, recipe) -> bool:
        """True when a task-vector method would add only zero task vectors to the base.

        Fine-tunes often leave most tensors untouched (frozen layers, embeddings); for them the
        merge is the base whatever the parameters (θ_0 + Σ w_i·0, the divisor guarded against
        zero), so a trial skips the work. Checked once per tensor, only when inputs are kept.
        """
        if not self.cache_inputs or recipe.method not in _TASK_VECTOR_METHODS or recipe.base is None or recipe.stats or recipe.aligned:
            return False
        key = (recipe.base.model, recipe.base.tensor, tuple((s.model, s.tensor) for s in recipe.inputs))
        if key not in self._equal_base:
            base = self._read(recipe.base.model, recipe.base.tensor)
            self._equal_base[key] = all(torch.equal(self._read(s.model, s.tensor), base) for s in recipe.inputs)
        return self._equal_base[key]

    def _unchanged(self, recipe, plan) -> torch.Tensor:
        """The base tensor through the same dtype steps as `merge_tensor` (θ_0 + 0 is θ_0)."""
        x = self._read(recipe.base.model, recipe.base.tensor)
        if plan.input_dtype is not None and x.dtype.is_floating_point:
            x = x.to(plan.input_dtype)
        return x.to(dtype=plan.compute_dtype).to(recipe.out_dtype)

    def load(self, config: MergeConfig):
        """The merged model of `config`, in the one model instance this evaluator keeps."""
        import transformers

        state, plan = self.merged_state(config)
        if self.model is None:
            hf_config = transformers.AutoConfig.for_model(**plan.output_config)
            self.model = transformers.AutoModelForCausalLM.from_config(hf_config)
            self.model.eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.checkpoints[plan.donor].path)
        result = self.model.load_state_dict(state, strict=False)
        self.model.tie_weights()
        stored = set(state)
        missing = [n for n in result.missing_keys if n not in stored and not _is_tied(self.model, n)]
        if missing or result.unexpected_keys:
            raise ConfigError(f"a searched config does not fill the model: missing {missing[:1]}, unexpected {result.unexpected_keys[:1]}")
        return self.model

    def scores(self, config: MergeConfig, set_names: Sequence[str]) -> dict[str, dict]:
        from modelalloy.evaluate.runner import score

        model = self.load(config)
        with torch.no_grad():
            return {name: score(model, self.tokenizer, self.sets[name]) for name in set_names}


def _is_tied(model, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(p is target for n, p in params.items() if n != name)


def objective_values(scores: dict[str, dict], search_sets: Sequence[str], higher_is_better: dict[str, bool], pareto: bool) -> list[float]:
    """Pareto: each search set's score. Otherwise one loss to minimise: the mean over sets of
    log(perplexity) or 1 − accuracy, so that no set dominates by its scale."""
    if pareto:
        return [float(scores[s]["score"]) for s in search_sets]
    losses = []
    for s in search_sets:
        value = float(scores[s]["score"])
        losses.append(1.0 - value if higher_is_better[s] else math.log(value))
    return [sum(losses) / len(losses)]
