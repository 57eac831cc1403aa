"""The task-vector family's sparsifiers: which entries of a task vector δ are kept.

magnitude (TIES: the k largest |δ|), random (DARE: keep with probability density),
magnitude_outliers (Breadcrumbs: drop the top gamma fraction, then the smallest), della_magprune
(DELLA: keep-probability density ± epsilon by per-row magnitude rank); `make_sparsifier` picks one
per model and tensor. Each runs its statistics passes, then drops entries block by block: ties at
a threshold are taken in index order and random draws come from one generator per model, drawn
in index order, so the kept entries do not depend on the block size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from modelalloy.methods import kernels
from modelalloy.methods.blockwise import TensorSpec
from modelalloy.methods.radix_select import RadixSelect


@dataclass(frozen=True)
class FusedKeep:
    """What `kernels.merge_block` needs of one model's sparsifier for one block: a `kernels`
    keep code; the two thresholds' comparison codes and values and the tie windows (value, skip,
    stop) with their running counts `tie_seen` (the sparsifier's own array: the merge writes the
    kernel's counts back), or a mask as packed bits (`np.packbits`' layout); the keep-probability
    that inverse_p divides by."""

    code: int
    keep_probability: float = 1.0
    low_compare: int = kernels.NO_COMPARE
    low: float = 0.0
    high_compare: int = kernels.NO_COMPARE
    high: float = 0.0
    tie_windows: tuple[tuple[float, int, int], ...] = ()
    tie_seen: np.ndarray | None = None
    mask: np.ndarray | None = None


_COMPARE_CODES = {torch.ge: kernels.GREATER_EQUAL, torch.gt: kernels.GREATER}


class Sparsifier:
    """One model's sparsifier for one tensor: `passes` statistics passes over |δ| (`observe`),
    then `sparsify_(δ)` block by block in index order, once per pass that needs the kept entries
    (each such pass begins with `start`, which rewinds counters and random draws).

    Masks are float 0/1 tensors made by comparisons with a float `out=`: a bool tensor costs 4×
    more to write and to multiply by on the CPU (measured: 0.2 vs 1.3 ns per entry).
    """

    passes = 0
    drops = False  # False: keeps every entry (no rescale either)
    fusable = True  # has a `fused_keep` for every block
    # Its first statistics pass shows whether |δ| held a NaN or Inf (`saw_nonfinite` after it).
    finds_nonfinite = False

    def start(self, step: int) -> None:
        pass

    def observe(self, delta: Tensor) -> None:
        pass

    def observe_difference(self, x: Tensor, base: Tensor) -> None:
        """`observe(x − base)`; a sparsifier may fuse the two."""
        self.observe(x - base)

    def fused_keep(self, x: Tensor, base: Tensor) -> FusedKeep:
        """In place of `sparsify_(x − base)` for the fused kernel: how this block is kept."""
        return FusedKeep(kernels.KEEP_ALL)

    def sparsify_(self, delta: Tensor) -> float | Tensor:
        """Zero the dropped entries of `delta` in place; returns the keep-probability (a number
        or a per-entry tensor) for the inverse_p rescale."""
        return 1.0

    def l1_sums(self, x: Tensor, base: Tensor, dtype: torch.dtype) -> tuple[float, float]:
        """‖δ‖₁ of this block (δ = x − base in the compute `dtype`: the blocks may be bf16 as
        stored) before and after `sparsify_`: the l1 rescale's pass."""
        delta = x.to(dtype) - base.to(dtype)
        before = float(delta.abs().sum(dtype=torch.float64))
        self.sparsify_(delta)
        return before, float(delta.abs().sum(dtype=torch.float64))

    def fused_l1_sums(self, x: Tensor, base: Tensor) -> tuple[float, float]:
        """`l1_sums` computing in float32 on the CPU (the fused path); a sparsifier may fuse it."""
        return self.l1_sums(x, base, torch.float32)


class DropAll(Sparsifier):
    """A density that keeps no entry of this tensor."""

    drops = True

    def sparsify_(self, delta: Tensor) -> float | Tensor:
        delta.zero_()
        return 1.0

    def fused_keep(self, x: Tensor, base: Tensor) -> FusedKeep:
        return FusedKeep(kernels.DROP_ALL)


