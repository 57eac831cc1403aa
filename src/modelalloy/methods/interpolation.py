"""Interpolation methods: no task vectors, the inputs themselves are combined."""

from __future__ import annotations

import torch
from torch import Tensor

from modelalloy.methods.blockwise import Block, BlockMerge, TensorSpec
from modelalloy.methods.registry import Param, merge_method

# Above this |cos| the two directions are parallel and SLERP's sin(Ω) ≈ 0: lerp instead.
_PARALLEL_DOT = 0.9995
_EPS = 1e-8


class LinearMerge(BlockMerge):
    def __init__(self, weight: list[float], normalize: bool) -> None:
        self.weight, self.normalize = weight, normalize

    def output(self, block: Block) -> Tensor:
        out = torch.mul(block.inputs[0], self.weight[0])
        for w, t in zip(self.weight[1:], block.inputs[1:]):
            out.add_(t, alpha=w)
        if self.normalize:
            out.div_(sum(self.weight))
        return out


@merge_method(
    "linear",
    params=[
        Param("weight", per_model=True, doc="each model's weight"),
        Param("normalize", default=True, kind=bool, doc="divide by the sum of weights"),
    ],
    base="unused",
    reference="https://arxiv.org/abs/2203.05482",
    blockwise=True,
)
def linear(spec: TensorSpec, *, weight: list[float], normalize: bool) -> LinearMerge:
    """Weighted average Σ w_i θ_i / Σ w_i (model soups, Wortsman et al. 2022).

    Without `normalize` it is the plain weighted sum. A base model listed among the models is just
    another input; `plan.py` rejects weights that sum to 0 with `normalize`.
    """
    return LinearMerge(weight, normalize)


def slerp_vectors(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """SLERP of two tensors taken as flat vectors (Shoemake 1985), lerp when nearly parallel.

    The angle comes from the normalised vectors; the result combines the un-normalised ones,
    as mergekit does, so magnitudes interpolate too.
    """
    n0 = torch.linalg.vector_norm(v0, dtype=torch.float64)
    n1 = torch.linalg.vector_norm(v1, dtype=torch.float64)
    # float64 accumulation: a float32 dot over 10^8 entries loses the digits arccos needs.
    dot = torch.sum(v0 * v1, dtype=torch.float64)
    d = float(dot / (max(float(n0), _EPS) * max(float(n1), _EPS)))  # .item(): a sync point on CUDA
    if abs(d) > _PARALLEL_DOT:
        return torch.lerp(v0, v1, t) if t not in (0.0, 1.0) else (v0 if t == 0.0 else v1).clone()
    omega = torch.arccos(torch.tensor(d, dtype=torch.float64))
    sin_omega = torch.sin(omega)
    s0 = float(torch.sin((1 - t) * omega) / sin_omega)
    s1 = float(torch.sin(t * omega) / sin_omega)
    return v0 * s0 + v1 * s1


@merge_method(
    "slerp",
    params=[Param("t", doc="interpolation factor; 0 = base, 1 = the other model")],
    base="required",
    min_models=1,
    max_models=1,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
def slerp(tensors: list[Tensor], *, base: Tensor, t: float) -> Tensor:
    """Spherical linear interpolation between the base (t=0) and one other model (t=1)."""
    return slerp_vectors(t, base, tensors[0])


def _rowwise_slerp(t: float, a: Tensor, b: Tensor) -> Tensor:
    """SLERP along the last dim, each row its own pair of vectors; (..., d) -> (..., d)."""
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    dot = ((a / na.clamp_min(_EPS)) * (b / nb.clamp_min(_EPS))).sum(dim=-1, keepdim=True)
    omega = torch.arccos(dot.clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    res = (torch.sin((1 - t) * omega) / sin_omega) * a + (torch.sin(t * omega) / sin_omega) * b
    # Rows that are parallel or zero have no plane to rotate in: lerp there (never NaN).
    degenerate = (sin_omega.abs() < _EPS) | (na < _EPS) | (nb < _EPS)
    return torch.where(degenerate, torch.lerp(a, b, t), res)


@merge_method(
    "nuslerp",
    params=[
        Param("weight", per_model=True, doc="relative weights; t = w_2 / (w_1 + w_2)"),
        Param("nuslerp_flatten", default=True, kind=bool, doc="treat the whole tensor as one vector"),
        Param("nuslerp_row_wise", default=False, kind=bool, doc="with flatten off, vectors along dim 0 instead of the last"),
    ],
    base="optional",
    min_models=2,
    max_models=2,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    vs_mergekit="Rows whose norm is ~0 fall back to lerp instead of producing NaN.",
)
def nuslerp(tensors: list[Tensor], *, base: Tensor | None, weight: list[float], nuslerp_flatten: bool, nuslerp_row_wise: bool) -> Tensor:
    """SLERP between two models (or their task vectors from a base) with weights instead of t."""
    total = weight[0] + weight[1]
    t = weight[1] / total if abs(total) >= 1e-6 else 0.5
    a, b = tensors
    if base is not None:
        a, b = a - base, b - base
    shape = a.shape
    if nuslerp_flatten or a.dim() < 2:
        res = _rowwise_slerp(t, a.reshape(1, -1), b.reshape(1, -1)).reshape(shape)
    elif nuslerp_row_wise:
        res = _rowwise_slerp(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    else:
        res = _rowwise_slerp(t, a, b)
    return res + base if base is not None else res


@merge_method(
    "passthrough",
    params=[Param("scale", default=1.0, per_model=True, doc="multiplies the tensor (e.g. to damp repeated layers)")],
    base="unused",
    min_models=1,
    max_models=1,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
)
def passthrough(tensors: list[Tensor], *, scale: list[float]) -> Tensor:
    """Copies its single input (frankenmerges, layer stacking), optionally scaled."""
    return tensors[0] if scale[0] == 1.0 else tensors[0] * scale[0]

