"""The router of an MoE built from dense models: one row per expert, per layer, from prompts.

- ``hidden``: run the base on each expert's positive prompts and take, per layer, the input of
  the MLP (the vector the router will see) at the last token; average over prompts, subtract the
  same average over the negative prompts, L2-normalise. mergekit takes the layer's *input*
  hidden state instead, before attention and the norm; ours is what the router multiplies.
- ``hidden_avg``: the same, averaged over all tokens of each prompt instead of the last one.
- ``cheap_embed``: the normalised sum of the prompts' token embeddings, the same for every layer.
- ``random`` (N(0, 1)) and ``uniform_random`` (U(±1/√hidden), nn.Linear's init), seeded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from modelalloy.compose.moe_config import MoEConfig
from modelalloy.compose.moe_layout import mlp_name
from modelalloy.errors import ConfigError, PlanError
from modelalloy.io.checkpoint import Checkpoint

# How far from orthogonal the router rows may be before we warn (mergekit warns above 5 too).
_MAX_CONDITION = 5.0


def compute_gates(cfg: MoEConfig, base: Checkpoint, n_layers: int, notes: list[str]) -> torch.Tensor:
    """Router weights [layers, experts, hidden] in float32, each row of unit length (or random)."""
    embed_name = next((n for n in base.tensors if n.endswith("embed_tokens.weight")), None)
    hidden = base.tensors[mlp_name(0, "up_proj")].shape[1]
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