class RankWindow(Sparsifier):
    """Keep the entries whose rank by decreasing |δ| is in [first, stop): equal |δ| are ranked in
    index order, so exactly stop − first entries are kept. TIES keeps ranks [0, k); Breadcrumbs
    drops the largest `gamma` fraction first. Thresholds by `RadixSelect` (no sort).

    Entries strictly between the two threshold values are kept by two comparisons; entries equal
    to a threshold are looked up by index only where some of them are kept and others dropped,
    and only until the last of those is passed."""

    drops = True
    finds_nonfinite = True

    def __init__(self, first: int, stop: int, dtype: torch.dtype, density: float) -> None:
        self.first, self.stop, self.density = first, stop, density
        # The values at rank `stop - 1` (the smallest kept) and, when the window does not start at
        # the top, at rank `first` (the largest kept): TIES (first = 0) needs one select, not two.
        self.select = RadixSelect([stop, first + 1] if first > 0 else [stop], dtype)
        self.passes = self.select.passes

    def start(self, step: int) -> None:
        if step < self.passes:
            self.select.start(step)
            return
        if step == self.passes:
            self.select.finish()
            self._cuts()
        self.seen = np.zeros(len(self.windows), dtype=np.int64)

    def _cuts(self) -> None:
        """Comparisons that keep the untied entries, and the tied entries to keep by index:
        `windows` of (value, skip, count): of the entries equal to value, in index order, skip
        `skip` and keep the next `count`."""
        low, above_low, equal_low = self.select.value[0], self.select.above[0], self.select.equal[0]
        self.lower: tuple[Callable, float] | None = None
        self.upper: tuple[Callable, float] | None = None
        self.windows: list[tuple[float, int, int]] = []
        if self.first > 0:
            high, above_high, equal_high = self.select.value[1], self.select.above[1], self.select.equal[1]
            if high == low:  # every kept entry ties at one value
                self.windows.append((high, self.first - above_high, self.stop - self.first))
                return
        keep_low = self.stop - above_low
        if keep_low == equal_low:
            self.lower = (torch.ge, low)
        else:
            self.lower = (torch.gt, low)
            self.windows.append((low, 0, keep_low))
        if self.first > 0:
            skip_high = self.first - above_high
            if skip_high == 0:
                self.upper = (torch.gt, high)
            else:
                self.upper = (torch.ge, high)
                self.windows.append((high, skip_high, equal_high - skip_high))

    @property
    def saw_nonfinite(self) -> bool:
        return self.select.saw_nonfinite

    def observe(self, delta: Tensor) -> None:
        self.select.observe(delta.abs())

    def observe_difference(self, x: Tensor, base: Tensor) -> None:
        self.select.observe_difference(x, base)

    def fused_keep(self, x: Tensor, base: Tensor) -> FusedKeep:
        ties = tuple((value, skip, skip + count) for value, skip, count in self.windows)
        low_compare, low = (_COMPARE_CODES[self.lower[0]], self.lower[1]) if self.lower else (kernels.NO_COMPARE, 0.0)
        high_compare, high = (_COMPARE_CODES[self.upper[0]], self.upper[1]) if self.upper else (kernels.NO_COMPARE, 0.0)
        return FusedKeep(kernels.KEEP_BY_THRESHOLDS, self.density, low_compare, low, high_compare, high, ties, self.seen)

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
    """DARE: keep each entry with probability `density`. Drawn on the CPU (the same mask whatever
    device computes), one generator per model, in index order: torch.rand's draws on a CPU
    generator of the model's seed (`kernels.UniformDraws`, 0.46 ns an entry against torch's 4.0).

    With `reuse_masks` (the l1 rescale: its pass and the output pass need the same masks), the
    first pass keeps each block's mask as packed bits (1/32 of the block's size) and the second
    replays them: unpacking costs 0.25 ns an entry."""

    drops = True

    def __init__(self, density: float, seed: int) -> None:
        self.density, self.seed = density, seed
        self.reuse_masks = False
        self._recorded: list[np.ndarray] | None = None
        self._replay: list[np.ndarray] | None = None

    def start(self, step: int) -> None:
        self.draws = kernels.UniformDraws(self.seed)  # torch.rand's, on a CPU generator of this seed
        if self.reuse_masks:
            if self._recorded is None:
                self._recorded = []
            else:
                self._replay, self._recorded = self._recorded, None
                self._replay.reverse()  # popped from the end, in block order

    @property
    def replaying(self) -> bool:
        return self._replay is not None

    def keep_mask(self, shape: torch.Size, probability: float | Tensor) -> Tensor:
        """The next block's mask [u < probability] on the CPU, u uniform float32 draws (compared
        in float32): float32 0/1, or uint8 0/1 when replayed."""
        if self._replay is not None:
            return torch.from_numpy(np.unpackbits(self._replay.pop(), count=shape.numel())).reshape(shape)
        draws = self.draws.draw(shape)
        if isinstance(probability, Tensor):
            probability = probability.to(device="cpu", dtype=torch.float32)
        mask = torch.lt(draws, probability, out=draws)
        if self._recorded is not None:
            self._recorded.append(np.packbits(mask.numpy().reshape(-1).astype(bool)))
        return mask

    def fused_l1_sums(self, x: Tensor, base: Tensor) -> tuple[float, float]:
        """With the masks recorded for the output pass: the same draws and masks, and the sums,
        in one pass (`kernels.l1_sums_with_mask_bits`: 1.1 ns an entry plus 0.46 for the draws;
        the torch form 8.2)."""
        if self._recorded is None:
            return super().fused_l1_sums(x, base)
        draws = self.draws.draw(x.shape)
        bits = np.empty(-(-x.numel() // 8), dtype=np.uint8)
        scratch = kernels.scratch(2 * min(x.numel(), kernels.TILE))
        sums = kernels.l1_sums_with_mask_bits(kernels.kernel_array(x), kernels.kernel_array(base), draws.reshape(-1).numpy(), np.float32(self.density), bits, scratch)
        self._recorded.append(bits)
        return sums

    def keep_where_below(self, delta: Tensor, probability: float | Tensor) -> None:
        """δ ⊙ [u < probability] (`keep_mask`)."""
        delta.mul_(self.keep_mask(delta.shape, probability).to(device=delta.device, dtype=delta.dtype))

    def sparsify_(self, delta: Tensor) -> float | Tensor:
        self.keep_where_below(delta, self.density)
        return self.density

    def fused_keep(self, x: Tensor, base: Tensor) -> FusedKeep:
        """The block's mask as packed bits: replayed as `fused_l1_sums` recorded it, or drawn and packed."""
        if self._replay is not None:
            return FusedKeep(kernels.KEEP_BY_MASK, self.density, mask=self._replay.pop())
        bits = np.empty(-(-x.numel() // 8), dtype=np.uint8)
        kernels.mask_bits_below(self.draws.draw(x.shape).reshape(-1).numpy(), np.float32(self.density), bits)
        return FusedKeep(kernels.KEEP_BY_MASK, self.density, mask=bits)


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

    fusable = False  # per-entry keep-probabilities: the torch path

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
    raise AssertionError(kind)  # pragma: no cover - the family's table uses only the kinds above
