"""Mixtures of experts from dense models (mergekit-moe's config, our checks).

Attention, norms, embeddings and head come from `base_model`; each expert's MLP comes from its
`source_model`; a router (one row per expert, per layer) is initialised from prompts:

- ``hidden``: run the base on each expert's positive prompts and take, per layer, the input of
  the MLP (the vector the router will see) at the last token; average over prompts, subtract the
  same average over the negative prompts, L2-normalise. mergekit takes the layer's *input*
  hidden state instead, before attention and the norm; ours is what the router multiplies.
- ``hidden_avg``: the same, averaged over all tokens of each prompt instead of the last one.
- ``cheap_embed``: the normalised sum of the prompts' token embeddings, the same for every layer.
- ``random`` (N(0, 1)) and ``uniform_random`` (U(±1/√hidden), nn.Linear's init), seeded.

Outputs, in the layout the installed transformers expects (transformers ≥ 5 fuses the experts
into ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]; older versions name
each expert's ``w1/w3/w2`` or ``gate_proj/up_proj/down_proj``), found by building the target
class on the meta device:

- ``mixtral`` (MixtralForCausalLM) from Llama/Mistral experts; routing weights of the top k are
  renormalised, so with identical experts the MoE computes exactly the dense model.
- ``qwen2_moe`` (Qwen2MoeForCausalLM) from Llama/Mistral/Qwen2 experts plus exactly one shared
  expert. Qwen2-MoE adds sigmoid(g·x)·shared(x) to the routed output; we set g = 0 (a fixed
  ½) and halve every routed expert's down_proj, with norm_topk_prob on, so the layer computes
  ½·routed + ½·shared: again exactly the dense model when all experts are the base's MLP.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modelalloy import arch
from modelalloy.config import DTYPE_NAMES, read_yaml_file, validation_line
from modelalloy.errors import ConfigError, PlanError, did_you_mean
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.opener import open_checkpoint
from modelalloy.io.output import copy_support_files
from modelalloy.io.writer import OutputTensor, ShardedWriter, parse_size, write_text_durably

GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
_ACCEPTS = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("llama", "mistral", "qwen2")}
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
# How far from orthogonal the router rows may be before we warn (mergekit warns above 5 too).
_MAX_CONDITION = 5.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expert(_Strict):
    source_model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    residual_scale: float | None = None  # multiplies this expert's down_proj
    noise_scale: float | None = None

    @field_validator("noise_scale")
    @classmethod
    def _no_noise(cls, v):
        if v is not None:
            raise ValueError("noise_scale is not supported; leave it out")
        return v


class MoEConfig(_Strict):
    """mergekit-moe's YAML schema (plus `random_seed`)."""

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    dtype: str | None = None
    random_seed: int = 0

    @field_validator("gate_mode")
    @classmethod
    def _gate(cls, v: str) -> str:
        if v not in GATE_MODES:
            raise ValueError(f"gate_mode {v!r} is not one of {', '.join(GATE_MODES)}{did_you_mean(v, GATE_MODES)}")
        return v

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name = {"qwen": "qwen2_moe", "qwen2": "qwen2_moe"}.get(v.lower(), v.lower())
        if name not in ARCHITECTURES:
            raise ValueError(f"architecture {v!r} is not one of {', '.join(ARCHITECTURES)}{did_you_mean(v, ARCHITECTURES)}")
        return name

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v.removeprefix("torch.") not in DTYPE_NAMES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPE_NAMES)}")
        return None if v is None else v.removeprefix("torch.")


def load_moe_config(path: str | Path) -> MoEConfig:
    path = Path(path)
    data = read_yaml_file(path, "MoE config")
    return parse_moe_config(data, source=str(path))


def parse_moe_config(data, *, source: str = "<moe config>") -> MoEConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an MoE config is a mapping with base_model and experts")
    try:
        return MoEConfig.model_validate(data)
    except ValidationError as e:
        fields = lambda loc: Expert.model_fields if len(loc) > 1 else MoEConfig.model_fields  # noqa: E731
        raise ConfigError(validation_line(e, source, fields)) from None


@dataclass
class MoEResult:
    out_dir: Path
    architecture: str
    layout: str  # "fused" (transformers ≥ 5) or "per_expert"
    tensors: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def expert_layout(architecture: str) -> str:
    """'fused' when the installed transformers stores experts as 3-D tensors, else 'per_expert'."""
    import transformers

    cls = getattr(transformers, ARCHITECTURES[architecture])
    tiny = dict(hidden_size=8, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, vocab_size=8)
    if architecture == "mixtral":
        cfg = transformers.MixtralConfig(**tiny, num_local_experts=2)
    else:
        cfg = transformers.Qwen2MoeConfig(**tiny, num_experts=2, moe_intermediate_size=8, shared_expert_intermediate_size=8)
    with torch.device("meta"):
        keys = cls(cfg).state_dict().keys()
    return "fused" if any(k.endswith("experts.gate_up_proj") for k in keys) else "per_expert"


