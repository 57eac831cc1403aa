"""Tensor names on both sides of an MoE build: the dense models' MLPs, and the MoE's router and
experts in the layout the installed transformers expects.

transformers ≥ 5 fuses the experts into ``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I]; older versions name each expert's ``w1/w3/w2`` (Mixtral) or
``gate_proj/up_proj/down_proj`` (Qwen2-MoE). `expert_layout` finds out by building the target
class on the meta device.
"""

from __future__ import annotations

import torch

from modelalloy.compose.moe_config import ARCHITECTURES

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


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


def mlp_name(layer: int, part: str) -> str:
    """A dense (Llama-style) model's MLP weight `part` of `layer`, as each expert's source names it."""
    return f"model.layers.{layer}.mlp.{part}.weight"


def moe_names(architecture: str, layout: str, layer: int, n_experts: int) -> dict[str, list[str]]:
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
        **{part: [f"{prefix}.experts.{e}.{part}.weight" for e in range(n_experts)] for part in MLP_PARTS},
    }
