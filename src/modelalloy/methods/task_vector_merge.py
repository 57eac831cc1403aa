"""The task-vector family's pipeline for one tensor, in row blocks: `TaskVectorMerge`.

Per output tensor (METHODS.md, "Task-vector family"):

    δ_i = θ_i − θ_0  →  sparsify(δ_i; density_i)  →  D_i = w_i δ̃_i  →  combine
        →  optional ÷ weight divisor  →  × lambda  →  θ_0 + result

Combine without sign consensus: Σ D_i, divisor Σ w_i. With it (TIES, Yadav et al. 2023):
s = sign(Σ D_i) (or sign(Σ sign D_i) for `consensus_method: count`), zeros counting as +;
m_i = [sign D_i = s], so zeros never match; Σ m_i D_i, divisor Σ m_i w_i elementwise.

The sparsifiers are in `methods/sparsifiers.py`. Rescale after dropping: l1 restores ‖δ‖₁
(mergekit), inverse_p divides by each entry's keep-probability (the papers).

Everything after the sparsifiers' whole-tensor statistics is elementwise, so the family runs in
row blocks (`methods/blockwise.py`): magnitude thresholds come from a streamed radix select
(statistics passes), ‖δ‖₁ for the l1 rescale from one more pass, and the output pass applies them
block by block. Ties at a threshold are taken in index order and random draws come from one
generator per model (seed + model index, drawn in index order), so the result does not depend
on the block size. Never more than a block of each task vector is alive.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modelalloy.methods import kernels
from modelalloy.methods.blockwise import Block, BlockMerge, TensorSpec
from modelalloy.methods.sparsifiers import MAGNITUDE, MAGNITUDE_OUTLIERS, RandomKeep, SparsifierKind, make_sparsifier

_DIVISOR_EPS = 1e-8
_RESCALE_EPS = 1e-7


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
        # In a 16-bit compute dtype (`compute_dtype: float16`, for mergekit bit-parity) the weights are
        # rounded to it, and sums are accumulated in float32 and rounded once, as mergekit's
        # torch.tensor(weights, dtype) and .sum(dim=0) do; a divisor floor must be representable too.
        self.low = spec.dtype in (torch.float16, torch.bfloat16)
        if self.low:
            weight = torch.tensor(weight, dtype=spec.dtype).tolist()
        self.divisor_eps = max(_DIVISOR_EPS, torch.finfo(spec.dtype).tiny) if spec.dtype.is_floating_point else _DIVISOR_EPS
        self.weight, self.lambda_, self.consensus, self.normalize, self.rescale = weight, lambda_, consensus, normalize, rescale
        self.statistics_passes = max(s.passes for s in self.sparsifiers)
        self.l1 = rescale == "l1" and sparsifier is not None
        for s in self.sparsifiers:
            if isinstance(s, RandomKeep):
                s.reuse_masks = self.l1
        self.passes = self.statistics_passes + self.l1  # the l1 rescale needs ‖δ‖₁ before and after the mask
        # The first pass sees every model's |δ| (the base's too): in its radix select, or, when the
        # l1 pass comes first, in ‖δ‖₁ (NaN or Inf if any |δ| is).
        self.finds_nonfinite = count > 0 and all(s.finds_nonfinite or (self.statistics_passes == 0 and self.l1 and s.drops) for s in self.sparsifiers)
        self.scale = [1.0] * count
        # float32 on the CPU: one fused kernel per block (`kernels.merge_block`, the same
        # operations in the same order, ~4× less CPU); the rest keeps the torch path below.
        self.fused = spec.dtype == torch.float32 and spec.device.type == "cpu" and consensus in (None, "sum") and all(s.fusable for s in self.sparsifiers)
        self.takes_bfloat16 = self.fused
        self.compute_dtype = spec.dtype

    def start(self, step: int) -> None:
        self.step = step
        if self.l1 and step == self.passes:  # the l1 pass is over
            self.scale = [b / a if b > _RESCALE_EPS and a > _RESCALE_EPS else 1.0 for b, a in zip(self.before, self.after)]
        for s in self.sparsifiers:
            s.start(step)
        if self.l1 and step == self.statistics_passes:
            self.before = [0.0] * len(self.sparsifiers)
            self.after = [0.0] * len(self.sparsifiers)

    def first_pass_saw_nonfinite(self) -> bool:
        if self.statistics_passes == 0:
            return not all(math.isfinite(b) for b in self.before)
        return any(s.saw_nonfinite for s in self.sparsifiers)

    def observe(self, block: Block) -> None:
        for i, (x, s) in enumerate(zip(block.inputs, self.sparsifiers)):
            if self.step < s.passes:
                s.observe_difference(x, block.base)
            elif self.step == self.statistics_passes and s.drops:  # the l1 pass
                before, after = s.fused_l1_sums(x, block.base) if self.fused else s.l1_sums(x, block.base, self.compute_dtype)
                self.before[i] += before
                self.after[i] += after

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

    def _fused_output(self, block: Block) -> Tensor:
        base = block.base
        keeps = [s.fused_keep(x, base) for x, s in zip(block.inputs, self.sparsifiers)]
        rescale, rescale_by = [kernels.RESCALE_NONE] * len(keeps), [1.0] * len(keeps)
        for i, (s, keep) in enumerate(zip(self.sparsifiers, keeps)):
            if s.drops and self.rescale == "l1":
                rescale[i], rescale_by[i] = kernels.RESCALE_SCALE, self.scale[i]
            elif s.drops and self.rescale == "inverse_p":
                rescale[i], rescale_by[i] = kernels.RESCALE_DIVIDE, keep.keep_probability
        tie_value = np.zeros((len(keeps), 2), dtype=np.float32)
        tie_skip, tie_stop, tie_seen = (np.zeros((len(keeps), 2), dtype=np.int64) for _ in range(3))
        for i, keep in enumerate(keeps):
            for t, (value, skip, stop) in enumerate(keep.tie_windows):
                tie_value[i, t], tie_skip[i, t], tie_stop[i, t], tie_seen[i, t] = value, skip, stop, keep.tie_seen[t]
        no_mask = np.zeros(1, dtype=np.uint8)
        masks = tuple(no_mask if k.mask is None else k.mask for k in keeps)
        out = torch.empty(base.shape, dtype=torch.float32)
        divisor = sum(self.weight)
        kernels.merge_block(
            tuple(kernels.kernel_array(x) for x in block.inputs),
            kernels.kernel_array(base),
            masks,
            out.view(-1).numpy(),
            kernels.scratch(len(keeps) * min(base.numel(), kernels.TILE)),
            np.array([k.code for k in keeps], dtype=np.int64),
            np.array([k.low_compare for k in keeps], dtype=np.int64),
            np.array([k.low for k in keeps], dtype=np.float32),
            np.array([k.high_compare for k in keeps], dtype=np.int64),
            np.array([k.high for k in keeps], dtype=np.float32),
            tie_value,
            tie_skip,
            tie_stop,
            tie_seen,
            np.array(rescale, dtype=np.int64),
            np.array(rescale_by, dtype=np.float32),
            np.array(self.weight, dtype=np.float32),
            self.consensus is not None,
            self.normalize,
            np.float32(self.divisor_eps if min(self.weight) >= self.divisor_eps else _DIVISOR_EPS),
            min(self.weight) >= self.divisor_eps,
            np.float32(divisor if abs(divisor) >= _DIVISOR_EPS else 1.0),
            np.float32(self.lambda_),
        )
        for i, keep in enumerate(keeps):
            if keep.tie_windows:
                keep.tie_seen[:] = tie_seen[i, : len(keep.tie_windows)]
        return out

    def output(self, block: Block) -> Tensor:
        if self.fused:
            return self._fused_output(block)
        base, weight = block.base, self.weight
        acc = torch.float32 if self.low else base.dtype  # what sums accumulate in
        if self.consensus is None:
            mixed = self._weighted_delta(0, block.inputs[0], base).to(acc)
            for i, x in enumerate(block.inputs[1:], start=1):
                mixed.add_(self._weighted_delta(i, x, base))
            mixed = mixed.to(base.dtype)
            divisor: Any = float(torch.tensor(weight, dtype=base.dtype).sum()) if self.low else sum(weight)
            if abs(divisor) < _DIVISOR_EPS:
                divisor = 1.0
        else:
            deltas = [self._weighted_delta(i, x, base) for i, x in enumerate(block.inputs)]
            direction = deltas[0].to(acc, copy=True) if self.consensus == "sum" else torch.sign(deltas[0])
            for d in deltas[1:]:
                direction.add_(d if self.consensus == "sum" else torch.sign(d))  # count: the majority of signs, not of mass
            # The elected sign as ±1, zeros counting as + (a −0.0 sum only comes from all-zero
            # entries, which agree with no sign anyway). An entry agrees when D_i·s > 0: summing
            # relu(D_i·s) and multiplying by s gives Σ m_i D_i exactly, with no bool masks.
            sign = torch.copysign(torch.ones_like(direction), direction, out=direction).to(base.dtype)
            mixed = torch.zeros_like(base, dtype=acc)
            divisor = torch.zeros_like(base, dtype=acc) if self.normalize else None
            for w, d in zip(weight, deltas):
                agreeing = d.mul_(sign).clamp_min_(0)
                mixed.add_(agreeing)
                if divisor is not None:
                    divisor.add_(torch.gt(agreeing, 0, out=agreeing), alpha=w)
            mixed = mixed.to(base.dtype).mul_(sign)
            del deltas, direction, sign
            if divisor is not None:
                divisor = divisor.to(base.dtype)
                if min(weight) >= self.divisor_eps:  # the divisor is 0 (where nothing agrees, and mixed is 0) or ≥ the least weight
                    divisor.clamp_min_(self.divisor_eps)
                else:
                    divisor.masked_fill_(divisor.abs() < _DIVISOR_EPS, 1.0)
        if self.normalize:
            mixed = mixed.div_(divisor)
        if self.lambda_ != 1.0:
            mixed.mul_(self.lambda_)
        return mixed.add_(base)