def _mlp_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.{part}.weight"


def _moe_names(architecture: str, layout: str, layer: int, n_experts: int) -> dict[str, list[str]]:
    """Output tensor names of one layer's router and experts, for the given layout."""
    if layout == "fused":
        prefix = f"model.layers.{layer}.mlp"
        return {"gate": [f"{prefix}.gate.weight"], "gate_up": [f"{prefix}.experts.gate_up_proj"], "down": [f"{prefix}.experts.down_proj"]}
    if architecture == "mixtral":
        prefix = f"model.layers.{layer}.block_sparse_moe"
        return {
            "gate": [f"{prefix}.gate.weight"],
            "gate_proj": [f"{prefix}.experts.{e}.w1.weight" for e in range(n_experts)],
            "up_proj": [f"{prefix}.experts.{e}.w3.weight" for e in range(n_experts)],
            "down_proj": [f"{prefix}.experts.{e}.w2.weight" for e in range(n_experts)],
        }
    prefix = f"model.layers.{layer}.mlp"
    return {
        "gate": [f"{prefix}.gate.weight"],
        **{part: [f"{prefix}.experts.{e}.{part}.weight" for e in range(n_experts)] for part in _MLP_PARTS},
    }


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
        out_dtype = getattr(torch, cfg.dtype) if cfg.dtype else base.tensors[_mlp_name(0, "up_proj")].dtype

        if progress:
            progress("router")
        gates = compute_gates(cfg, base, n_layers, notes)  # [layers, E, H], checked before writing

        specs: list[OutputTensor] = []
        plan: list[tuple[str, Callable[[], torch.Tensor]]] = []

        def add(name: str, shape, make: Callable[[], torch.Tensor], dtype=out_dtype) -> None:
            specs.append(OutputTensor(name, dtype, tuple(shape)))
            plan.append((name, make))

        def mlp(ref: str, layer: int, part: str, scale: float = 1.0) -> torch.Tensor:
            w = models[ref].read(_mlp_name(layer, part))
            return w.to(out_dtype) if scale == 1.0 else (w.float() * scale).to(out_dtype)

        down_scale = [(e.residual_scale or 1.0) * (0.5 if architecture == "qwen2_moe" else 1.0) for e in cfg.experts]
        inter = base.tensors[_mlp_name(0, "up_proj")].shape[0]
        hidden = base.tensors[_mlp_name(0, "up_proj")].shape[1]
        for name in sorted(base.tensors, key=lambda n: (base.tensors[n].file, base.tensors[n].start)):
            layer = arch.layer_index(name)
            if layer is not None and ".mlp." in name:
                continue
            loc = base.tensors[name]
            dtype = out_dtype if loc.dtype.is_floating_point else loc.dtype
            add(name, loc.shape, lambda name=name, dtype=dtype: base.read(name).to(dtype), dtype)
        for layer in range(n_layers):
            names = _moe_names(architecture, layout, layer, n_experts)
            add(names["gate"][0], (n_experts, hidden), lambda layer=layer: gates[layer].to(out_dtype))
            if layout == "fused":
                add(names["gate_up"][0], (n_experts, 2 * inter, hidden), lambda layer=layer: torch.stack(
                    [torch.cat([mlp(e.source_model, layer, "gate_proj"), mlp(e.source_model, layer, "up_proj")]) for e in cfg.experts]))
                add(names["down"][0], (n_experts, hidden, inter), lambda layer=layer: torch.stack(
                    [mlp(e.source_model, layer, "down_proj", s) for e, s in zip(cfg.experts, down_scale)]))
            else:
                for part in _MLP_PARTS:
                    for i, (e, s) in enumerate(zip(cfg.experts, down_scale)):
                        shape = (hidden, inter) if part == "down_proj" else (inter, hidden)
                        scale = s if part == "down_proj" else 1.0
                        add(names[part][i], shape, lambda e=e, layer=layer, part=part, scale=scale: mlp(e.source_model, layer, part, scale))
            if architecture == "qwen2_moe":
                shared = cfg.shared_experts[0]
                prefix = f"model.layers.{layer}.mlp"
                for part in _MLP_PARTS:
                    loc = models[shared.source_model].tensors[_mlp_name(layer, part)]
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
        shared_inter = models[cfg.shared_experts[0].source_model].tensors[_mlp_name(0, "up_proj")].shape[0] if architecture == "qwen2_moe" else None
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
            for part in _MLP_PARTS:
                name = _mlp_name(layer, part)
                if name not in m.tensors:
                    raise PlanError(f"expert {e.source_model} has no tensor {name!r}; experts must be Llama-style MLPs (gate/up/down_proj)")
                if name in base.tensors and m.tensors[name].shape != base.tensors[name].shape and e in cfg.experts:
                    raise PlanError(f"tensor {name!r}: shape {list(m.tensors[name].shape)} in expert {e.source_model} but {list(base.tensors[name].shape)} in the base")
            if m.tensors[_mlp_name(layer, "up_proj")].shape[1] != base.tensors[_mlp_name(layer, "up_proj")].shape[1]:
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


