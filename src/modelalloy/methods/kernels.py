"""Fused CPU kernels for the task-vector family's float32 blocks (numba).

The torch path (`task_vector_merge.py`, `sparsifiers.py`, `radix_select.py`) runs a dozen
elementwise operations per model over each block, each writing a temporary; these kernels make
one pass over a block's entries with the same float32 operations in the same order, so their
results are bit-identical (tests compare them on many tensors). They cover the float32 compute
dtype on the CPU (the default): a 16-bit compute dtype, CUDA, the majority-count consensus and
DELLA's per-entry keep-probabilities keep the torch path.

Inputs may be float32 arrays or bfloat16 bits (uint16 arrays: the stored bytes of a bf16
checkpoint, widened in the kernel exactly as torch's conversion does), so a merge of bf16 models
computing in float32 never materialises float32 copies of its inputs.

The kernels are serial and release the GIL: the engine's workers run one per core.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

# How a model's entry is kept before the weights (`merge_block`'s `keep` codes).
KEEP_ALL = 0  # no sparsifier: δ as it is
KEEP_BY_THRESHOLDS = 1  # RankWindow without ties to resolve here: the two comparisons
KEEP_BY_MASK = 2  # a given mask as packed bits (DARE's draws; `np.packbits`' layout): δ · mask
DROP_ALL = 3  # zeroed (a density that keeps no entry)

# Comparison codes of a threshold.
NO_COMPARE, GREATER_EQUAL, GREATER = 0, 1, 2

# Rescales after dropping (`rescale` codes).
RESCALE_NONE, RESCALE_SCALE, RESCALE_DIVIDE = 0, 1, 2

def kernel_array(t: torch.Tensor) -> np.ndarray:
    """A CPU float32 or bfloat16 tensor as a flat array the kernels read (bf16 as its uint16 bits);
    no copy when it is contiguous."""
    flat = t.detach().reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy()


KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what `kernel_array` takes

_scratch = threading.local()


def scratch(entries: int) -> np.ndarray:
    """A float32 buffer of `entries` for this thread's kernels, reused from call to call (a fresh
    buffer of a block's size is page-faulted in on every call: twice a kernel's time)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < entries:
        buffer = _scratch.buffer = np.empty(entries, dtype=np.float32)
    return buffer[:entries]


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the uint32 `bits`."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_float32(typingctx, value):
    """The bit pattern of the float32 `value`, as uint32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def _load(a, j):
    """Entry j of a float32 array, or of bfloat16 bits (uint16) widened to float32."""


@overload(_load, inline="always")
def _load_overload(a, j):
    if a.dtype == types.uint16:
        return lambda a, j: _float32_from_bits(np.uint32(a[j]) << np.uint32(16))
    return lambda a, j: a[j]


# Entries per tile of `merge_block`: its float32 rows of scratch (one a model) stay in L1/L2 (measured,
# two bf16 fine-tunes, 2^18-entry blocks: 2.03 ns per entry untiled, 1.68 with 4096, 1.71 with 16384).
TILE = 4096

_OPTIONS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}


@numba.njit(**_OPTIONS)
def abs_delta_histogram(x, base, magnitude_bits, shift, prefixes, counts):
    """Histogram of one 16-bit digit of |x − base|'s float32 bits, added to `counts`.

    `magnitude_bits` is uint32 scratch of the block's size (the magnitudes first, then the
    histogram: two loops run twice as fast as one). `shift` is the digit's lowest bit; with an
    empty `prefixes` every entry counts (the top digit), else `counts[p]` counts the entries
    whose bits above the digit equal `prefixes[p]`'s (RadixSelect's later passes)."""
    n = base.size
    for j in range(n):
        magnitude_bits[j] = _bits_of_float32(abs(_load(x, j) - _load(base, j)))
    if prefixes.size == 0:
        row = counts[0]
        for j in range(n):
            row[(magnitude_bits[j] >> shift) & 0xFFFF] += 1
        return
    high = shift + 16
    for p in range(prefixes.size):
        top = np.uint32(prefixes[p]) >> high
        row = counts[p]
        for j in range(n):
            bits = magnitude_bits[j]
            if (bits >> high) == top:
                row[(bits >> shift) & 0xFFFF] += 1


@numba.njit(**_OPTIONS)
def _kept_delta(x, base, row, code, low_compare, low, high_compare, high, mask, tie_value, tie_skip, tie_stop, tie_seen):
    """row = one model's δ = x − base after its sparsifier (before the rescale), as the torch
    path computes it: δ · mask, the mask 0/1 in float32 (zero_() for DROP_ALL); a given `mask`
    (KEEP_BY_MASK) is the tile's packed bits, widened into `row` first.

    Thresholds: the mask is [|δ| `low_compare` low] − [|δ| `high_compare` high]; then, for each
    tie window t (RankWindow's: of the entries with |δ| = tie_value[t], in index order, keep those
    whose count `tie_seen[t]` is in [tie_skip[t], tie_stop[t])), 1 on the kept tied entries;
    `tie_seen` is advanced past this block. A window already passed is given as tie_stop = 0."""
    n = base.size
    if code == DROP_ALL:
        for j in range(n):
            row[j] = 0.0
        return
    if code == KEEP_ALL:
        for j in range(n):
            row[j] = _load(x, j) - _load(base, j)
        return
    if code == KEEP_BY_MASK:
        one, zero = np.float32(1.0), np.float32(0.0)
        for k in range(n // 8):  # eight entries a byte, unrolled: 0.25 ns an entry with the product below
            byte = mask[k]
            for b in range(8):
                row[8 * k + b] = one if (byte >> (7 - b)) & 1 else zero
        for j in range(n - n % 8, n):
            row[j] = one if (mask[j >> 3] >> (7 - (j & 7))) & 1 else zero
        for j in range(n):
            row[j] = (_load(x, j) - _load(base, j)) * row[j]
        return
    one, zero = np.float32(1.0), np.float32(0.0)
    # The comparison codes as 0/1 factors: `and`/`or` on them would branch in the loop, which
    # then does not vectorise (0.33 ns an entry against 0.1).
    low_ge, low_gt = one if low_compare == GREATER_EQUAL else zero, one if low_compare == GREATER else zero
    high_ge, high_gt = one if high_compare == GREATER_EQUAL else zero, one if high_compare == GREATER else zero
    for j in range(n):
        d = _load(x, j) - _load(base, j)
        magnitude = abs(d)
        keep = low_ge * (one if magnitude >= low else zero) + low_gt * (one if magnitude > low else zero)
        drop = high_ge * (one if magnitude >= high else zero) + high_gt * (one if magnitude > high else zero)
        row[j] = d * (keep - drop)
    for t in range(tie_value.size):
        if tie_seen[t] >= tie_stop[t]:
            continue
        value, seen = tie_value[t], tie_seen[t]
        ties = 0
        for j in range(n):  # a branch-free count first: mostly a whole tile is in or out of the window
            ties += 1 if abs(_load(x, j) - _load(base, j)) == value else 0
        if ties == 0 or seen + ties <= tie_skip[t]:
            pass
        elif tie_skip[t] <= seen and seen + ties <= tie_stop[t]:
            for j in range(n):
                d = _load(x, j) - _load(base, j)
                row[j] = d if abs(d) == value else row[j]
        else:  # the window starts or ends in this tile: in index order
            for j in range(n):
                d = _load(x, j) - _load(base, j)
                if abs(d) == value:
                    if tie_skip[t] <= seen < tie_stop[t]:
                        row[j] = d
                    seen += 1
        tie_seen[t] = tie_seen[t] + ties


@numba.njit(**_OPTIONS)
def merge_block(xs, base, masks, out, scratch, keep, low_compare, low, high_compare, high, tie_value, tie_skip, tie_stop, tie_seen, rescale, rescale_by, weight, consensus, normalize, divisor_floor, clamp_divisor, divisor, lambda_):
    """One output block of the task-vector family in float32, into `out`.

    Per model i (`xs[i]`, flat float32 or bf16 bits like `base`; `out` float32): δ = x − base, kept by `keep[i]`
    (thresholds `low`/`high` with their comparison codes and the tie windows in row i of the
    `tie_*` arrays (`_kept_delta`), or `masks[i]`, packed bits), rescaled (× or ÷
    `rescale_by[i]`), × `weight[i]`. Without `consensus`: Σ D_i, ÷ `divisor` if `normalize`.
    With it (TIES, sum of mass): s = copysign(1, Σ D_i); Σ max(D_i·s, 0), × s, ÷ the agreeing
    weights (floored at `divisor_floor` if `clamp_divisor`, else 1 where under it) if `normalize`.
    Then × `lambda_` (when ≠ 1) and + base. `xs` and `masks` are tuples of equal-typed arrays;
    `scratch` is float32 of at least models × min(n, TILE) entries (`scratch()`).
    In tiles of TILE entries (a multiple of 8: whole bytes of the masks), in index order (the tie
    windows count in it), each in L1/L2 (`_merge_tile`); every inner loop is branch-free and vectorises."""
    n = base.size
    for lo in range(0, n, TILE):
        hi = min(n, lo + TILE)
        _merge_tile(xs, base, masks, out, scratch, keep, low_compare, low, high_compare, high, tie_value, tie_skip, tie_stop, tie_seen, rescale, rescale_by, weight, consensus, normalize, divisor_floor, clamp_divisor, divisor, lambda_, lo, hi)


@numba.njit(**_OPTIONS)
def _merge_tile(xs, base_all, masks, out_all, scratch, keep, low_compare, low, high_compare, high, tie_value, tie_skip, tie_stop, tie_seen, rescale, rescale_by, weight, consensus, normalize, divisor_floor, clamp_divisor, divisor, lambda_, lo, hi):
    """Entries [lo, hi) of `merge_block`. Each model's kept and rescaled δ first, a loop each
    (`_kept_delta`); then everything else in one loop over the entries with the models unrolled
    inside it (their count is the tuple's, fixed when compiled, so the loop still vectorises), so
    no step stores and reloads the tile. ×λ is exact when λ = 1."""
    models, n = len(xs), hi - lo
    base, out = base_all[lo:hi], out_all[lo:hi]
    one, zero = np.float32(1.0), np.float32(0.0)
    deltas = scratch[: models * n].reshape((models, n))
    for i in range(models):
        row = deltas[i]
        _kept_delta(xs[i][lo:hi], base, row, keep[i], low_compare[i], low[i], high_compare[i], high[i], masks[i][lo // 8 : (hi + 7) // 8], tie_value[i], tie_skip[i], tie_stop[i], tie_seen[i])
        if rescale[i] == RESCALE_SCALE:
            by = rescale_by[i]
            for j in range(n):
                row[j] = row[j] * by
        elif rescale[i] == RESCALE_DIVIDE:  # a loop of its own: a division is slow, and rare here
            by = rescale_by[i]
            for j in range(n):
                row[j] = row[j] / by
    for j in range(n):
        for i in range(models):
            deltas[i, j] = deltas[i, j] * weight[i]
        total = deltas[0, j]
        for i in range(1, models):
            total = total + deltas[i, j]
        if consensus:
            sign = np.copysign(one, total)
            total = zero
            agreeing_weight = zero
            for i in range(models):
                agreeing = deltas[i, j] * sign
                agreeing = zero if agreeing < zero else agreeing  # NaN stays NaN, as clamp_min keeps it
                total = total + agreeing
                agreeing_weight = agreeing_weight + weight[i] * (one if agreeing > zero else zero)
            if not normalize:
                total = total * sign
            elif clamp_divisor:
                total = (total * sign) / (divisor_floor if agreeing_weight < divisor_floor else agreeing_weight)
            else:
                total = (total * sign) / (one if abs(agreeing_weight) < divisor_floor else agreeing_weight)
        elif normalize:
            total = total / divisor
        out[j] = total * lambda_ + _load(base, j)


@numba.njit(**_OPTIONS)
def _sum_in_eight_lanes(a):
    """Σ a in float64 in a fixed order: entry k into lane k mod 8, the lanes added pairwise. Eight
    independent additions in flight, where one running sum waits on each (0.27 ns an entry, 1.0)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    full = a.size - a.size % 8
    for k in range(0, full, 8):
        s0 += a[k]
        s1 += a[k + 1]
        s2 += a[k + 2]
        s3 += a[k + 3]
        s4 += a[k + 4]
        s5 += a[k + 5]
        s6 += a[k + 6]
        s7 += a[k + 7]
    for k in range(full, a.size):
        s0 += a[k]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(**_OPTIONS)
def l1_sums_with_mask_bits(x, base, draws, probability, bits, scratch):
    """DARE's l1 pass over one block: (Σ|δ|, Σ|δ · m|) with δ = x − base and the mask
    m = [draw < probability] (float32 comparison, as torch's), written as packed bits into
    `bits` (`np.packbits`' layout: entry 8k+j is bit 7−j of byte k, the last byte's spare bits 0).
    The sums accumulate in float64, tile by tile in index order, each tile in eight lanes
    (torch sums in an order of its own: the two may differ in the last bits of a float64, far
    below the float32 scale they give). `scratch`: float32, ≥ 2 × min(n, TILE) entries."""
    n = base.size
    zero, one = np.float32(0.0), np.float32(1.0)
    before = 0.0
    after = 0.0
    for lo in range(0, n, TILE):
        hi = min(n, lo + TILE)
        xs, bs, ds = x[lo:hi], base[lo:hi], draws[lo:hi]  # slices, not lo + j: the loop then vectorises
        magnitude, kept = scratch[: hi - lo], scratch[hi - lo : 2 * (hi - lo)]
        for j in range(hi - lo):
            d = abs(_load(xs, j) - _load(bs, j))
            magnitude[j] = d
            kept[j] = d * (one if ds[j] < probability else zero)  # δ·0 as torch has it: NaN for ±Inf
        before += _sum_in_eight_lanes(magnitude)
        after += _sum_in_eight_lanes(kept)
    mask_bits_below(draws, probability, bits)
    return before, after


@numba.njit(**_OPTIONS)
def mask_bits_below(draws, probability, bits):
    """bits = the mask [draw < probability] (float32 comparison), packed as `np.packbits` packs."""
    n = draws.size
    for k in range(bits.size):
        byte = 0
        for j in range(min(8, n - 8 * k)):
            byte |= (128 >> j) if draws[8 * k + j] < probability else 0
        bits[k] = byte


# torch.rand's draws on a CPU generator, nine times as fast (0.46 ns an entry against 4.0): torch's
# CPU generator is MT19937 seeded with the seed's low 32 bits (the reference `init_genrand`), and
# its float32 uniform is the 24 low bits of each 32-bit output × 2^-24, drawn in index order.
_MT_N, _MT_M = 624, 397


@numba.njit(**_OPTIONS)
def _mt_seed(state, seed):
    state[0] = seed
    for k in range(1, _MT_N):
        prev = state[k - 1]
        state[k] = np.uint32(1812433253) * (prev ^ (prev >> np.uint32(30))) + np.uint32(k)


@numba.njit(**_OPTIONS)
def _mt_twist(state):
    """The next 624 words. In three runs, each of which reads word k+1 before it changes and word
    k+M (or k+M−N) after: written through a buffer, each run's loop vectorises."""
    upper, lower, matrix, one, zero = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF), np.uint32(1), np.uint32(0)
    run = _MT_N - _MT_M
    buffer = np.empty(run, dtype=np.uint32)
    for lo, hi, source in ((0, run, _MT_M), (run, 2 * run, 0), (2 * run, _MT_N - 1, run)):
        for k in range(lo, hi):
            y = (state[k] & upper) | (state[k + 1] & lower)
            buffer[k - lo] = state[k - lo + source] ^ (y >> one) ^ ((zero - (y & one)) & matrix)
        for k in range(lo, hi):
            state[k] = buffer[k - lo]
    y = (state[_MT_N - 1] & upper) | (state[0] & lower)
    state[_MT_N - 1] = state[_MT_M - 1] ^ (y >> one) ^ ((zero - (y & one)) & matrix)


