"""Means of many models on the hypersphere: `multislerp` and `karcher`.

Both treat each tensor as one flat vector x_i, split it into a direction u_i = x_i/‖x_i‖ and a
length ‖x_i‖, average the directions on the unit sphere and give the result the weighted mean
length. `multislerp` is blockwise (two statistics passes for the norms, then the output), so the
engine streams it; `karcher` iterates on whole tensors (each iteration would be another pass),
accumulating directions one model at a time: memory is the inputs plus two tensor-sized buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from modelalloy.errors import MergeError
from modelalloy.methods.blockwise import Block, BlockMerge, TensorSpec
from modelalloy.methods.registry import Param, merge_method


def _norm(x: Tensor) -> float:
    # float64 accumulation: a float32 sum of squares over 10^8 entries loses digits. .item(): sync on CUDA.
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.sum(a * b, dtype=torch.float64))


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _multislerp_check(params: dict[str, Any], models: Sequence[str]) -> str | None:
    if params["normalize_weights"] and abs(sum(params["weight"])) < 1e-12:
        return f"weights {list(params['weight'])} sum to 0 and normalize_weights is on; change the weights or set normalize_weights: false"
    return None


@merge_method(
    "multislerp",
    params=[
        Param("weight", per_model=True, doc="each model's weight"),
        Param("normalize_weights", default=True, kind=bool, doc="divide the weights by their sum"),
        Param("eps", default=1e-8, doc="added to norms before dividing by them", check=_positive),
    ],
    base="optional",
    min_models=1,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    check=_multislerp_check,
    blockwise=True,
    vs_mergekit=(
        "mergekit also projects onto the tangent space at the mean and back with the exponential map; "
        "that step is a mathematical no-op (the weighted tangent vectors sum to 0), so we skip it; the "
        "numbers agree to rounding. A weight sum of 0 with normalize_weights is rejected while planning. "
        "Where every task vector is 0 (a tensor no model changed) the result is the base; mergekit raises "
        "'the weighted sum is zero' there with 3+ models. 'Cancelling' is judged relative to the inputs' "
        "size (‖m‖ < max(eps, 16 ulp)·Σ|ŵ_i|‖u_i‖): tiny tensors are not mistaken for opposite ones, and inputs "
        "that cancel up to float rounding are not given a direction made of rounding noise."
    ),
)
def multislerp(spec: TensorSpec, *, weight: list[float], normalize_weights: bool, eps: float) -> MultislerpMerge:
    """Weighted mean of many models on the hypersphere (Goddard 2025, "Multi-SLERP").

    With x_i = θ_i (or δ_i = θ_i − θ_0 when a base is given, added back at the end) and ŵ the
    weights (divided by Σ w when `normalize_weights`):

        u_i = x_i / (‖x_i‖ + eps),   m = Σ ŵ_i u_i,   result = m/‖m‖ · Σ ŵ_i ‖x_i‖.

    If ‖m‖ < max(eps, 16 ulp)·Σ|ŵ_i|‖u_i‖ the directions cancel: two models fall back to the linear mix
    Σ ŵ_i x_i, more is an error. All x_i = 0 gives 0 (θ_0). One model is returned as is.
    """
    if normalize_weights:
        total = sum(weight)
        weight = [w / total for w in weight]
    return MultislerpMerge(spec, weight, eps)


class MultislerpMerge(BlockMerge):
    """Two statistics passes (float64 sums): the ‖x_i‖, then ‖m‖ of the direction m built from
    them; the output pass builds m again, block by block, and scales it."""

    passes = 2

    def __init__(self, spec: TensorSpec, weight: list[float], eps: float) -> None:
        self.spec, self.weight, self.eps = spec, weight, eps
        self.passes = 2 if len(weight) > 1 else 0  # one model is returned as is
        self.squares = [0.0] * len(weight)  # Σ x_i² (pass 0)
        self.direction_square = 0.0  # ‖m‖²
        self.step = 0
        self.linear_mix = False  # the directions cancel: two models are mixed linearly
        self.scale = 1.0

    def _vectors(self, block: Block) -> list[Tensor]:
        return [x - block.base for x in block.inputs] if block.base is not None else block.inputs

    def _direction(self, vectors: list[Tensor]) -> Tensor:
        direction = torch.zeros_like(vectors[0])
        for x, w, n in zip(vectors, self.weight, self.norms):
            # u_i first, then ŵ_i·u_i: each rounding is odd in x, so exactly opposite inputs cancel
            # exactly (a fused x·(w/n) does not, and leaves a 1e-8 "direction" of pure rounding).
            direction.add_(x.div(n + self.eps).mul_(w))
        return direction

    def start(self, step: int) -> None:
        self.step = step
        if step == 1:
            self.norms = [math.sqrt(q) for q in self.squares]
        elif step == 2:
            eps, norms = self.eps, self.norms
            length = sum(w * n for w, n in zip(self.weight, norms))
            # ‖m‖ if every ŵ_i u_i pointed the same way: what "‖m‖ ≈ 0" is measured against
            aligned = sum(abs(w) * n / (n + eps) for w, n in zip(self.weight, norms))
            m_norm = math.sqrt(self.direction_square)
            if aligned == 0.0:  # every x_i is 0 (e.g. a tensor no fine-tune changed): so is the mean
                return
            # Below a few units of rounding the mean direction is noise, not a direction (float32
            # inputs that cancel up to rounding leave ‖m‖ ~ 1e-7): treat that as cancelling too.
            if m_norm < max(eps, 16 * torch.finfo(self.spec.dtype).eps) * aligned:
                if len(self.weight) != 2:
                    raise MergeError(
                        f"multislerp: the weighted directions of the {len(self.weight)} models cancel out (antipodal inputs); change the weights"
                    )
                self.linear_mix = True
            else:
                self.scale = length / m_norm

    def observe(self, block: Block) -> None:
        vectors = self._vectors(block)
        if self.step == 0:
            for i, x in enumerate(vectors):
                self.squares[i] += float(x.square().sum(dtype=torch.float64))
        else:
            self.direction_square += float(self._direction(vectors).square().sum(dtype=torch.float64))

    def output(self, block: Block) -> Tensor:
        if self.passes == 0:
            return block.inputs[0].clone()
        vectors = self._vectors(block)
        if self.linear_mix:
            out = torch.mul(vectors[0], self.weight[0]).add_(vectors[1], alpha=self.weight[1])
        else:
            out = self._direction(vectors).mul_(self.scale)
        return out.add_(block.base) if block.base is not None else out


def _karcher_weights_check(params: dict[str, Any], models: Sequence[str]) -> str | None:
    weights = params["weight"]
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        missing = ", ".join(m for m, g in zip(models, given) if not g)
        return f"weight is set for some models but not for {missing}; give every model a weight, or none (equal weights)"
    if all(given) and sum(weights) <= 0:
        return f"weights {list(weights)} sum to {sum(weights):g}; they must sum to more than 0"
    return None


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be ≥ 0"


@merge_method(
    "karcher",
    params=[
        Param("weight", default=None, per_model=True, doc="each model's weight (default: equal)", check=_non_negative),
        Param("max_iter", default=10, kind=int, doc="fixed-point iterations at most", check=lambda v: None if v >= 1 else "must be ≥ 1"),
        Param("tol", default=1e-5, doc="stop when the update is shorter than this", check=_non_negative),
    ],
    base="unused",
    min_models=1,
    reference="https://en.wikipedia.org/wiki/Karcher_mean",
    check=_karcher_weights_check,
    vs_mergekit=(
        "mergekit ignores `weight` (always 1/N); we honour it when every model has one (without weights "
        "the result is mergekit's). An input antipodal to the running mean has no log map and is skipped "
        "in that step instead of producing NaN. Inputs with 0 < ‖θ‖ ≤ tol keep their direction (mergekit "
        "drops them, so identical tiny tensors merged to 0)."
    ),
)
def karcher(tensors: list[Tensor], *, weight: list[float | None], max_iter: int, tol: float) -> Tensor:
    """Weighted Karcher (Riemannian) mean of the models' directions, times their mean length.

    Karcher 1977; the fixed-point iteration of Buss & Fillmore 2001 ("Spherical averages and
    applications to spherical splines and interpolation", ACM TOG 20(2)). With α_i = w_i/Σw
    (1/N without weights), u_i = θ_i/‖θ_i‖ for the inputs with ‖θ_i‖ > 0:

        μ ← normalised Σ α_i u_i;  repeat ≤ max_iter: v = Σ α_i (φ_i / sin φ_i)(u_i − cos φ_i μ),
        φ_i = arccos⟨μ, u_i⟩; stop if ‖v‖ < tol; μ ← cos‖v‖ μ + sin‖v‖ v/‖v‖.
        result = μ · Σ α_i ‖θ_i‖.

    At the fixed point Σ α_i log_μ(u_i) = 0: μ minimises Σ α_i d(μ, u_i)² on the sphere.
    """
    if len(tensors) == 1:
        return tensors[0]
    alpha = [1.0 / len(tensors)] * len(tensors) if weight[0] is None else [w / sum(weight) for w in weight]
    norms = [_norm(x) for x in tensors]
    valid = [i for i, n in enumerate(norms) if n > 0.0]  # mergekit: n > tol, so tiny tensors became 0
    if not valid:
        return torch.zeros_like(tensors[0])
    share = sum(alpha[i] for i in valid)
    a = {i: alpha[i] / share for i in valid}  # directions of zero vectors do not exist: renormalise

    mean = torch.zeros_like(tensors[0])
    for i in valid:
        mean.add_(tensors[i], alpha=a[i] / norms[i])
    mean_norm = _norm(mean)
    if mean_norm < tol:
        mean = tensors[valid[0]] / norms[valid[0]]
    else:
        mean.div_(mean_norm)

    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for i in valid:
            cos_phi = min(1.0, max(-1.0, _dot(mean, tensors[i]) / norms[i]))
            phi = math.acos(cos_phi)
            if phi < tol or math.sin(phi) < 1e-12:  # at the mean, or antipodal (no log map)
                continue
            scale = a[i] * phi / math.sin(phi)
            tangent.add_(tensors[i], alpha=scale / norms[i]).add_(mean, alpha=-scale * cos_phi)
        step = _norm(tangent)
        if step < tol:
            break
        mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        mean.div_(_norm(mean))
    return mean.mul_(sum(al * n for al, n in zip(alpha, norms)))
