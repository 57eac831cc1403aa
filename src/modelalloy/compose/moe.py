"""Mixtures of experts from dense models (mergekit-moe's config, our checks): `build_moe`.

Attention, norms, embeddings and head come from `base_model`; each expert's MLP comes from its
`source_model`; a router (one row per expert, per layer) is initialised from prompts
(`compose/moe_router.py`). The config is read in `compose/moe_config.py`; the output's tensor
names follow the layout the installed transformers expects (`compose/moe_layout.py`). Outputs:

- ``mixtral`` (MixtralForCausalLM) from Llama/Mistral experts; routing weights of the top k are
  renormalised, so with identical experts the MoE computes exactly the dense model.
- ``qwen2_moe`` (Qwen2MoeForCausalLM) from Llama/Mistral/Qwen2 experts plus exactly one shared
  expert. Qwen2-MoE adds sigmoid(g·x)·shared(x) to the routed output; we set g = 0 (a fixed
  ½) and halve every routed expert's down_proj, with norm_topk_prob on, so the layer computes
  ½·routed + ½·shared: again exactly the dense model when all experts are the base's MLP.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from modelalloy import arch
from modelalloy.compose.moe_config import ARCHITECTURES, MoEConfig, load_moe_config
from modelalloy.compose.moe_layout import MLP_PARTS, expert_layout, mlp_name, moe_names
from modelalloy.compose.moe_router import compute_gates
from modelalloy.errors import ConfigError, PlanError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.opener import open_checkpoint
from modelalloy.io.output import copy_support_files
from modelalloy.io.writer import OutputTensor, ShardedWriter, parse_size, write_text_durably

_ACCEPTS = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("llama", "mistral", "qwen2")}


@dataclass
class MoEResult:
    out_dir: Path
    architecture: str
    layout: str  # "fused" (transformers ≥ 5) or "per_expert"
    tensors: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def build_moe(
    config: MoEConfig | str | Path,
    out_dir: str | Path,
    *,
    allow_same_experts: bool = False,
    layout: str | None = None,
    force: bool = False,
    max_shard_size: str = "5GB",
    progress: Callable[[str], None] | None = None,
) -> MoEResult:
    """Build a mixture of experts from dense models and write it to `out_dir` (a HF checkpoint).

    `allow_same_experts` lets every expert be the same model (useful only as a starting point for
    training, or to check that the MoE computes the dense model). `layout` overrides the detected
    expert layout ("fused" or "per_expert").
    """
    from modelalloy.engine import fresh_partial

    cfg = config if isinstance(config, MoEConfig) else load_moe_config(config)
    start = time.perf_counter()
    notes: list[str] = []
    with ExitStack() as stack:
        refs = [cfg.base_model] + [e.source_model for e in cfg.experts] + [e.source_model for e in cfg.shared_experts or []]
        models: dict[str, Checkpoint] = {}
        for ref in dict.fromkeys(refs):
            models[ref] = stack.enter_context(open_checkpoint(ref))
        base = models[cfg.base_model]
        architecture = _choose_architecture(cfg, base)
        _check_inputs(cfg, models, architecture, allow_same_experts, notes)
        layout = layout or expert_layout(architecture)
        n_layers = arch.num_layers(base.config, base.tensors)
        n_experts = len(cfg.experts)
        out_dtype = getattr(torch, cfg.dtype) if cfg.dtype else base.tensors[mlp_name(0, "up_proj")].dtype

        if progress:
            progress("router")
        gates = compute_gates(cfg, base, n_layers, notes)  # [layers, E, H], checked before writing

        specs: list[OutputTensor] = []
        plan: list[tuple[str, Callable[[], torch.Tensor]]] = []

        def add(name: str, shape, make: Callable[[], torch.Tensor], dtype=out_dtype) -> None:
            specs.append(OutputTensor(name, dtype, tuple(shape)))
            plan.append((name, make))

        def mlp(ref: str, layer: int, part: str, scale: float = 1.0) -> torch.Tensor:
            w = models[ref].read(mlp_name(layer, part))
            return w.to(out_dtype) if scale == 1.0 else (w.float() * scale).to(out_dtype)

        down_scale = [(e.residual_scale or 1.0) * (0.5 if architecture == "qwen2_moe" else 1.0) for e in cfg.experts]
        inter = base.tensors[mlp_name(0, "up_proj")].shape[0]
        hidden = base.tensors[mlp_name(0, "up_proj")].shape[1]
        for name in sorted(base.tensors, key=lambda n: (base.tensors[n].file, base.tensors[n].start)):
            layer = arch.layer_index(name)
            if layer is not None and ".mlp." in name:
                continue
            loc = base.tensors[name]
            dtype = out_dtype if loc.dtype.is_floating_point else loc.dtype
            add(name, loc.shape, lambda name=name, dtype=dtype: base.read(name).to(dtype), dtype)
        for layer in range(n_layers):
            names = moe_names(architecture, layout, layer, n_experts)
            add(names["gate"][0], (n_experts, hidden), lambda layer=layer: gates[layer].to(out_dtype))
            if layout == "fused":
                add(names["gate_up"][0], (n_experts, 2 * inter, hidden), lambda layer=layer: torch.stack(
                    [torch.cat([mlp(e.source_model, layer, "gate_proj"), mlp(e.source_model, layer, "up_proj")]) for e in cfg.experts]))
                add(names["down"][0], (n_experts, hidden, inter), lambda layer=layer: torch.stack(
                    [mlp(e.source_model, layer, "down_proj", s) for e, s in zip(cfg.experts, down_scale)]))
            else:
                for part in MLP_PARTS:
                    for i, (e, s) in enumerate(zip(cfg.experts, down_scale)):
                        shape = (hidden, inter) if part == "down_proj" else (inter, hidden)
                        scale = s if part == "down_proj" else 1.0
                        add(names[part][i], shape, lambda e=e, layer=layer, part=part, scale=scale: mlp(e.source_model, layer, part, scale))
            if architecture == "qwen2_moe":
                shared = cfg.shared_experts[0]
                prefix = f"model.layers.{layer}.mlp"
                for part in MLP_PARTS:
                    loc = models[shared.source_model].tensors[mlp_name(layer, part)]
                    scale = (shared.residual_scale or 1.0) if part == "down_proj" else 1.0
                    add(f"{prefix}.shared_expert.{part}.weight", loc.shape, lambda layer=layer, part=part, scale=scale: mlp(shared.source_model, layer, part, scale))
                # sigmoid(0) = 1/2: a fixed, input-independent half of the shared expert (see module doc)
                add(f"{prefix}.shared_expert_gate.weight", (1, hidden), lambda: torch.zeros(1, hidden, dtype=out_dtype))

        out_dir = Path(out_dir)
        total = sum(s.nbytes for s in specs)
        partial = fresh_partial(out_dir, models, total, force=force)
        writer = ShardedWriter(partial, specs, max_shard_size=parse_size(max_shard_size), metadata={"modelalloy_method": f"moe:{architecture}"})
        try:
            for name, make in plan:
                if progress:
                    progress(name)
                writer.write(name, make())
            writer.finalize()
        except BaseException:
            writer.abort()
            raise
        shared_inter = models[cfg.shared_experts[0].source_model].tensors[mlp_name(0, "up_proj")].shape[0] if architecture == "qwen2_moe" else None
        out_config = _output_config(cfg, base, architecture, out_dtype, shared_inter)
        write_text_durably(partial / "config.json", json.dumps(out_config, indent=2, sort_keys=True) + "\n")
        copy_support_files(base.path, partial)
        _write_card(partial, cfg, architecture)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return MoEResult(out_dir, architecture, layout, len(specs), time.perf_counter() - start, notes)


def _choose_architecture(cfg: MoEConfig, base: Checkpoint) -> str:
    shared = len(cfg.shared_experts or [])
    architecture = cfg.architecture or ("qwen2_moe" if shared else "mixtral")
    model_type = base.config.get("model_type")
    if model_type not in _ACCEPTS[architecture]:
        raise PlanError(f"{cfg.base_model} is a {model_type} model; a {architecture} MoE is built from {'/'.join(_ACCEPTS[architecture])} models")
    if architecture == "mixtral" and shared:
        raise ConfigError("shared_experts: Mixtral has no shared expert; use architecture: qwen2_moe, or drop shared_experts")
    if architecture == "qwen2_moe" and shared != 1:
        raise ConfigError(f"shared_experts: Qwen2-MoE needs exactly one shared expert, got {shared}")
    return architecture


def _check_inputs(cfg: MoEConfig, models: dict[str, Checkpoint], architecture: str, allow_same: bool, notes: list[str]) -> None:
    if len(cfg.experts) < 2:
        raise ConfigError(f"experts: a mixture needs at least 2 experts, got {len(cfg.experts)}")
    if not 1 <= cfg.experts_per_token <= len(cfg.experts):
        raise ConfigError(f"experts_per_token: {cfg.experts_per_token} must be between 1 and the number of experts ({len(cfg.experts)})")
    base = models[cfg.base_model]
    if base.config.get("attention_bias") or base.config.get("mlp_bias"):
        raise PlanError(f"{cfg.base_model} has attention or MLP biases, which {architecture} cannot hold")
    if architecture == "mixtral" and any(n.endswith("self_attn.q_proj.bias") for n in base.tensors):
        raise PlanError(f"{cfg.base_model} has q/k/v biases (Qwen2-style); Mixtral has none: use architecture: qwen2_moe")
    n_layers = arch.num_layers(base.config, base.tensors)
    for e in [*cfg.experts, *(cfg.shared_experts or [])]:
        m = models[e.source_model]
        if m.config.get("model_type") not in _ACCEPTS[architecture]:
            raise PlanError(f"expert {e.source_model} is a {m.config.get('model_type')} model; {architecture} takes {'/'.join(_ACCEPTS[architecture])}")
        if arch.num_layers(m.config, m.tensors) != n_layers:
            raise PlanError(f"expert {e.source_model} has {arch.num_layers(m.config, m.tensors)} layers but the base has {n_layers}")
        for layer in range(n_layers):
            for part in MLP_PARTS:
                name = mlp_name(layer, part)
                if name not in m.tensors:
                    raise PlanError(f"expert {e.source_model} has no tensor {name!r}; experts must be Llama-style MLPs (gate/up/down_proj)")
                if name in base.tensors and m.tensors[name].shape != base.tensors[name].shape and e in cfg.experts:
                    raise PlanError(f"tensor {name!r}: shape {list(m.tensors[name].shape)} in expert {e.source_model} but {list(base.tensors[name].shape)} in the base")
            if m.tensors[mlp_name(layer, "up_proj")].shape[1] != base.tensors[mlp_name(layer, "up_proj")].shape[1]:
                raise PlanError(f"expert {e.source_model} has another hidden size than the base")
    sources = [str(models[e.source_model].path.resolve()) + "+" + e.source_model.partition("+")[2] for e in cfg.experts]
    if len(set(sources)) == 1 and not allow_same:
        raise ConfigError(
            "every expert is the same model: the mixture would compute the dense model at E times the size; "
            "pass --i-understand-this-is-not-useful-without-training to build it anyway"
        )
    if cfg.gate_mode in ("hidden", "hidden_avg", "cheap_embed"):
        for i, e in enumerate(cfg.experts):
            if not e.positive_prompts:
                raise ConfigError(f"experts[{i}] ({e.source_model}): gate_mode {cfg.gate_mode} needs positive_prompts; add some, or use gate_mode: random")
        prompt_sets = {(tuple(sorted(e.positive_prompts)), tuple(sorted(e.negative_prompts))) for e in cfg.experts}
        if len(prompt_sets) == 1:
            raise ConfigError("experts: every expert has the same prompts, so the router could not tell them apart; give each expert prompts of its own kind")
    if len(cfg.experts) & (len(cfg.experts) - 1):
        notes.append(f"{len(cfg.experts)} experts is not a power of two; some runtimes (llama.cpp) expect one")


def _output_config(cfg: MoEConfig, base: Checkpoint, architecture: str, dtype: torch.dtype, shared_inter: int | None) -> dict:
    import transformers

    src = dict(base.config)
    for key in ("architectures", "model_type", "transformers_version", "attention_bias", "mlp_bias", "pretraining_tp", "auto_map", "quantization_config"):
        src.pop(key, None)
    src["dtype"] = str(dtype).removeprefix("torch.")
    src.pop("torch_dtype", None)
    if architecture == "mixtral":
        src.update(num_local_experts=len(cfg.experts), num_experts_per_tok=cfg.experts_per_token)
        if base.config.get("model_type") != "mistral":
            src["sliding_window"] = None
        out = transformers.MixtralConfig(**src)
    else:
        inter = base.tensors[mlp_name(0, "up_proj")].shape[0]
        src.update(
            num_experts=len(cfg.experts),
            num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=inter,
            shared_expert_intermediate_size=shared_inter,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=any(n.endswith("self_attn.q_proj.bias") for n in base.tensors),
        )
        out = transformers.Qwen2MoeConfig(**src)
    result = out.to_dict()
    result["architectures"] = [ARCHITECTURES[architecture]]
    return result


def _write_card(out_dir: Path, cfg: MoEConfig, architecture: str) -> None:
    text = "\n".join(
        [
            "---",
            yaml.safe_dump({"library_name": "transformers", "tags": ["moe", "merge", "modelalloy"]}, sort_keys=False).strip(),
            "---",
            "",
            "# Mixture of experts",
            "",
            f"Built with [modelalloy](https://pypi.org/project/modelalloy/) `alloy moe` as {ARCHITECTURES[architecture]}: "
            f"attention, norms and embeddings from `{cfg.base_model}`, one expert MLP per source model, "
            f"router initialised with gate_mode `{cfg.gate_mode}`. Untrained routers: fine-tune before serious use.",
            "",
            "```yaml",
            yaml.safe_dump(cfg.model_dump(exclude_defaults=True), sort_keys=False).strip(),
            "```",
            "",
        ]
    )
    write_text_durably(out_dir / "README.md", text)