@numba.njit(**_OPTIONS)
def _mt_uniform(state, position, out):
    """out = the next out.size float32 draws in [0, 1); `position[0]` is the next word's index."""
    i, j, n = position[0], 0, out.size
    scale = np.float32(1.0 / 16777216.0)
    while j < n:
        if i >= _MT_N:
            _mt_twist(state)
            i = 0
        m = min(_MT_N - i, n - j)
        words, draws = state[i : i + m], out[j : j + m]  # slices, not i + k: the loop then vectorises (3.4× faster)
        for k in range(m):
            y = words[k]
            y ^= y >> np.uint32(11)
            y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
            y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
            y ^= y >> np.uint32(18)
            draws[k] = np.float32(y & np.uint32(0xFFFFFF)) * scale
        i += m
        j += m
    position[0] = i


class UniformDraws:
    """The float32 draws `torch.rand(..., generator=torch.Generator().manual_seed(seed))` gives,
    call after call (the tests compare them with torch's)."""

    def __init__(self, seed: int) -> None:
        self._state = np.empty(_MT_N, dtype=np.uint32)
        _mt_seed(self._state, np.uint32(seed & 0xFFFFFFFF))
        self._position = np.array([_MT_N], dtype=np.int64)

    def draw(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        out = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=np.float32)
        _mt_uniform(self._state, self._position, out)
        return torch.from_numpy(out).reshape(shape)
