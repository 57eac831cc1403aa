"""The task-vector family: one pipeline, configured per method by a row of a table.

Per output tensor (METHODS.md, "Task-vector family"):

    δ_i = θ_i − θ_0  →  sparsify(δ_i; density_i)  →  D_i = w_i δ̃_i  →  combine
        →  optional ÷ weight divisor  →  × lambda  →  θ_0 + result

Combine without sign consensus: Σ D_i, divisor Σ w_i. With it (TIES, Yadav et al. 2023):
s = sign(Σ D_i) (or sign(Σ sign D_i) for `consensus_method: count`), zeros counting as +;
m_i = [sign D_i = s], so zeros never match; Σ m_i D_i, divisor Σ m_i w_i elementwise.

Sparsifiers: magnitude (TIES: the k largest |δ|), random (DARE: keep with probability density),
magnitude_outliers (Breadcrumbs: drop the top gamma fraction, then the smallest), della_magprune
(DELLA: keep-probability density ± epsilon by per-row magnitude rank). Rescale after dropping:
l1 restores ‖δ‖₁ (mergekit), inverse_p divides by each entry's keep-probability (the papers).

Memory: without consensus each D_i is added to the sum and dropped, so one task vector is alive
at a time. With consensus the N sparsified D_i are kept (they are needed twice) but never stacked
into one N× tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from modelalloy.methods.registry import MergeMethod, Param, in_range, merge_method

_DIVISOR_EPS = 1e-8
_RESCALE_EPS = 1e-7


def magnitude_mask(delta: Tensor, density: float) -> Tensor | None:
    """Mask keeping exactly k = int(density·numel) largest |δ| (None = keep all).

    Selection by `kthvalue` (O(n)) instead of a full sort; entries equal to the threshold are
    taken in index order until k are kept, so the count is exact even with ties.
    """
    n = delta.numel()
    if density >= 1.0:
        return None
    k = int(density * n)
    if k == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude, n - k + 1).values  # the k-th largest
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


def descending_rank_window(magnitude: Tensor, start: int, stop: int) -> Tensor:
    """Mask of the entries of a flat tensor whose rank by decreasing value is in [start, stop).

    Equal values are ranked in index order, so the count is exact. Two `kthvalue` selections
    (O(n), a bool mask of extra memory) instead of a full argsort (8 bytes per entry).
    """
    n = magnitude.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
    if start >= stop:
        return mask
    highest = torch.kthvalue(magnitude, n - start).values  # the value at rank `start`
    lowest = torch.kthvalue(magnitude, n - stop + 1).values  # the value at rank `stop - 1`
    mask |= (magnitude < highest) & (magnitude > lowest)
    for value in (highest,) if bool(highest == lowest) else (highest, lowest):  # .item(): CUDA sync
        tied = (magnitude == value).nonzero().squeeze(1)
        first_rank = int((magnitude > value).sum())
        ranks = torch.arange(first_rank, first_rank + tied.numel(), device=magnitude.device)
        mask[tied[(ranks >= start) & (ranks < stop)]] = True
    return mask


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor | None:
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest `gamma` fraction of |δ|
    (outliers) and then the smallest, so that int(density·numel) entries remain (None = keep all).

    When density + gamma > 1 fewer outliers are dropped, so the density is still met. Earlier
    mergekit versions selected ``sorted[n_bottom:-n_top]``, which is empty when int(gamma·numel)
    = 0 (any tensor under 1/gamma entries, e.g. every norm vector at gamma 0.01) and zeroed that
    whole task vector. Here n_top = 0 keeps the intended largest entries (as mergekit 0.1.5 does).
    """
    if density >= 1.0:
        return None
    n = delta.numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    return descending_rank_window(delta.abs().reshape(-1), top, top + keep).reshape(delta.shape)


# Rows per DELLA chunk: ranking needs two int64 argsorts per entry, so rank a few million
# entries at a time instead of the whole (possibly 500M-entry embedding) tensor.
_DELLA_CHUNK_ENTRIES = 1 << 22


