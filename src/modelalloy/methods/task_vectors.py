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

Everything after the sparsifiers' whole-tensor statistics is elementwise, so the family runs in
row blocks (`methods/blockwise.py`): magnitude thresholds come from a streamed radix select
(statistics passes), ‖δ‖₁ for the l1 rescale from one more pass, and the output pass applies them
block by block. Ties at a threshold are taken in index order and random draws come from one
generator per model (seed + model index, drawn in index order), so the result does not depend
on the block size. Never more than a block of each task vector is alive.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modelalloy.methods.blockwise import Block, BlockMerge, TensorSpec
from modelalloy.methods.registry import MergeMethod, Param, in_range, merge_method

_DIVISOR_EPS = 1e-8
_RESCALE_EPS = 1e-7


_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_DIGIT = 16  # radix digit width: 65536 bins per pass


class RadixSelect:
    """The k-th largest entry (1-based) of non-negative floats streamed in blocks, for several k.

    Radix select on the bit patterns: for floats ≥ 0 the order of the values is the order of their
    bits read as integers, so a histogram of the top 16 bits finds the bin holding the k-th
    largest, and a histogram of the next 16 bits among that bin's entries finishes the job: one
    pass over the data per 16 bits (2 for float32, 4 for float64), O(n), where a sort or
    kthvalue's quickselect needs the whole tensor in memory and dominated a whole TIES merge.

    Per pass: `start(step)`, `observe(block)` for every block, and after the last pass `finish()`;
    then `value[t]` is the k-th largest for `ks[t]`, `above[t]` how many entries exceed it and
    `equal[t]` how many equal it.
    """

    def __init__(self, ks: Sequence[int], dtype: torch.dtype) -> None:
        self.ks = list(ks)
        self.int_dtype = _INT_OF[dtype]
        self.dtype = dtype
        self.width = dtype.itemsize * 8
        self.shifts = list(range(max(self.width - _DIGIT, 0), -1, -_DIGIT))
        self.passes = len(self.shifts)
        self._found = [0] * len(self.ks)  # the bits found so far, per target
        self._remaining = list(self.ks)  # rank still to go inside the current prefix
        self._counts: dict[int, Tensor] = {}  # prefix -> histogram of the current digit
        self._equal = [0] * len(self.ks)
        self._step = -1

    def start(self, step: int) -> None:
        if self._step >= 0:
            self._settle()
        self._step = step
        self._counts = {}

    def observe(self, magnitude: Tensor) -> None:
        bits = magnitude.reshape(-1).view(self.int_dtype)
        shift = self.shifts[self._step]
        for prefix in dict.fromkeys(self._found):
            if self._step == 0:
                chosen = bits
            else:  # only the entries that share the prefix found so far
                high = shift + _DIGIT
                chosen = bits[(bits >> high) == (prefix >> high)]
            digit = chosen >> shift if self._step == 0 else (chosen >> shift) & (2**_DIGIT - 1)
            counts = torch.bincount(digit.to(torch.int64) if digit.dtype == torch.int16 else digit, minlength=2**_DIGIT)
            if prefix in self._counts:
                self._counts[prefix] += counts
            else:
                self._counts[prefix] = counts

    def _settle(self) -> None:
        """Fix this pass's digit of every target from its histogram."""
        shift = self.shifts[self._step]
        for t, prefix in enumerate(self._found):
            counts = self._counts.get(prefix)
            if counts is None:
                counts = torch.zeros(2**_DIGIT, dtype=torch.int64)
            at_or_above = counts.flip(0).cumsum(0)  # [j] = entries whose digit is ≥ 2^16-1-j
            j = int(torch.searchsorted(at_or_above, self._remaining[t]))
            if j:
                self._remaining[t] -= int(at_or_above[j - 1])
            self._found[t] = prefix | ((2**_DIGIT - 1 - j) << shift)
            if shift == 0:  # every bit is fixed: this bin holds exactly the entries equal to the value
                self._equal[t] = int(counts[2**_DIGIT - 1 - j])

    def finish(self) -> None:
        self._settle()
        self._step = -1
        self.value = [float(torch.tensor(f, dtype=self.int_dtype).view(self.dtype)) for f in self._found]
        self.above = [k - r for k, r in zip(self.ks, self._remaining)]
        self.equal = list(self._equal)


