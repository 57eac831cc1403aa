"""Model Stock: move from the base toward the average of the fine-tunes by an amount set by
the angle between their task vectors."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from modelalloy.methods.registry import Param, merge_method

_NORM_PRODUCT_MIN = 1e-6
# 1 + (N−1) cosθ = 0 (e.g. two exactly opposite task vectors) makes t infinite.
_DENOMINATOR_MIN = 1e-6


@merge_method(
    "model_stock",
    params=[Param("filter_wise", default=False, kind=bool, doc="one angle per row (last dim) instead of per tensor")],
    base="required",
    min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
)
def model_stock(tensors: list[Tensor], *, base: Tensor, filter_wise: bool) -> Tensor:
    """Model Stock (Jang et al. 2024): toward the fine-tunes' mean by an angle-derived ratio.

    Eq. 5 of the paper, with δ_i = θ_i − θ_0 (flattened, or per row along
    the last dim with `filter_wise`) and cosθ the mean over pairs i<j of cos(δ_i, δ_j)
    (norm product floored at 1e-6, clamped to [−1, 1]):

        t = N cosθ / (1 + (N − 1) cosθ),   result = t · mean(θ_i) + (1 − t) · θ_0.

    Where 1 + (N−1)·cosθ is ~0 (exactly opposite task vectors) t would be infinite: the base is
    kept there (as mergekit 0.1.5 does; earlier versions wrote inf/NaN).
    """
    shape = base.shape
    rows = (-1, shape[-1]) if filter_wise and base.dim() > 0 else (1, -1)  # (R, D): one angle per row
    base_rows = base.reshape(rows)
    deltas = [x.reshape(rows) - base_rows for x in tensors]  # kept: every pair needs them
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i, j in itertools.combinations(range(len(deltas)), 2):
        cos = (deltas[i] * deltas[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp_min(_NORM_PRODUCT_MIN)
        cos_sum.add_(cos.clamp_(-1.0, 1.0))
        pairs += 1
    del deltas
    n = len(tensors)
    cos = cos_sum / pairs
    denominator = 1 + (n - 1) * cos
    t = torch.where(denominator.abs() < _DENOMINATOR_MIN, 0.0, n * cos / denominator).unsqueeze(-1)  # (R, 1)
    mean = torch.zeros_like(base_rows)
    for x in tensors:
        mean.add_(x.reshape(rows))
    mean.div_(n)
    return (t * mean + (1 - t) * base_rows).reshape(shape)
