"""Model Stock: move from the base toward the average of the fine-tunes by an amount set by
the angle between their task vectors."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from modelalloy.methods.blockwise import Block, BlockMerge, TensorSpec
from modelalloy.methods.registry import Param, merge_method

_NORM_PRODUCT_MIN = 1e-6
# 1 + (N−1) cosθ = 0 (e.g. two exactly opposite task vectors) makes t infinite.
_DENOMINATOR_MIN = 1e-6


class ModelStockMerge(BlockMerge):
    """One statistics pass sums ‖δ_i‖² and δ_i·δ_j for every pair i<j (float64), per row with
    `filter_wise` or over the whole tensor; the output pass is then elementwise."""

    passes = 1

    def __init__(self, spec: TensorSpec, filter_wise: bool) -> None:
        self.spec = spec
        self.per_row = filter_wise and len(spec.shape) > 0
        self.squares: Tensor | None = None  # (models, rows or 1)
        self.dots: Tensor | None = None  # (pairs, rows or 1)

    def _where(self, block: Block) -> slice:
        if not self.per_row:
            return slice(0, 1)
        first = block.start // self.spec.row_length
        return slice(first, first + block.base.shape[0])

    def observe(self, block: Block) -> None:
        n = len(block.inputs)
        if self.squares is None:
            size = self.spec.rows if self.per_row else 1
            self.squares = torch.zeros(n, size, dtype=torch.float64, device=block.base.device)
            self.dots = torch.zeros(n * (n - 1) // 2, size, dtype=torch.float64, device=block.base.device)
        deltas = [x - block.base for x in block.inputs]  # kept: every pair needs them
        dims = -1 if self.per_row else (0, 1)
        rows = self._where(block)
        for i, d in enumerate(deltas):
            self.squares[i, rows] += d.square().sum(dim=dims, dtype=torch.float64)
        for k, (i, j) in enumerate(itertools.combinations(range(n), 2)):
            self.dots[k, rows] += (deltas[i] * deltas[j]).sum(dim=dims, dtype=torch.float64)

    def start(self, step: int) -> None:
        if step != self.passes or self.squares is None:  # no blocks: an empty tensor
            return
        n = self.squares.shape[0]
        norms = self.squares.sqrt()
        pairs = list(itertools.combinations(range(n), 2))
        cos = sum((self.dots[k] / (norms[i] * norms[j]).clamp_min(_NORM_PRODUCT_MIN)).clamp(-1.0, 1.0) for k, (i, j) in enumerate(pairs)) / len(pairs)
        denominator = 1 + (n - 1) * cos
        t = torch.where(denominator.abs() < _DENOMINATOR_MIN, 0.0, n * cos / denominator)
        self.t = t.to(self.spec.dtype).unsqueeze(-1)  # (rows or 1, 1)

    def output(self, block: Block) -> Tensor:
        t = self.t[self._where(block)]
        mean = torch.zeros_like(block.base)
        for x in block.inputs:
            mean.add_(x)
        mean.div_(len(block.inputs))
        return t * mean + (1 - t) * block.base


@merge_method(
    "model_stock",
    params=[Param("filter_wise", default=False, kind=bool, doc="one angle per row (last dim) instead of per tensor")],
    base="required",
    min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
    blockwise=True,
)
def model_stock(spec: TensorSpec, *, filter_wise: bool) -> ModelStockMerge:
    """Model Stock (Jang et al. 2024): toward the fine-tunes' mean by an angle-derived ratio.

    Eq. 5 of the paper, with δ_i = θ_i − θ_0 (flattened, or per row along
    the last dim with `filter_wise`) and cosθ the mean over pairs i<j of cos(δ_i, δ_j)
    (norm product floored at 1e-6, clamped to [−1, 1]):

        t = N cosθ / (1 + (N − 1) cosθ),   result = t · mean(θ_i) + (1 − t) · θ_0.

    Where 1 + (N−1)·cosθ is ~0 (exactly opposite task vectors) t would be infinite: the base is
    kept there (as mergekit 0.1.5 does; earlier versions wrote inf/NaN).
    """
    return ModelStockMerge(spec, filter_wise)