def compute_gates(cfg: MoEConfig, base: Checkpoint, n_layers: int, notes: list[str]) -> torch.Tensor:
    """Router weights [layers, experts, hidden] in float32, each row of unit length (or random)."""
    embed_name = next((n for n in base.tensors if n.endswith("embed_tokens.weight")), None)
    hidden = base.tensors[_mlp_name(0, "up_proj")].shape[1]
    n_experts = len(cfg.experts)
    if cfg.gate_mode in ("random", "uniform_random"):
        g = torch.Generator().manual_seed(cfg.random_seed)
        if cfg.gate_mode == "random":
            return torch.randn(n_layers, n_experts, hidden, generator=g)
        bound = 1 / math.sqrt(hidden)
        return (torch.rand(n_layers, n_experts, hidden, generator=g) * 2 - 1) * bound
    tokenizer = _tokenizer(cfg.base_model, base)
    if cfg.gate_mode == "cheap_embed":
        if embed_name is None:
            raise PlanError(f"{cfg.base_model}: no embed_tokens tensor for gate_mode cheap_embed")
        table = base.read(embed_name).float()

        def embed(prompts: list[str]) -> torch.Tensor:
            ids = [i for p in prompts for i in tokenizer(p, add_special_tokens=False)["input_ids"]]
            return table[ids].sum(0) if ids else torch.zeros(hidden)

        rows = [embed(e.positive_prompts) - embed(e.negative_prompts) for e in cfg.experts]
        gate = _normalise(torch.stack(rows), cfg)
        _condition_note(gate, "all layers", notes)
        return gate.expand(n_layers, -1, -1).clone()
    states = _mlp_inputs(base, tokenizer, cfg, n_layers)
    gates = []
    for layer in range(n_layers):
        rows = []
        for i, e in enumerate(cfg.experts):
            pos = states[layer][("pos", i)]
            neg = states[layer].get(("neg", i))
            rows.append(pos - neg if neg is not None else pos)
        gate = _normalise(torch.stack(rows), cfg)
        _condition_note(gate, f"layer {layer}", notes)
        gates.append(gate)
    return torch.stack(gates)


def _normalise(rows: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    norms = rows.norm(dim=-1, keepdim=True)
    for i, n in enumerate(norms[:, 0].tolist()):
        if not n > 1e-12:
            raise ConfigError(f"experts[{i}] ({cfg.experts[i].source_model}): its positive and negative prompts cancel out; the router row would be zero")
    return rows / norms


def _condition_note(gate: torch.Tensor, where: str, notes: list[str]) -> None:
    s = torch.linalg.svdvals(gate.double())
    cond = float(s[0] / s[-1]) if float(s[-1]) > 0 else math.inf
    if cond > _MAX_CONDITION and not any(n.startswith("router rows are nearly") for n in notes):
        notes.append(f"router rows are nearly parallel ({where}: condition number {cond:.1f}); the prompts may not separate the experts")


def _tokenizer(ref: str, base: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise PlanError(f"{ref}: cannot load its tokenizer ({str(e).splitlines()[0][:120]}); prompt-based gates need one, or use gate_mode: random") from None


def _mlp_inputs(base: Checkpoint, tokenizer, cfg: MoEConfig, n_layers: int) -> list[dict]:
    """Per layer: the mean MLP input over each expert's prompts (last token, or all tokens)."""
    from transformers import AutoModelForCausalLM

    if "+" in cfg.base_model and not Path(cfg.base_model).exists():
        raise ConfigError(f"base_model {cfg.base_model}: gate_mode {cfg.gate_mode} runs the base model, which cannot be a base+adapter reference; apply the adapter first (alloy lora apply)")
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    captured: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach())) for layer in layers]
    out: list[dict] = [{} for _ in range(n_layers)]
    try:
        for i, e in enumerate(cfg.experts):
            for kind, prompts in (("pos", e.positive_prompts), ("neg", e.negative_prompts)):
                if not prompts:
                    continue
                sums = torch.zeros(n_layers, model.config.hidden_size)
                for prompt in prompts:
                    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                    if ids.numel() == 0:
                        raise ConfigError(f"experts[{i}] ({e.source_model}): the prompt {prompt!r} has no tokens")
                    captured.clear()
                    with torch.no_grad():
                        model(ids)
                    for layer, h in enumerate(captured):  # h: [1, T, H]
                        sums[layer] += h[0, -1] if cfg.gate_mode == "hidden" else h[0].mean(0)
                for layer in range(n_layers):
                    out[layer][(kind, i)] = sums[layer] / len(prompts)
    finally:
        for h in hooks:
            h.remove()
    del model  # the only full model this command holds, and only while computing the router
    return out


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
        inter = base.tensors[_mlp_name(0, "up_proj")].shape[0]
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
