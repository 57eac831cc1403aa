"""SCE: select the entries where the models disagree most, weight each model by its task
vector's energy, erase minority signs."""

from __future__ import annotations

import torch
from torch import Tensor

from modelalloy.methods.registry import Param, in_range, merge_method
from modelalloy.methods.sparsifiers import descending_rank_window
from modelalloy.methods.task_vector_merge import consensus_sign

_DIVISOR_MIN = 1e-6
_UNIFORM_BELOW = 1e-6


@merge_method(
    "sce",
    params=[
        Param("select_topk", default=1.0, doc="fraction of the entries (by variance across models) kept", check=in_range(0.0, 1.0, low_open=True)),
        Param("int8_mask", default=False, kind=bool, doc="store masks as int8 to save memory (no effect on the numbers)"),
        # Many published mergekit configs for sce say `normalize: true`, which mergekit ignores; SCE
        # always divides by the agreeing weights, so true is accepted and false is refused.
        Param("normalize", default=True, kind=bool, doc="SCE always normalizes; accepted (true only) for mergekit configs", check=lambda v: None if v else "cannot be turned off: SCE always divides by the agreeing weights"),
    ],
    base="required",
    min_models=1,
    reference="https://arxiv.org/abs/2408.07990",
    vs_mergekit=(
        "Entries with equal variance at the select_topk cut are taken in index order (mergekit's topk order "
        "is unspecified). `normalize: true`, found in many published configs, is accepted (SCE always normalizes)."
    ),
)
def sce(tensors: list[Tensor], *, base: Tensor, select_topk: float, int8_mask: bool = False, normalize: bool = True) -> Tensor:
    """SCE (Wan et al. 2024, FuseChat): select high-variance entries, weight by energy, erase minority signs.

    With τ_i = θ_i − θ_0:

    Select: if select_topk < 1, zero every τ_i outside the k = int(count_nonzero(var)·select_topk)
    entries of largest variance across models (population variance).
    Calculate: w_i = mean(τ_i²) / Σ_k mean(τ_k²) (uniform when the sum is below 1e-6).
    Erase: s = sign(Σ τ_i) (0 counts as +), m_i = [sign τ_i = s];
    result θ_0 + Σ w_i m_i τ_i / max(Σ w_i m_i, 1e-6).
    """
    deltas = [x - base for x in tensors]  # (N of base.shape), kept: each is used three times
    n = len(deltas)
    if select_topk < 1.0:
        mean = torch.zeros_like(base)
        for d in deltas:
            mean.add_(d)
        mean.div_(n)
        variance = torch.zeros_like(base)
        for d in deltas:
            variance.add_((d - mean).square_())
        variance = variance.div_(n).reshape(-1)
        k = int(int(torch.count_nonzero(variance)) * select_topk)
        selected = descending_rank_window(variance, 0, k).reshape(base.shape)
        deltas = [d.mul_(selected) for d in deltas]
    energy = [float(d.square().sum(dtype=torch.float64)) / max(d.numel(), 1) for d in deltas]
    total = sum(energy)
    # METHODS.md and mergekit 0.1.5: uniform when the energies sum below 1e-6. Note that LLM task
    # vectors (|τ| ~ 1e-3, mean τ² ~ 1e-6 or less) often fall below it, and then get equal weights.
    weights = [1.0 / n] * n if abs(total) < _UNIFORM_BELOW else [e / total for e in energy]
    direction = torch.zeros_like(base)
    for d in deltas:
        direction.add_(d)
    direction = consensus_sign(direction)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for w, d in zip(weights, deltas):
        agree = torch.sign(d) == direction  # zeros have sign 0 and never agree
        mixed.add_(torch.where(agree, d, 0.0), alpha=w)
        divisor.add_(agree.to(base.dtype), alpha=w)
    return mixed.div_(divisor.clamp_(min=_DIVISOR_MIN)).add_(base)
