"""Merging one tensor in row blocks, so that memory and cache use do not grow with the tensor.

A method with a blockwise form is a factory that, given the tensor's shape and compute dtype and
the method's parameters, returns a `BlockMerge`: a few *statistics passes* over the tensor in row
blocks (`observe`: what the output needs from the whole tensor, e.g. TIES' magnitude threshold or
the ‖δ‖₁ that DARE restores), then the *output pass* (`output`: each block of the result, from
the same rows of the inputs). The engine streams every pass straight from the input files and
writes each output block at its offset, so a merge holds a few blocks, never whole tensors.

The whole-tensor call (`merge_whole`, what tests, searches and `alloy lora` use) is the same
object given the tensor as one block, so both paths are one implementation. Blocks are whole
rows of the last dimension (per-row rules such as DELLA's ranking see complete rows) and come in
order; anything a method counts in index order (ties at a threshold, random draws) therefore
comes out the same for every block size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

# Entries per block: 1 MiB per float32 buffer keeps a block's intermediates in the caches, and
# the allocator reuses its freed buffers (measured on a 1.1B TIES merge, 2 threads: peak RSS
# 0.30 GB and 16 s with 2^18 entries, 1.2 GB and 18 s with 2^20).
BLOCK_ENTRIES = 1 << 18


@dataclass(frozen=True)
class TensorSpec:
    """What a blockwise method knows of its output tensor before any block arrives."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # the compute dtype of the blocks
    device: torch.device

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_length(self) -> int:
        """Entries per row: the last dimension (1 for a scalar or an empty last dimension)."""
        return self.shape[-1] if self.shape and self.shape[-1] > 0 else 1

    @property
    def rows(self) -> int:
        return self.numel // self.row_length


@dataclass
class Block:
    """Rows [start_row, start_row + rows) of every input, as (rows, row_length) tensors."""

    start: int  # flat index of the block's first entry
    inputs: list[Tensor]  # the non-base inputs, in config order
    base: Tensor | None


class BlockMerge(ABC):
    """One output tensor's merge: `passes` statistics passes, then the output pass.

    The engine calls `start(step)` before each pass (step == passes: the output pass), then
    `observe` (statistics passes) or `output` (output pass) for every block in order. Blocks'
    tensors are only valid during the call: keep numbers, not tensors.
    """

    passes: int = 0
    # True when a NaN or Inf in any input always reaches the output (a weighted sum: 0·NaN is
    # NaN too). The engine then skips its NaN check of the inputs, since the output's check fails
    # anyway, and checks a block's inputs only then, to name them.
    spreads_nonfinite: bool = False
    # True when its first pass is a statistics pass whose numbers show, at no cost, whether any
    # input (the base included) holds a NaN or Inf: TIES' histograms of |x − base|'s bits, DARE's
    # ‖δ‖₁. The engine then skips its own check of the inputs in the first pass, and after it
    # checks them (in the second pass, to name them) only if `first_pass_saw_nonfinite()`.
    finds_nonfinite: bool = False
    # True when, computing in float32, it takes blocks of bfloat16 inputs as stored (and widens
    # them exactly itself): the engine then skips converting each block to float32.
    takes_bfloat16: bool = False

    def start(self, step: int) -> None:
        """Before each pass; the default has nothing to prepare."""

    def first_pass_saw_nonfinite(self) -> bool:
        """After `start(1)`, for a merge that `finds_nonfinite`: whether the first pass met a NaN or
        Inf (a difference overflowing to Inf counts too; the engine's check then finds no input)."""
        raise TypeError(f"{type(self).__name__} does not find non-finite inputs itself")

    def observe(self, block: Block) -> None:
        """One block of a statistics pass; a merge that declares passes must say what it gathers."""
        raise TypeError(f"{type(self).__name__} declares {self.passes} statistics passes but does not observe blocks")

    @abstractmethod
    def output(self, block: Block) -> Tensor:
        """This block of the merged tensor (rows × row_length, the compute dtype)."""


def as_rows(x: Tensor, spec: TensorSpec) -> Tensor:
    return x.reshape(spec.rows, spec.row_length)


def merge_whole(merge: BlockMerge, spec: TensorSpec, tensors: list[Tensor], base: Tensor | None) -> Tensor:
    """Run `merge` with the whole tensor as one block; returns a tensor of `spec.shape`."""
    block = Block(0, [as_rows(t, spec) for t in tensors], None if base is None else as_rows(base, spec))
    for step in range(merge.passes):
        merge.start(step)
        merge.observe(block)
    merge.start(merge.passes)
    return merge.output(block).reshape(spec.shape)


def block_rows(spec: TensorSpec, entries: int = BLOCK_ENTRIES) -> int:
    """Rows per block: about `entries` entries, at least one row."""
    return max(1, entries // spec.row_length)
