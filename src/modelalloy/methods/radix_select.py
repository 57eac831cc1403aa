"""Radix select: the exact k-th largest of non-negative floats streamed in blocks.

The task-vector family's magnitude thresholds (TIES' k largest |δ|, Breadcrumbs' cuts) come from
here, in statistics passes over the blocks, so no whole task vector is ever sorted or held.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from modelalloy.methods import kernels

_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_DIGIT = 16  # radix digit width: 65536 bins per pass


class RadixSelect:
    """The k-th largest entry (1-based) of non-negative floats streamed in blocks, for several k.

    Radix select on the bit patterns: for floats ≥ 0 the order of the values is the order of their
    bits read as integers, so a histogram of the top 16 bits finds the bin holding the k-th
    largest, and a histogram of the next 16 bits among that bin's entries finishes the job: one
    pass over the data per 16 bits (2 for float32, 4 for float64), O(n), where a sort or
    kthvalue's quickselect needs the whole tensor in memory and dominated a whole TIES merge.

    Per pass: `start(step)`, `observe(block)` (or `observe_difference(x, base)`: |x − base|) for
    every block, and after the last pass `finish()`; then `value[t]` is the k-th largest for
    `ks[t]`, `above[t]` how many entries exceed it and `equal[t]` how many equal it. From the
    second pass on, `saw_nonfinite` says whether the first met a NaN or Inf (their bits are the
    highest: the top digit's bins from +Inf's up count them).
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
        self._fused: np.ndarray | None = None  # this pass's histograms from the float32 kernel, per prefix
        self._infinity_digit = int(torch.tensor(float("inf"), dtype=dtype).view(self.int_dtype)) >> self.shifts[0]
        self.saw_nonfinite = False

    @property
    def _prefixes(self) -> list[int]:
        return list(dict.fromkeys(self._found))

    def start(self, step: int) -> None:
        if self._step >= 0:
            self._settle()
        self._step = step
        self._counts = {}
        self._fused = None

    def observe_difference(self, x: Tensor, base: Tensor) -> None:
        """`observe(|x − base|)` without the temporaries: in float32 on the CPU, one pass of
        `kernels.abs_delta_histogram` over the block (same counts); x and base may be bfloat16
        (widened exactly in the kernel)."""
        if self.dtype != torch.float32 or x.device.type != "cpu":
            self.observe((x - base).abs())
            return
        prefixes = self._prefixes if self._step > 0 else []
        if self._fused is None:
            self._fused = np.zeros((max(1, len(prefixes)), 2**_DIGIT), dtype=np.int64)
        kernels.abs_delta_histogram(kernels.kernel_array(x), kernels.kernel_array(base), kernels.scratch(base.numel()).view(np.uint32), self.shifts[self._step], np.array(prefixes, dtype=np.int64), self._fused)

    def observe(self, magnitude: Tensor) -> None:
        bits = magnitude.reshape(-1).view(self.int_dtype)
        shift = self.shifts[self._step]
        for prefix in self._prefixes:
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
        if self._fused is not None:
            for prefix, counts in zip(self._prefixes if self._step > 0 else [0], self._fused):
                self._counts[prefix] = self._counts[prefix] + torch.from_numpy(counts) if prefix in self._counts else torch.from_numpy(counts)
        if self._step == 0 and 0 in self._counts:
            self.saw_nonfinite = bool(self._counts[0][self._infinity_digit :].any())
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
