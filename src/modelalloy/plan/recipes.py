"""A plan as plain data: one `TensorRecipe` per output tensor (its method, where each input comes
from, the resolved parameters, shape, output dtype and random seed), with the config.json to write,
the donor of the tokenizer, and the memory it will take."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from modelalloy.config import MergeConfig
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.safetensors_format import itemsize
from modelalloy.io.spans import BUFFER_BUDGET
from modelalloy.methods import MergeMethod
from modelalloy.methods.blockwise import BLOCK_ENTRIES
from modelalloy.plan.vocab import VocabPlan

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


@dataclass(frozen=True)
class TensorSource:
    model: str  # model reference as written in the config
    tensor: str  # tensor name inside that model


@dataclass(frozen=True, eq=False)
class TensorRecipe:
    """How to make one output tensor. Per-model parameters are tuples aligned with `inputs`.

    `stats` carries a data-aware method's extra per-model tensors (a Fisher diagonal, a Gram
    matrix), aligned with `inputs` and read like them: each is a `TensorSource` whose `model`
    is the statistics file (opened as a checkpoint under its path) and whose `tensor` is the key
    (`stat_key`). Empty when the method reads none for this tensor.
    """

    name: str
    method: str
    inputs: tuple[TensorSource, ...]
    base: TensorSource | None
    params: dict[str, Any]
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    seed: int
    stats: tuple[TensorSource, ...] = ()
    aligned: bool = False  # vocabulary rows are put in output order first (Plan.vocab)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)

    def sources(self) -> tuple[TensorSource, ...]:
        return ((self.base,) if self.base else ()) + self.inputs + self.stats


@dataclass
class Plan:
    config: MergeConfig
    method: MergeMethod
    recipes: list[TensorRecipe]
    output_config: dict
    donor: str  # the model whose config, tokenizer and generation files are copied
    input_dtype: torch.dtype | None  # config `dtype`: inputs are cast to it before merging
    compute_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)  # warnings found while planning
    vocab: VocabPlan | None = None  # output tokenizer and row alignment, with a tokenizer section
    chat_template: str | None = None  # resolved `chat_template`, written with the tokenizer

    @property
    def output_bytes(self) -> int:
        return sum(r.out_nbytes for r in self.recipes)

    def input_bytes(self, checkpoints: Mapping[str, Checkpoint]) -> int:
        return sum(checkpoints[s.model].tensors[s.tensor].nbytes for r in self.recipes for s in r.sources())

    def peak_memory_estimate(self, concurrency: int, *, streaming: bool = True) -> int:
        """Bytes: the largest recipes' working sets in flight at once, plus the interpreter.

        With `streaming` (what `alloy merge` does on the CPU), a blockwise method's working set is
        a block's, whatever the tensor's size, and inputs not in the page cache are read ahead
        into the span reader's buffers (`io/spans.py`)."""
        compute = itemsize(self.compute_dtype)
        block = BLOCK_ENTRIES if streaming and self.method.blockwise else None
        consensus = self.method.name in ("ties", "dare_ties") or "consensus_method" in self.method.param_names

        def working_set(r: TensorRecipe) -> int:
            n = len(r.sources())
            live = 2 * n + 3 if consensus else n + 3  # inputs, deltas (kept for consensus), sum, masks
            if r.aligned:
                live += n  # the raw, unaligned rows of every model are held while the aligned ones are built
            entries = min(r.numel, block) if block and not (r.aligned or r.stats) else r.numel
            return entries * compute * live + _matrix_extra(r, compute)

        largest = sorted((working_set(r) for r in self.recipes), reverse=True)[:concurrency]
        return sum(largest) + (BUFFER_BUDGET if block else 0) + 400 * 2**20


def _matrix_extra(r: TensorRecipe, compute: int) -> int:
    """Bytes beyond the inputs for per-matrix methods: each task's SVD factors (tsv, iso_*), or
    the [in, in] Gram matrices and the float64 square solve (regmean, wudi)."""
    layout = r.params.get("layout")
    if layout not in ("out_in", "in_out") or len(r.shape) != 2:
        return 0
    n_in = r.shape[1] if layout == "out_in" else r.shape[0]
    square = n_in * n_in
    return max(2 * len(r.inputs) * r.numel * compute, len(r.stats) * square * compute + 3 * square * 8 + 2 * r.numel * 8)


def seed_for(random_seed: int, tensor: str, method: str) -> int:
    """A stable 63-bit seed from (seed, tensor, method): same on every machine, thread and order."""
    digest = hashlib.blake2b(f"{random_seed}\0{tensor}\0{method}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
