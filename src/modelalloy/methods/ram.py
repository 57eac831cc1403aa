"""RAM: average task vectors only where several models changed a weight; keep unique changes whole."""

from __future__ import annotations

import torch
from torch import Tensor

from modelalloy.methods.registry import Param, merge_method

_EPSILON = Param("epsilon", default=1e-5, doc="|τ| above this counts as a change", check=lambda v: None if v >= 0 else "must be ≥ 0")
_REFERENCE = "https://arxiv.org/abs/2601.13572"


def _active_counts(tensors: list[Tensor], base: Tensor, epsilon: float) -> Tensor:
    """c_j = how many models changed entry j by more than epsilon; one task vector alive at a time."""
    counts = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for x in tensors:
        counts.add_((x - base).abs_() > epsilon)
    return counts


@merge_method("ram", params=[_EPSILON], base="required", min_models=1, reference=_REFERENCE)
def ram(tensors: list[Tensor], *, base: Tensor, epsilon: float) -> Tensor:
    """Reinforced Agent Merging (RAM): average changes only over the models that made them.

    With τ_i = θ_i − θ_0, a_ij = [|τ_ij| > ε], c_j = Σ_i a_ij:

        θ_0 + Σ_i a_ij τ_ij · ([c_j = 1] + [c_j > 1] / c_j)

    i.e. an entry only one model changed keeps that change whole; shared ones are averaged over
    the models that changed them (never diluted by the models that did not).
    """
    counts = _active_counts(tensors, base, epsilon).clamp_(min=1).to(base.dtype)
    merged = torch.zeros_like(base)
    for x in tensors:
        delta = x - base
        merged.add_(torch.where(delta.abs() > epsilon, delta, 0.0))
    return merged.div_(counts).add_(base)


@merge_method(
    "ramplus_tl",
    params=[
        Param("r", default=0.1, doc="how much a model's unique entries are boosted per unit of overlap ratio", check=lambda v: None if v >= 0 else "must be ≥ 0"),
        Param("alpha", default=0.2, doc="cap on the overlap ratio ρ", check=lambda v: None if v >= 0 else "must be ≥ 0"),
        _EPSILON,
    ],
    base="required",
    min_models=1,
    reference=_REFERENCE,
)
def ramplus_tl(tensors: list[Tensor], *, base: Tensor, r: float, alpha: float, epsilon: float) -> Tensor:
    """RAM+ (tensor-local): RAM, boosting the unique changes of models that mostly overlap others.

    As `ram`, but model i's unique entries are scaled by
    λ_i = 1 + r · clip(ρ_i, 0, α), ρ_i = #(active ∧ shared) / max(#(active ∧ unique), ε),
    so a model whose changes mostly overlap others' has its few unique ones reinforced.
    """
    counts = _active_counts(tensors, base, epsilon)
    unique = counts == 1
    shared = counts > 1
    share = 1.0 / counts.clamp(min=1).to(base.dtype)
    merged = torch.zeros_like(base)
    for x in tensors:
        delta = x - base
        active = delta.abs() > epsilon
        n_shared = int((active & shared).sum())  # .item(): a sync point on CUDA
        n_unique = int((active & unique).sum())
        # No unique entries: nothing to boost (and ρ would be n/0 with epsilon 0).
        rho = n_shared / max(n_unique, epsilon) if n_unique else 0.0
        boost = 1.0 + r * min(max(rho, 0.0), alpha)
        scale = torch.where(unique, boost, share)  # unique entries ×λ_i, shared ones ÷c_j
        merged.add_(torch.where(active, delta * scale, 0.0))
    return merged.add_(base)
