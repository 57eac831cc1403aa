"""Data-aware merges: each model's own statistics (from `alloy stats`) weight its parameters.

- `fisher`: diagonal-Fisher-weighted mean (Matena & Raffel, NeurIPS 2022, arXiv:2111.09832).
- `regmean`: regression mean per linear layer (Jin et al., ICLR 2023, arXiv:2212.09849).

Both merge the models themselves (no base model, no task vectors), as in the papers. The
statistics arrive as one extra tensor per model, aligned with ``tensors`` (see `registry`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from modelalloy.methods.registry import Param, in_range, merge_method
from modelalloy.methods.linalg import solve_psd
from modelalloy.methods.subspace import LAYOUT


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


@merge_method(
    "fisher",
    params=[
        Param("weight", default=1.0, per_model=True, doc="each model's coefficient λ_i (the papers' default: equal)", check=_positive),
        Param("epsilon", default=1e-6, doc="added to every Fisher value, so that entries no model has information on get the weighted mean", check=in_range(0.0, 1e30)),
    ],
    base="unused",
    stats="fisher",
    reference="https://arxiv.org/abs/2111.09832",
)
def fisher(tensors: list[Tensor], *, fisher: list[Tensor], weight: list[float], epsilon: float) -> Tensor:
    """Fisher merging (Matena & Raffel 2022): θ* = Σ λ_i (F_i + ε) θ_i / Σ λ_i (F_i + ε), elementwise,
    with F_i each model's diagonal Fisher information.

    ε = 1e-6 is FusionBench's `minimal_fisher_weight`. Not done: FusionBench's option to divide each
    model's Fisher by its norm over the whole model (it needs every tensor at once).
    """
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for theta, f, lam in zip(tensors, fisher, weight):
        w = (f + epsilon).mul_(lam)
        numerator.addcmul_(w, theta)
        denominator.add_(w)
    return numerator.div_(denominator)


def _scale_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """α·G + (1 − α)·diag(G): off-diagonal entries times α, the diagonal kept."""
    if alpha == 1.0:
        return gram
    return gram * alpha + torch.diag_embed(torch.diagonal(gram) * (1.0 - alpha))


@merge_method(
    "regmean",
    params=[
        Param("alpha", default=1.0, doc="scales the off-diagonal entries of each Gram matrix (α; 1 = the exact least-squares merge)", check=in_range(0.0, 1.0)),
        LAYOUT,
    ],
    base="unused",
    stats="gram",
    reference="https://arxiv.org/abs/2212.09849",
)
def regmean(tensors: list[Tensor], *, gram: list[Tensor] | None, alpha: float, layout: str) -> Tensor:
    """RegMean (Jin et al. 2023): per linear layer W* = (Σ G̃_i)⁻¹ Σ G̃_i W_i, with G_i = X_iᵀX_i the
    Gram matrix of layer i's inputs and G̃_i its off-diagonal entries times α; other tensors averaged.

    With α = 1 this is the least-squares fit of one layer to all models' outputs on the union of
    their data, min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖². The paper tunes α on validation data (FusionBench
    ships 0.1, and 0.6 for GPT-2 and CLIP). A torch Linear weight is [out, in] and G is [in, in], so
    the solve is on Wᵀ; a GPT-2 Conv1D weight ([in, out], ``layout: in_out``) is used as is. Input
    directions no model's data reached (Σ G̃_i singular) keep the average of the weights.
    """
    if gram is None or layout == "vector":
        return torch.stack(tensors).mean(dim=0)
    dtype = tensors[0].dtype
    # [in, out] orientation, in float64: the Gram matrices are sums over many tokens and the
    # solve squares their condition number's effect on float32.
    weights = [(w.T if layout == "out_in" else w).to(torch.float64) for w in tensors]
    grams = [_scale_off_diagonal(g.to(torch.float64), alpha) for g in gram]
    lhs = sum(grams)
    rhs = sum(g @ w for g, w in zip(grams, weights))
    merged = solve_psd(lhs, rhs, fallback=sum(weights) / len(weights))
    return (merged.T if layout == "out_in" else merged).to(dtype).contiguous()


DATA_AWARE_METHODS = (fisher, regmean)