def kth_largest_magnitude(magnitude: Tensor, k: int) -> Tensor:
    """The k-th largest entry (1-based) of a flat tensor of non-negative floats, exactly
    (what `torch.kthvalue(magnitude, n - k + 1)` returns), by `RadixSelect` in one block."""
    select = RadixSelect([k], magnitude.dtype)
    for step in range(select.passes):
        select.start(step)
        select.observe(magnitude)
    select.finish()
    return torch.tensor(select.value[0], dtype=magnitude.dtype, device=magnitude.device)


class Sparsifier:
    """One model's sparsifier for one tensor: `passes` statistics passes over |δ| (`observe`),
    then `sparsify_(δ)` block by block in index order, once per pass that needs the kept entries
    (each such pass begins with `start`, which rewinds counters and random draws).

    Masks are float 0/1 tensors made by comparisons with a float `out=`: a bool tensor costs 4×
    more to write and to multiply by on the CPU (measured: 0.2 vs 1.3 ns per entry).
    """

    passes = 0
    drops = False  # False: keeps every entry (no rescale either)

    def start(self, step: int) -> None:
        pass

    def observe(self, delta: Tensor) -> None:
        pass

    def sparsify_(self, delta: Tensor) -> float | Tensor:
        """Zero the dropped entries of `delta` in place; returns the keep-probability (a number
        or a per-entry tensor) for the inverse_p rescale."""
        return 1.0


class DropAll(Sparsifier):
    """A density that keeps no entry of this tensor."""

    drops = True

    def sparsify_(self, delta: Tensor) -> float | Tensor:
        delta.zero_()
        return 1.0


class RankWindow(Sparsifier):
    """Keep the entries whose rank by decreasing |δ| is in [first, stop): equal |δ| are ranked in
    index order, so exactly stop − first entries are kept. TIES keeps ranks [0, k); Breadcrumbs
    drops the largest `gamma` fraction first. Thresholds by `RadixSelect` (no sort).

    Entries strictly between the two threshold values are kept by two comparisons; entries equal
    to a threshold are looked up by index only where some of them are kept and others dropped,
    and only until the last of those is passed."""

    drops = True

    def __init__(self, first: int, stop: int, dtype: torch.dtype, density: float) -> None:
        self.first, self.stop, self.density = first, stop, density
        # The values at rank `first` (the largest kept) and at rank `stop - 1` (the smallest kept).
        self.select = RadixSelect([first + 1, stop], dtype)
        self.passes = self.select.passes

    def start(self, step: int) -> None:
        if step < self.passes:
            self.select.start(step)
            return
        if step == self.passes:
            self.select.finish()
            self._cuts()
        self.seen = [0] * len(self.windows)

    def _cuts(self) -> None:
        """Comparisons that keep the untied entries, and the tied entries to keep by index:
        `windows` of (value, skip, count): of the entries equal to value, in index order, skip
        `skip` and keep the next `count`."""
        (high, low), (above_high, above_low), (equal_high, equal_low) = self.select.value, self.select.above, self.select.equal
        self.lower: tuple[Callable, float] | None = None
        self.upper: tuple[Callable, float] | None = None
        self.windows: list[tuple[float, int, int]] = []
        if high == low:  # every kept entry ties at one value
            self.windows.append((high, self.first - above_high, self.stop - self.first))
            return
        keep_low = self.stop - above_low
        if keep_low == equal_low:
            self.lower = (torch.ge, low)
        else:
            self.lower = (torch.gt, low)
            self.windows.append((low, 0, keep_low))
        skip_high = self.first - above_high
        if self.first > 0:
            if skip_high == 0:
                self.upper = (torch.gt, high)
            else:
                self.upper = (torch.ge, high)
                self.windows.append((high, skip_high, equal_high - skip_high))

    def observe(self, delta: Tensor) -> None:
        self.select.observe(delta.abs())

    def keep(self, magnitude: Tensor) -> Tensor:
        """The 0/1 mask (magnitude's dtype) of this block's kept entries."""
        mask = torch.empty_like(magnitude)
        if self.lower is None:
            mask.zero_()
        else:
            compare, value = self.lower
            compare(magnitude, value, out=mask)
        if self.upper is not None:
            compare, value = self.upper
            mask.sub_(compare(magnitude, value, out=torch.empty_like(magnitude)))
        flat = mask.view(-1)
        for w, (value, skip, count) in enumerate(self.windows):
            if self.seen[w] >= skip + count:
                continue
            tied = (magnitude.reshape(-1) == value).nonzero().squeeze(1)
            position = torch.arange(self.seen[w], self.seen[w] + tied.numel(), device=magnitude.device)
            flat[tied[(position >= skip) & (position < skip + count)]] = 1.0
            self.seen[w] += tied.numel()
        return mask

    def sparsify_(self, delta: Tensor) -> float | Tensor:
        delta.mul_(self.keep(delta.abs()))
        return self.density


