"""Reading input tensors for a merge: each read checked for NaN/Inf and hashed (BLAKE3) on the
reading thread, and converted to the dtype the methods compute in."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping

import torch

from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.manifest import new_digest
from modelalloy.plan import Plan, TensorRecipe, TensorSource


class InputHasher:
    """Order-independent content hash per model: BLAKE3 over sorted (tensor, BLAKE3 of its bytes)."""

    def __init__(self, known: dict[str, dict[str, str]] | None = None) -> None:
        self._digests: dict[str, dict[str, str]] = {m: dict(d) for m, d in (known or {}).items()}
        self._lock = threading.Lock()

    def digests_of(self, sources) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        with self._lock:
            for s in sources:
                if (digest := self._digests.get(s.model, {}).get(s.tensor)) is not None:
                    out.setdefault(s.model, {})[s.tensor] = digest
        return out

    def known(self, model: str, tensor: str) -> bool:
        with self._lock:
            return tensor in self._digests.get(model, {})

    def put(self, model: str, tensor: str, digest: str) -> None:
        with self._lock:
            self._digests.setdefault(model, {})[tensor] = digest

    def add(self, model: str, tensor: str, value: torch.Tensor) -> None:
        h = new_digest()
        h.update(memoryview(value.contiguous().reshape(-1).view(torch.uint8).numpy()))  # releases the GIL on large buffers
        self.put(model, tensor, h.hexdigest())

    def result(self) -> dict[str, str]:
        out = {}
        for model, digests in self._digests.items():
            h = new_digest()
            for name in sorted(digests):
                h.update(f"{name}\0{digests[name]}\n".encode())
            out[model] = h.hexdigest()
        return out


class NonFiniteInputs:
    """Names of input tensors holding NaN or Inf, checked on each tensor as it is read (one pass
    over memory already in cache), reported once as a warning: the user should know, but a
    method that drops those entries (TIES trimming, another model's slice) may still be fine."""

    def __init__(self) -> None:
        self.found: set[str] = set()
        self._lock = threading.Lock()

    def check(self, model: str, tensor: str, x: torch.Tensor) -> None:
        if x.is_floating_point() and not all_finite(x):
            with self._lock:
                self.found.add(f"{tensor} in {model}")

    def warn(self) -> None:
        if self.found:
            names = sorted(self.found)
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            warnings.warn(f"input tensors hold NaN or Inf: {', '.join(names[:5])}{more}; check those models", stacklevel=3)


def all_finite(x: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf. min and max propagate NaN and show ±Inf, so one
    reduction pass answers it without a bool tensor the size of `x` (35× faster than isfinite.all)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return math.isfinite(float(low)) and math.isfinite(float(high))  # float(): a sync point on CUDA


def to_compute_dtype(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """An input as the methods see it: rounded to the config's `dtype` first (as mergekit does),
    then in the compute dtype."""
    if not x.dtype.is_floating_point:
        return x
    if plan.input_dtype is not None:
        x = x.to(plan.input_dtype)
    return x.to(plan.compute_dtype)


class InputReader:
    """Reads input tensors for merging, noting non-finite values and (optionally) content hashes."""

    def __init__(self, checkpoints: Mapping[str, Checkpoint], nonfinite: NonFiniteInputs, hasher: InputHasher | None) -> None:
        self.checkpoints = checkpoints
        self.nonfinite = nonfinite
        self.hasher = hasher

    def __call__(self, model: str, tensor: str, pin_memory: bool = False) -> torch.Tensor:
        ckpt = self.checkpoints[model]
        # Other readers (base+adapter, GGUF) take no pin flag; only the CUDA path passes it.
        x = ckpt.read(tensor, pin_memory=True) if pin_memory else ckpt.read(tensor)
        self.nonfinite.check(model, tensor, x)
        if self.hasher is not None:
            self.hasher.add(model, tensor, x)  # on the reading thread, beside the I/O
        return x

    def nbytes(self, source: TensorSource) -> int:
        return self.checkpoints[source.model].tensors[source.tensor].nbytes

    def prefetch(self, source: TensorSource) -> None:
        """Ask the kernel to start reading `source` (readers without the hint ignore it)."""
        getattr(self.checkpoints[source.model], "prefetch", lambda name: None)(source.tensor)

    def input_digests(self, recipes: list[TensorRecipe]) -> dict[str, dict[str, str]]:
        """The digests of the inputs `recipes` were made from, as the manifest records them with a shard."""
        return self.hasher.digests_of(s for r in recipes for s in r.sources()) if self.hasher else {}
