"""The task-vector family: one pipeline, configured per method by a row of a table.

Per output tensor (METHODS.md, "Task-vector family"):

    δ_i = θ_i − θ_0  →  sparsify(δ_i; density_i)  →  D_i = w_i δ̃_i  →  combine
        →  optional ÷ weight divisor  →  × lambda  →  θ_0 + result

Combine without sign consensus: Σ D_i, divisor Σ w_i. With it (TIES, Yadav et al. 2023):
s = sign(Σ D_i) (or sign(Σ sign D_i) for `consensus_method: count`), zeros counting as +;
m_i = [sign D_i = s], so zeros never match; Σ m_i D_i, divisor Σ m_i w_i elementwise.

Memory: without consensus each D_i is added to the sum and dropped, so one task vector is alive
at a time. With consensus the N sparsified D_i are kept (they are needed twice) but never stacked
into one N× tensor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from modelalloy.methods.registry import MergeMethod, Param, in_range, merge_method

_DIVISOR_EPS = 1e-8
_RESCALE_EPS = 1e-7


_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_DIGIT = 16  # radix digit width: 65536 bins per pass


def kth_largest_magnitude(magnitude: Tensor, k: int) -> Tensor:
    """The k-th largest entry (1-based) of a flat tensor of non-negative floats, exactly.

    Radix select on the bit patterns: for floats ≥ 0 the order of the values is the order of their
    bits read as integers, so a histogram of the top 16 bits finds the bin holding the k-th
    largest, and a histogram of the next 16 bits among that bin's entries finishes the job
    (4 passes for float64). Same answer as `torch.kthvalue(magnitude, n - k + 1)`, 8× faster on
    10^8 entries, where kthvalue's quickselect dominated a whole TIES merge.
    """
    bits = magnitude.view(_INT_OF[magnitude.dtype])
    width = bits.element_size() * 8
    found = 0
    remaining = k
    for shift in range(max(width - _DIGIT, 0), -1, -_DIGIT):
        top = shift == width - _DIGIT  # the sign bit is 0, so the top digit needs no masking
        digit = bits >> shift if top else (bits >> shift) & (2**_DIGIT - 1) if shift else bits & (2**_DIGIT - 1)
        counts = torch.bincount(digit.to(torch.int64) if digit.dtype == torch.int16 else digit, minlength=2**_DIGIT)
        at_or_above = counts.flip(0).cumsum(0)  # [j] = entries whose digit is ≥ 2^16-1-j
        j = int(torch.searchsorted(at_or_above, remaining))  # int(): a sync point on CUDA
        if j:
            remaining -= int(at_or_above[j - 1])
        value = 2**_DIGIT - 1 - j
        found |= value << shift
        if shift:
            bits = bits[digit == value]  # only the entries that share the prefix found so far
    return torch.tensor(found, dtype=_INT_OF[magnitude.dtype], device=magnitude.device).view(magnitude.dtype)


def magnitude_mask(delta: Tensor, density: float) -> Tensor | None:
    """Mask keeping exactly k = int(density·numel) largest |δ| (None = keep all).

    Selection by radix select (`kth_largest_magnitude`, O(n)) instead of a full sort; entries
    equal to the threshold are taken in index order until k are kept, so the count is exact even
    with ties.
    """
    n = delta.numel()
    if density >= 1.0:
        return None
    k = int(density * n)
    if k == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs().reshape(-1)
    threshold = kth_largest_magnitude(magnitude, k)
    mask = magnitude > threshold
    missing = k - int(mask.sum())  # .item(): a sync point on CUDA
    if missing > 0:
        at_threshold = (magnitude == threshold).nonzero().squeeze(1)[:missing]
        mask[at_threshold] = True
    return mask.reshape(delta.shape)


def random_mask(delta: Tensor, density: float, generator: torch.Generator) -> Tensor | None:
    """Keep each entry with probability `density` (DARE). Drawn on the CPU generator so the mask
    is the same whatever device does the arithmetic."""
    if density >= 1.0:
        return None
    draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device="cpu")
    return (draws < density).to(delta.device)


def apply_mask(delta: Tensor, mask: Tensor | None, rescale: str | None, density: float) -> Tensor:
    """δ ⊙ mask, rescaled: `l1` restores ‖δ‖₁ (mergekit), `inverse_p` divides by the keep-probability."""
    if mask is None:
        return delta
    kept = delta * mask
    if rescale == "l1":
        before = float(delta.abs().sum(dtype=torch.float64))
        after = float(kept.abs().sum(dtype=torch.float64))
        if before > _RESCALE_EPS and after > _RESCALE_EPS:
            kept.mul_(before / after)
    elif rescale == "inverse_p":
        kept.div_(density)
    return kept


@dataclass(frozen=True)
class Sparsifier:
    name: str
    random: bool


MAGNITUDE = Sparsifier("magnitude", random=False)
RANDOM = Sparsifier("random", random=True)


def sparsify(delta: Tensor, sparsifier: Sparsifier | None, density: float, rescale: str | None, generator) -> Tensor:
    if sparsifier is None:
        return delta
    if sparsifier is MAGNITUDE:
        mask = magnitude_mask(delta, density)
    elif sparsifier is RANDOM:
        mask = random_mask(delta, density, generator)
    else:  # pragma: no cover - the table below lists every sparsifier
        raise AssertionError(sparsifier)
    return apply_mask(delta, mask, rescale, density)


def _signs(x: Tensor) -> Tensor:
    """sign with 0 counted as +1 (the consensus direction is never 0)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def task_vector_merge(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: list[float],
    density: list[float] | None,
    lambda_: float,
    consensus: str | None,
    sparsifier: Sparsifier | None,
    normalize: bool,
    rescale: str | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The whole family; see the module docstring. Inputs are never modified."""
    if density is None:
        density = [1.0] * len(tensors)
    if sparsifier is MAGNITUDE and any(int(d * base.numel()) == 0 and d < 1 for d in density):
        warnings.warn(f"density keeps 0 entries of a {base.numel()}-entry tensor; that model contributes nothing there")
    # D_i = w_i · sparsify(θ_i − θ_0), computed one model at a time.
    def weighted_delta(i: int) -> Tensor:
        # tensors[i] - base is a fresh tensor, so every later step may work in place.
        return sparsify(tensors[i] - base, sparsifier, density[i], rescale, generator).mul_(weight[i])

    if consensus is None:
        mixed = torch.zeros_like(base)
        for i in range(len(tensors)):
            mixed.add_(weighted_delta(i))
        divisor: Any = sum(weight)
        if abs(divisor) < _DIVISOR_EPS:
            divisor = 1.0
    else:
        deltas = [weighted_delta(i) for i in range(len(tensors))]
        if consensus == "sum":
            direction = torch.zeros_like(base)
            for d in deltas:
                direction.add_(d)
        else:  # count: the majority of signs, not of mass
            direction = torch.zeros_like(base)
            for d in deltas:
                direction.add_(torch.sign(d))
        direction = _signs(direction)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for w, d in zip(weight, deltas):
            agree = torch.sign(d) == direction  # zeros have sign 0 and never agree
            mixed.add_(torch.where(agree, d, 0.0))
            if divisor is not None:
                divisor.add_(agree.to(base.dtype), alpha=w)
        del deltas, direction  # the N task vectors are the largest thing alive here
        if divisor is not None:
            divisor = torch.where(divisor.abs() < _DIVISOR_EPS, 1.0, divisor)
    if normalize:
        mixed = mixed.div_(divisor)
    if lambda_ != 1.0:
        mixed.mul_(lambda_)
    return mixed.add_(base)


DENSITY = Param("density", default=1.0, per_model=True, doc="fraction of each task vector kept", check=in_range(0.0, 1.0, low_open=True))
WEIGHT = Param("weight", default=1.0, per_model=True, doc="each task vector's weight")
LAMBDA = Param("lambda", default=1.0, doc="scales the merged task vector")
INT8_MASK = Param("int8_mask", default=False, kind=bool, doc="store masks as int8 to save memory (no effect on the numbers)")
CONSENSUS = Param("consensus_method", default="sum", kind=str, choices=("sum", "count"), doc="sign election by mass (sum) or by vote (count)")


def _rescale_param(default: bool) -> Param:
    return Param("rescale", default=default, kind=object, choices=(True, False, "l1", "inverse_p"), doc="rescale kept entries: l1 (= true) keeps ‖δ‖₁, inverse_p divides by density")


@dataclass(frozen=True)
class FamilyRow:
    name: str
    consensus: bool
    sparsifier: Sparsifier | None
    normalize: bool
    rescale: bool | None  # None: the method has no rescale parameter
    reference: str
    doc: str


# METHODS.md's table, row for row.
FAMILY: tuple[FamilyRow, ...] = (
    FamilyRow("task_arithmetic", False, None, False, None, "https://arxiv.org/abs/2212.04089", "Task arithmetic (Ilharco et al. 2023): θ_0 + λ Σ w_i δ_i."),
    FamilyRow("ties", True, MAGNITUDE, True, None, "https://arxiv.org/abs/2306.01708", "TIES (Yadav et al. 2023): trim to the largest |δ|, elect signs, average the agreeing entries."),
    FamilyRow("dare_linear", False, RANDOM, False, True, "https://arxiv.org/abs/2311.03099", "DARE (Yu et al. 2024): drop entries at random, rescale, add."),
    FamilyRow("dare_ties", True, RANDOM, False, True, "https://arxiv.org/abs/2311.03099", "DARE drop-and-rescale followed by TIES sign consensus."),
)


def _family_method(row: FamilyRow) -> MergeMethod:
    params = [WEIGHT, LAMBDA, Param("normalize", default=row.normalize, kind=bool, doc="divide by the (agreeing) weight sum")]
    if row.sparsifier is not None:
        params.insert(1, DENSITY)
    if row.consensus:
        params += [CONSENSUS, INT8_MASK]
    if row.rescale is not None:
        params.append(_rescale_param(row.rescale))

    def fn(tensors: list[Tensor], *, base: Tensor, generator=None, weight, lambda_, normalize, density=None, consensus_method="sum", int8_mask=False, rescale=None) -> Tensor:
        rescale_mode = {True: "l1", False: None, None: None}.get(rescale, rescale)
        return task_vector_merge(
            tensors,
            base,
            weight=weight,
            density=density,
            lambda_=lambda_,
            consensus=consensus_method if row.consensus else None,
            sparsifier=row.sparsifier,
            normalize=normalize,
            rescale=rescale_mode,
            generator=generator,
        )

    fn.__doc__ = row.doc
    return merge_method(
        row.name,
        params=params,
        base="required",
        randomized=bool(row.sparsifier and row.sparsifier.random),
        reference=row.reference,
    )(fn)


FAMILY_METHODS: tuple[MergeMethod, ...] = tuple(_family_method(row) for row in FAMILY)