def della_keep_probability(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune (Deep et al. 2024): per row (last dim), the entry of ascending |δ| rank
    r ∈ {0..n−1} is kept with p = (density − ε) + 2ε · r/(n − 1); ties ranked in index order.

    Bigger entries are kept more often; the mean keep-probability is `density`. A row of one
    entry has no ranking: p = density (mergekit divides 0 by 0 there and fails).
    """
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.reshape(1, 1)
    n = rows.shape[1]
    probability = torch.empty(rows.shape, dtype=torch.float32, device=delta.device)
    step = max(1, _DELLA_CHUNK_ENTRIES // max(n, 1))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step].abs()
        order = torch.argsort(chunk, dim=1, stable=True)  # (rows, n): column of rank r
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n, device=delta.device).expand_as(order))
        scaled = rank.to(torch.float32) / (n - 1) if n > 1 else torch.full(chunk.shape, 0.5, device=delta.device)
        probability[start : start + step] = (density - epsilon) + 2 * epsilon * scaled
    return probability.reshape(delta.shape)


def della_mask(delta: Tensor, density: float, epsilon: float, generator: torch.Generator) -> tuple[Tensor | None, Tensor | float]:
    """(mask, keep-probability) for DELLA; draws on the CPU generator like `random_mask`."""
    if density >= 1.0:
        return None, 1.0
    probability = della_keep_probability(delta, density, epsilon)
    draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device="cpu")
    return draws.to(delta.device) < probability, probability.to(delta.dtype)


def apply_mask(delta: Tensor, mask: Tensor | None, rescale: str | None, density: float | Tensor) -> Tensor:
    """δ ⊙ mask, rescaled: `l1` restores ‖δ‖₁ (mergekit), `inverse_p` divides each kept entry by
    its keep-probability (`density`: a number, or DELLA's per-entry tensor)."""
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
MAGNITUDE_OUTLIERS = Sparsifier("magnitude_outliers", random=False)
DELLA_MAGPRUNE = Sparsifier("della_magprune", random=True)


def sparsify(
    delta: Tensor,
    sparsifier: Sparsifier | None,
    density: float,
    rescale: str | None,
    generator,
    *,
    gamma: float = 0.0,
    epsilon: float = 0.0,
) -> Tensor:
    if sparsifier is None:
        return delta
    keep_probability: float | Tensor = density
    if sparsifier is MAGNITUDE:
        mask = magnitude_mask(delta, density)
    elif sparsifier is RANDOM:
        mask = random_mask(delta, density, generator)
    elif sparsifier is MAGNITUDE_OUTLIERS:
        mask = outlier_mask(delta, density, gamma)
    elif sparsifier is DELLA_MAGPRUNE:
        mask, keep_probability = della_mask(delta, density, epsilon, generator)
    else:  # pragma: no cover - the table below lists every sparsifier
        raise AssertionError(sparsifier)
    return apply_mask(delta, mask, rescale, keep_probability)


def consensus_sign(x: Tensor) -> Tensor:
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
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
) -> Tensor:
    """The whole family; see the module docstring. Inputs are never modified."""
    if density is None:
        density = [1.0] * len(tensors)
    gamma = gamma or [0.0] * len(tensors)
    epsilon = epsilon or [0.0] * len(tensors)
    if sparsifier in (MAGNITUDE, MAGNITUDE_OUTLIERS) and any(int(d * base.numel()) == 0 and d < 1 for d in density):
        warnings.warn(f"density keeps 0 entries of a {base.numel()}-entry tensor; that model contributes nothing there")
    # D_i = w_i · sparsify(θ_i − θ_0), computed one model at a time.
    def weighted_delta(i: int) -> Tensor:
        # tensors[i] - base is a fresh tensor, so every later step may work in place.
        delta = sparsify(tensors[i] - base, sparsifier, density[i], rescale, generator, gamma=gamma[i], epsilon=epsilon[i])
        return delta.mul_(weight[i])

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
        direction = consensus_sign(direction)
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


GAMMA = Param("gamma", default=0.01, per_model=True, doc="fraction of the largest |δ| dropped as outliers", check=in_range(0.0, 1.0, high_open=True))
EPSILON = Param("epsilon", default=0.15, per_model=True, doc="keep-probabilities span density ± epsilon by magnitude rank", check=in_range(0.0, 1.0, high_open=True))


def _rescale_param(default: bool) -> Param:
    return Param("rescale", default=default, kind=object, choices=(True, False, "l1", "inverse_p"), doc="rescale kept entries: l1 (= true) keeps ‖δ‖₁, inverse_p divides by the keep-probability")


def check_della_range(params: dict[str, Any], models: Sequence[str]) -> str | None:
    """DELLA's keep-probabilities (density − ε .. density + ε) must be probabilities: 0 < density ± ε < 1.

    Density 1 means no pruning, so epsilon does not matter there (as in mergekit).
    """
    for model, density, epsilon in zip(models, params["density"], params["epsilon"]):
        if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
            return (
                f"density {density:g} ± epsilon {epsilon:g} for {model} leaves (0, 1); "
                f"keep-probabilities must stay inside it: use epsilon < {min(density, 1 - density):g}"
            )
    return None


@dataclass(frozen=True)
class FamilyRow:
    name: str
    consensus: bool
    sparsifier: Sparsifier | None
    normalize: bool
    rescale: bool | None  # None: the method has no rescale parameter
    reference: str
    doc: str
    extra: tuple[Param, ...] = ()  # the sparsifier's own parameters
    check: Callable[[dict[str, Any], Sequence[str]], str | None] | None = None
    vs_mergekit: str = ""


_BREADCRUMBS_VS_MERGEKIT = (
    "Equal |δ| at a cut are ranked by index (mergekit's unstable sort picks any). Earlier mergekit versions "
    "zeroed the whole task vector when int(gamma·numel) = 0 (tensors under 1/gamma entries, e.g. norms at "
    "gamma 0.01); we keep the density's largest entries there, as mergekit 0.1.5 does. rescale also takes inverse_p."
)
_DELLA_VS_MERGEKIT = (
    "rescale: inverse_p divides each kept entry by its own keep-probability (the paper's rescaling); "
    "a row of one entry gets p = density where mergekit divides by zero; rows are the last dim of any-rank tensors."
)

# METHODS.md's table, row for row.
FAMILY: tuple[FamilyRow, ...] = (
    FamilyRow("task_arithmetic", False, None, False, None, "https://arxiv.org/abs/2212.04089", "Task arithmetic (Ilharco et al. 2023): θ_0 + λ Σ w_i δ_i."),
    FamilyRow("ties", True, MAGNITUDE, True, None, "https://arxiv.org/abs/2306.01708", "TIES (Yadav et al. 2023): trim to the largest |δ|, elect signs, average the agreeing entries."),
    FamilyRow("dare_linear", False, RANDOM, False, True, "https://arxiv.org/abs/2311.03099", "DARE (Yu et al. 2024): drop entries at random, rescale, add."),
    FamilyRow("dare_ties", True, RANDOM, False, True, "https://arxiv.org/abs/2311.03099", "DARE drop-and-rescale followed by TIES sign consensus."),
    FamilyRow(
        "breadcrumbs", False, MAGNITUDE_OUTLIERS, False, False, "https://arxiv.org/abs/2312.06795",
        "Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest (gamma) and smallest |δ|, keep density, add.",
        extra=(GAMMA,), vs_mergekit=_BREADCRUMBS_VS_MERGEKIT,
    ),
    FamilyRow(
        "breadcrumbs_ties", True, MAGNITUDE_OUTLIERS, False, False, "https://arxiv.org/abs/2312.06795",
        "Model Breadcrumbs' outlier-and-small-entry pruning followed by TIES sign consensus.",
        extra=(GAMMA,), vs_mergekit=_BREADCRUMBS_VS_MERGEKIT,
    ),
    FamilyRow(
        "della", True, DELLA_MAGPRUNE, True, True, "https://arxiv.org/abs/2406.11617",
        "DELLA (Deep et al. 2024): drop entries at random, bigger |δ| kept more often (MagPrune), rescale, elect signs, average.",
        extra=(EPSILON,), check=check_della_range, vs_mergekit=_DELLA_VS_MERGEKIT,
    ),
    FamilyRow(
        "della_linear", False, DELLA_MAGPRUNE, False, True, "https://arxiv.org/abs/2406.11617",
        "DELLA's MagPrune drop-and-rescale, then a weighted sum of the task vectors (no sign election).",
        extra=(EPSILON,), check=check_della_range, vs_mergekit=_DELLA_VS_MERGEKIT,
    ),
)


def _family_method(row: FamilyRow) -> MergeMethod:
    params = [WEIGHT, LAMBDA, Param("normalize", default=row.normalize, kind=bool, doc="divide by the (agreeing) weight sum")]
    if row.sparsifier is not None:
        params[1:1] = [DENSITY, *row.extra]
    if row.consensus:
        params += [CONSENSUS, INT8_MASK]
    if row.rescale is not None:
        params.append(_rescale_param(row.rescale))

    def fn(
        tensors: list[Tensor],
        *,
        base: Tensor,
        generator=None,
        weight,
        lambda_,
        normalize,
        density=None,
        gamma=None,
        epsilon=None,
        consensus_method="sum",
        int8_mask=False,  # masks are bool here already: 1 byte, what int8 buys mergekit
        rescale=None,
    ) -> Tensor:
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
            gamma=gamma,
            epsilon=epsilon,
        )

    fn.__doc__ = row.doc
    return merge_method(
        row.name,
        params=params,
        base="required",
        randomized=bool(row.sparsifier and row.sparsifier.random),
        reference=row.reference,
        vs_mergekit=row.vs_mergekit,
        check=row.check,
    )(fn)


FAMILY_METHODS: tuple[MergeMethod, ...] = tuple(_family_method(row) for row in FAMILY)
