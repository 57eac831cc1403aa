"""Arcee Fusion: take the other model's change only where it matters most."""

from __future__ import annotations

import torch
from torch import Tensor

from modelalloy.methods.registry import merge_method

_SOFTMAX_EPS = 1e-8
# Quantiles come from at most this many entries, sampled with replacement (bounded memory).
QUANTILE_SAMPLE = 1_000_000


def fusion_threshold(importance: Tensor, seed: int) -> Tensor:
    """median + 1.5·IQR of the importance, quantile q taken as sorted[int(q·(n−1))]."""
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device="cpu")
        flat = flat[picks.to(flat.device)]
    ordered = torch.sort(flat).values
    last = ordered.numel() - 1
    q1, median, q3 = (ordered[int(q * last)] for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


@merge_method(
    "arcee_fusion",
    params=[],
    base="required",
    min_models=1,
    max_models=1,
    randomized=True,  # only tensors over 1e6 entries: the quantile sample is drawn from the seed
    reference="https://arcee.ai",
    vs_mergekit=(
        "The output keeps the inputs' dtype (mergekit promotes it to float32); the quantile sample of large "
        "tensors comes from the per-tensor seed, not the global RNG, so reruns are bit-identical."
    ),
)
def arcee_fusion(tensors: list[Tensor], *, base: Tensor, seed: int = 0) -> Tensor:
    """Arcee Fusion: keep the other model's changes only where their importance is an outlier.

    Importance I = |θ_1 − θ_0| ⊙ KL(softmax θ_1 ‖ softmax θ_0) (softmax over the last dim,
    +1e-8, one KL per row); keep δ = θ_1 − θ_0 where I ≥ median(I) + 1.5·IQR(I) (Tukey's upper
    fence: the outliers of importance), else the base.
    """
    other = tensors[0]
    shape = base.shape
    base_rows, other_rows = base.reshape(-1, shape[-1] if base.dim() else 1), other.reshape(-1, shape[-1] if base.dim() else 1)
    p = torch.softmax(other_rows.float(), dim=-1).add_(_SOFTMAX_EPS)
    q = torch.softmax(base_rows.float(), dim=-1).add_(_SOFTMAX_EPS)
    kl = (p * (p / q).log_()).sum(dim=-1, keepdim=True)  # (R, 1)
    del p, q
    delta = other_rows - base_rows
    importance = delta.abs().float().mul_(kl)
    keep = importance >= fusion_threshold(importance, seed)
    return (base_rows + torch.where(keep, delta, 0.0)).reshape(shape)