class RandomKeep(Sparsifier):
    """DARE: keep each entry with probability `density`. Drawn on a CPU generator (the same mask
    whatever device computes), one generator per model, in index order.

    With `reuse_masks` (the l1 rescale: its pass and the output pass need the same masks), the
    first pass keeps each block's mask as packed bits (1/32 of the block's size) and the second
    replays them: drawing costs 3 ns an entry, unpacking 0.25."""

    drops = True

    def __init__(self, density: float, seed: int) -> None:
        self.density, self.seed = density, seed
        self.reuse_masks = False
        self._recorded: list[np.ndarray] | None = None
        self._replay: list[np.ndarray] | None = None

    def start(self, step: int) -> None:
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        if self.reuse_masks:
            if self._recorded is None:
                self._recorded = []
            else:
                self._replay, self._recorded = self._recorded, None
                self._replay.reverse()  # popped from the end, in block order

    @property
    def replaying(self) -> bool:
        return self._replay is not None

    def keep_where_below(self, delta: Tensor, probability: float | Tensor) -> None:
        """δ ⊙ [u < probability], u uniform float32 draws (compared in float32, on the CPU)."""
        if self._replay is not None:
            bits = np.unpackbits(self._replay.pop(), count=delta.numel())
            delta.mul_(torch.from_numpy(bits).reshape(delta.shape).to(delta.device))
            return
        draws = torch.rand(delta.shape, generator=self.generator, dtype=torch.float32, device="cpu")
        if isinstance(probability, Tensor):
            probability = probability.to(device="cpu", dtype=torch.float32)
        mask = torch.lt(draws, probability, out=draws)
        if self._recorded is not None:
            self._recorded.append(np.packbits(mask.numpy().reshape(-1).astype(bool)))
        delta.mul_(mask.to(device=delta.device, dtype=delta.dtype))

    def sparsify_(self, delta: Tensor) -> float | Tensor:
        self.keep_where_below(delta, self.density)
        return self.density


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


class DellaKeep(RandomKeep):
    """DELLA's MagPrune: per-row keep-probabilities by magnitude rank (blocks are whole rows)."""

    def __init__(self, density: float, epsilon: float, seed: int) -> None:
        super().__init__(density, seed)
        self.epsilon = epsilon

    def sparsify_(self, delta: Tensor) -> float | Tensor:
        if self.replaying:  # the l1 rescale's output pass: the recorded masks, no ranking needed
            self.keep_where_below(delta, self.density)
            return self.density
        probability = della_keep_probability(delta, self.density, self.epsilon)
        self.keep_where_below(delta, probability)
        return probability.to(delta.dtype)


def descending_rank_window(magnitude: Tensor, start: int, stop: int) -> Tensor:
    """Mask of the entries of a flat tensor whose rank by decreasing value is in [start, stop)
    (equal values ranked in index order; entries ≥ 0): `RankWindow` in one block."""
    if start >= stop:
        return torch.zeros(magnitude.numel(), dtype=torch.bool, device=magnitude.device)
    window = RankWindow(start, stop, magnitude.dtype, 1.0)
    for step in range(window.passes):
        window.start(step)
        window.observe(magnitude)
    window.start(window.passes)
    return window.keep(magnitude) > 0


