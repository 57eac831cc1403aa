"""Interpolation methods: no task vectors, the inputs themselves are combined."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modelalloy.methods.blockwise import Block, BlockMerge, TensorSpec
from modelalloy.methods.registry import Param, merge_method

# Above this |cos| the two directions are parallel and SLERP's sin(Ω) ≈ 0: lerp instead.
_PARALLEL_DOT = 0.9995
_EPS = 1e-8


class LinearMerge(BlockMerge):
    spreads_nonfinite = True

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
    another input; `plan/` rejects weights that sum to 0 with `normalize`.
    """
    return LinearMerge(weight, normalize)


class SlerpMerge(BlockMerge):
    """SLERP of two tensors taken as flat vectors (Shoemake 1985), lerp when nearly parallel.

    The angle comes from the normalised vectors; the result combines the un-normalised ones, as
    mergekit does, so magnitudes interpolate too. One statistics pass sums ‖v0‖², ‖v1‖² and
    v0·v1 (in float64: a float32 dot over 10^8 entries loses the digits arccos needs); the output
    pass is then elementwise with two scalar coefficients.
    """

    passes = 1

    def __init__(self, t: float) -> None:
        self.t = t
        self.sums = [0.0, 0.0, 0.0]  # ‖v0‖², ‖v1‖², v0·v1

    def observe(self, block: Block) -> None:
        v0, v1 = block.base, block.inputs[0]
        for i, value in enumerate((v0.square().sum(dtype=torch.float64), v1.square().sum(dtype=torch.float64), (v0 * v1).sum(dtype=torch.float64))):
            self.sums[i] += float(value)  # float(): a sync point on CUDA

    def start(self, step: int) -> None:
        if step != self.passes:
            return
        t = self.t
        n0, n1 = max(math.sqrt(self.sums[0]), _EPS), max(math.sqrt(self.sums[1]), _EPS)
        d = self.sums[2] / (n0 * n1)
        if abs(d) > _PARALLEL_DOT:
            self.coefficients = (1.0, 0.0) if t == 0.0 else (0.0, 1.0) if t == 1.0 else None  # None: lerp
            return
        omega = math.acos(d)
        sin_omega = math.sin(omega)
        self.coefficients = (math.sin((1 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega)

    def output(self, block: Block) -> Tensor:
        v0, v1 = block.base, block.inputs[0]
        if self.coefficients is None:
            return torch.lerp(v0, v1, self.t)
        s0, s1 = self.coefficients
        if s1 == 0.0:
            return v0.clone()
        if s0 == 0.0:
            return v1.clone()
        return torch.mul(v0, s0).add_(v1, alpha=s1)


@merge_method(
    "slerp",
    params=[Param("t", doc="interpolation factor; 0 = base, 1 = the other model")],
    base="required",
    min_models=1,
    max_models=1,
    reference="https://en.wikipedia.org/wiki/Slerp",
    blockwise=True,
)
def slerp(spec: TensorSpec, *, t: float) -> SlerpMerge:
    """Spherical linear interpolation between the base (t=0) and one other model (t=1)."""
    return SlerpMerge(t)


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
    blockwise=True,
)
def nuslerp(spec: TensorSpec, *, weight: list[float], nuslerp_flatten: bool, nuslerp_row_wise: bool) -> NuslerpMerge:
    """SLERP between two models (or their task vectors from a base) with weights instead of t."""
    total = weight[0] + weight[1]
    t = weight[1] / total if abs(total) >= 1e-6 else 0.5
    if nuslerp_flatten or len(spec.shape) < 2:
        return NuslerpMerge(spec, t, "tensor")
    return NuslerpMerge(spec, t, "columns" if nuslerp_row_wise else "rows")


class NuslerpMerge(BlockMerge):
    """SLERP of two vectors per group of entries: the whole tensor, each row (the last dim), or
    each vector along dim 0 ("columns", `nuslerp_row_wise`). Rows come whole in a block, so row
    SLERP needs no statistics; the other two sum ‖a‖², ‖b‖² and a·b per vector in one pass
    (float64), then combine each block with its vectors' two coefficients."""

    def __init__(self, spec: TensorSpec, t: float, vectors: str) -> None:
        self.spec, self.t, self.vectors = spec, t, vectors
        self.passes = 0 if vectors == "rows" else 1
        # "columns": row r of the (rows, last dim) layout holds entries (r // period, r % period, :)
        self.period = max(1, spec.rows // spec.shape[0]) if vectors == "columns" and spec.shape[0] else 1
        self.sums = torch.zeros(3, self.period, spec.row_length if vectors == "columns" else 1, dtype=torch.float64, device=spec.device)

    def _inputs(self, block: Block) -> tuple[Tensor, Tensor]:
        a, b = block.inputs
        return (a - block.base, b - block.base) if block.base is not None else (a, b)

    def _groups(self, block: Block) -> Tensor | slice:
        """Which vector each of the block's rows belongs to (an index into the sums' rows)."""
        if self.vectors == "tensor":
            return slice(0, 1)
        first = block.start // self.spec.row_length
        return torch.arange(first, first + block.inputs[0].shape[0], device=self.sums.device) % self.period

    def observe(self, block: Block) -> None:
        a, b = self._inputs(block)
        for i, product in enumerate((a * a, b * b, a * b)):
            if self.vectors == "tensor":
                self.sums[i] += product.sum(dtype=torch.float64)
            else:
                self.sums[i].index_add_(0, self._groups(block), product.to(torch.float64))

    def start(self, step: int) -> None:
        if self.passes == 0 or step != self.passes:
            return
        t = self.t
        na, nb = self.sums[0].sqrt(), self.sums[1].sqrt()
        cos = (self.sums[2] / (na.clamp_min(_EPS) * nb.clamp_min(_EPS))).clamp(-1.0, 1.0)
        omega = torch.arccos(cos)
        sin_omega = torch.sin(omega)
        # Vectors that are parallel or zero have no plane to rotate in: lerp there (never NaN).
        degenerate = (sin_omega.abs() < _EPS) | (na < _EPS) | (nb < _EPS)
        s0 = torch.where(degenerate, 1 - t, torch.sin((1 - t) * omega) / sin_omega)
        s1 = torch.where(degenerate, t, torch.sin(t * omega) / sin_omega)
        self.coefficients = (s0.to(self.spec.dtype), s1.to(self.spec.dtype))

    def output(self, block: Block) -> Tensor:
        a, b = self._inputs(block)
        if self.vectors == "rows":
            res = _rowwise_slerp(self.t, a, b)
        else:
            groups = self._groups(block)
            s0, s1 = (c[groups] for c in self.coefficients)
            res = s0 * a + s1 * b
        return res + block.base if block.base is not None else res


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