def magnitude_mask(delta: Tensor, density: float) -> Tensor | None:
    """Mask keeping exactly k = int(density·numel) largest |δ| (None = keep all); ties in index order."""
    if density >= 1.0:
        return None
    return descending_rank_window(delta.abs().reshape(-1), 0, int(density * delta.numel())).reshape(delta.shape)


@dataclass(frozen=True)
class SparsifierKind:
    name: str
    random: bool


MAGNITUDE = SparsifierKind("magnitude", random=False)
RANDOM = SparsifierKind("random", random=True)
MAGNITUDE_OUTLIERS = SparsifierKind("magnitude_outliers", random=False)
DELLA_MAGPRUNE = SparsifierKind("della_magprune", random=True)


def make_sparsifier(kind: SparsifierKind | None, spec: TensorSpec, density: float, *, gamma: float, epsilon: float, seed: int) -> Sparsifier:
    n = spec.numel
    if kind is None or density >= 1.0:
        return Sparsifier()
    if kind is RANDOM:
        return RandomKeep(density, seed)
    if kind is DELLA_MAGPRUNE:
        return DellaKeep(density, epsilon, seed)
    keep = int(density * n)
    if keep == 0:
        return DropAll()
    if kind is MAGNITUDE:
        return RankWindow(0, keep, spec.dtype, density)
    if kind is MAGNITUDE_OUTLIERS:
        # Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest `gamma` fraction of |δ|
        # (outliers), then the smallest, so that int(density·numel) remain. When density + gamma
        # > 1 fewer outliers are dropped, so the density is still met. Earlier mergekit versions
        # selected ``sorted[n_bottom:-n_top]``, empty when int(gamma·numel) = 0 (any tensor under
        # 1/gamma entries, e.g. every norm at gamma 0.01), which zeroed that whole task vector;
        # here n_top = 0 keeps the intended largest entries (as mergekit 0.1.5 does).
        top = min(int(gamma * n), n - keep)
        return RankWindow(top, top + keep, spec.dtype, density)
    raise AssertionError(kind)  # pragma: no cover - the table below lists every kind


def consensus_sign(x: Tensor) -> Tensor:
    """sign with 0 counted as +1 (the consensus direction is never 0)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class TaskVectorMerge(BlockMerge):
    """The whole family for one tensor; see the module docstring. Inputs are never modified."""

    def __init__(
        self,
        spec: TensorSpec,
        *,
        weight: list[float],
        density: list[float] | None,
        lambda_: float,
        consensus: str | None,
        sparsifier: SparsifierKind | None,
        normalize: bool,
        rescale: str | None,
        seed: int = 0,
        gamma: list[float] | None = None,
        epsilon: list[float] | None = None,
    ) -> None:
        count = len(weight)
        density = density or [1.0] * count
        gamma = gamma or [0.0] * count
        epsilon = epsilon or [0.0] * count
        if sparsifier in (MAGNITUDE, MAGNITUDE_OUTLIERS) and spec.numel and any(int(d * spec.numel) == 0 and d < 1 for d in density):
            warnings.warn(f"density keeps 0 entries of a {spec.numel}-entry tensor; that model contributes nothing there")
        self.sparsifiers = [
            make_sparsifier(sparsifier, spec, density[i], gamma=gamma[i], epsilon=epsilon[i], seed=(seed + i) & (2**63 - 1)) for i in range(count)
        ]
        self.weight, self.lambda_, self.consensus, self.normalize, self.rescale = weight, lambda_, consensus, normalize, rescale
        self.statistics_passes = max(s.passes for s in self.sparsifiers)
        self.l1 = rescale == "l1" and sparsifier is not None
        for s in self.sparsifiers:
            if isinstance(s, RandomKeep):
                s.reuse_masks = self.l1
        self.passes = self.statistics_passes + self.l1  # the l1 rescale needs ‖δ‖₁ before and after the mask
        self.scale = [1.0] * count

    def start(self, step: int) -> None:
        self.step = step
        if self.l1 and step == self.passes:  # the l1 pass is over
            self.scale = [b / a if b > _RESCALE_EPS and a > _RESCALE_EPS else 1.0 for b, a in zip(self.before, self.after)]
        for s in self.sparsifiers:
            s.start(step)
        if self.l1 and step == self.statistics_passes:
            self.before = [0.0] * len(self.sparsifiers)
            self.after = [0.0] * len(self.sparsifiers)

    def observe(self, block: Block) -> None:
        for i, (x, s) in enumerate(zip(block.inputs, self.sparsifiers)):
            delta = x - block.base
            if self.step < s.passes:
                s.observe(delta)
            elif self.step == self.statistics_passes and s.drops:  # the l1 pass
                self.before[i] += float(delta.abs().sum(dtype=torch.float64))
                s.sparsify_(delta)
                self.after[i] += float(delta.abs().sum(dtype=torch.float64))

    def _weighted_delta(self, i: int, x: Tensor, base: Tensor) -> Tensor:
        """D_i = w_i · rescaled(δ_i ⊙ mask_i); a fresh tensor (later steps work in place)."""
        delta = x - base
        sparsifier = self.sparsifiers[i]
        keep_probability = sparsifier.sparsify_(delta)
        if sparsifier.drops:
            if self.rescale == "l1":
                delta.mul_(self.scale[i])
            elif self.rescale == "inverse_p":
                delta.div_(keep_probability)
        return delta.mul_(self.weight[i])

    def output(self, block: Block) -> Tensor:
        base, weight = block.base, self.weight
        if self.consensus is None:
            mixed = self._weighted_delta(0, block.inputs[0], base)
            for i, x in enumerate(block.inputs[1:], start=1):
                mixed.add_(self._weighted_delta(i, x, base))
            divisor: Any = sum(weight)
            if abs(divisor) < _DIVISOR_EPS:
                divisor = 1.0
        else:
            deltas = [self._weighted_delta(i, x, base) for i, x in enumerate(block.inputs)]
            direction = deltas[0].clone() if self.consensus == "sum" else torch.sign(deltas[0])
            for d in deltas[1:]:
                direction.add_(d if self.consensus == "sum" else torch.sign(d))  # count: the majority of signs, not of mass
            # The elected sign as ±1, zeros counting as + (a −0.0 sum only comes from all-zero
            # entries, which agree with no sign anyway). An entry agrees when D_i·s > 0: summing
            # relu(D_i·s) and multiplying by s gives Σ m_i D_i exactly, with no bool masks.
            sign = torch.copysign(torch.ones_like(direction), direction, out=direction)
            mixed = torch.zeros_like(base)
            divisor = torch.zeros_like(base) if self.normalize else None
            for w, d in zip(weight, deltas):
                agreeing = d.mul_(sign).clamp_min_(0)
                mixed.add_(agreeing)
                if divisor is not None:
                    divisor.add_(torch.gt(agreeing, 0, out=agreeing), alpha=w)
            mixed.mul_(sign)
            del deltas, direction, sign
            if divisor is not None:
                if min(weight) >= _DIVISOR_EPS:  # the divisor is 0 (where nothing agrees, and mixed is 0) or ≥ the least weight
                    divisor.clamp_min_(_DIVISOR_EPS)
                else:
                    divisor.masked_fill_(divisor.abs() < _DIVISOR_EPS, 1.0)
        if self.normalize:
            mixed = mixed.div_(divisor)
        if self.lambda_ != 1.0:
            mixed.mul_(self.lambda_)
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
    sparsifier: SparsifierKind | None
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
        spec: TensorSpec,
        *,
        seed=0,
        weight,
        lambda_,
        normalize,
        density=None,
        gamma=None,
        epsilon=None,
        consensus_method="sum",
        int8_mask=False,  # masks are bool here already: 1 byte, what int8 buys mergekit
        rescale=None,
    ) -> TaskVectorMerge:
        return TaskVectorMerge(
            spec,
            weight=weight,
            density=density,
            lambda_=lambda_,
            consensus=consensus_method if row.consensus else None,
            sparsifier=row.sparsifier,
            normalize=normalize,
            rescale={True: "l1", False: None, None: None}.get(rescale, rescale),
            seed=seed,
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
        blockwise=True,
    )(fn)


FAMILY_METHODS: tuple[MergeMethod, ...] = tuple(_family_method(row) for row in FAMILY)
