"""Running a plan: read each recipe's inputs, merge, cast, write; a few recipes in flight at once.

Memory stays bounded by the recipes in flight (`threads`): each one holds its inputs, its
intermediates and its output, and drops them when written. Threads overlap reading (positioned
reads release the GIL) with arithmetic (torch kernels release it too). Results do not depend on
the thread count: every tensor has a fixed place in the output files and its own random seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from modelalloy.errors import MergeError, OutputError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.output import copy_support_files, write_model_card
from modelalloy.io.writer import OutputTensor, ShardedWriter, parse_size, write_text_durably
from modelalloy.methods import get_method
from modelalloy.plan import Plan, TensorRecipe, TensorSource
from modelalloy.readahead import ReadAhead


class MergeOptions(BaseModel):
    """How to run a merge; the CLI's flags are made from these fields (help text lives here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_shard_size: str = Field("5GB", description="largest output shard, e.g. 5GB, 500MB, 2GiB")
    device: str = Field("cpu", description="where the arithmetic runs: cpu, cuda or auto")
    threads: int = Field(2, ge=1, description="recipes merged at once (each overlaps reading with compute)")
    force: bool = Field(False, description="replace an existing output directory")
    allow_pickle: bool = Field(False, description="load pickle .bin checkpoints (pickle can run code: only for files you trust)")
    allow_crimes: bool = Field(False, description="merge models of different architectures")
    write_model_card: bool = Field(True, description="write README.md with the config, method and input hashes")
    copy_tokenizer: bool = Field(True, description="copy tokenizer and generation files from the donor model")
    hash_inputs: bool = Field(True, description="SHA-256 of every input tensor read, recorded in the model card")


@dataclass
class Progress:
    """What the progress callback sees after each tensor."""

    done: int
    total: int
    bytes_written: int
    total_bytes: int
    tensor: str
    elapsed: float


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int
    files: list[str]
    seconds: float
    input_hashes: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "tensors": self.tensors,
            "bytes_written": self.bytes_written,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "input_hashes": self.input_hashes,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OutputError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise OutputError(f"--device {name!r}: use cpu, cuda or auto")
    return torch.device(name)


class _InputHasher:
    """Order-independent content hash per model: SHA-256 over sorted (tensor, SHA-256 of bytes)."""

    def __init__(self) -> None:
        self._digests: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def add(self, model: str, tensor: str, value: torch.Tensor) -> None:
        data = memoryview(value.contiguous().view(torch.uint8).reshape(-1).numpy())
        digest = hashlib.sha256(data).hexdigest()  # releases the GIL on large buffers
        with self._lock:
            self._digests.setdefault(model, {})[tensor] = digest

    def result(self) -> dict[str, str]:
        out = {}
        for model, digests in self._digests.items():
            h = hashlib.sha256()
            for name in sorted(digests):
                h.update(f"{name}\0{digests[name]}\n".encode())
            out[model] = h.hexdigest()
        return out


def _all_finite(x: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf. min and max propagate NaN and show ±Inf, so one
    reduction pass answers it without a bool tensor the size of `x` (35× faster than isfinite.all)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return math.isfinite(float(low)) and math.isfinite(float(high))  # float(): a sync point on CUDA


def merge_tensor(recipe: TensorRecipe, read: Callable[[str, str], torch.Tensor], plan: Plan, device: torch.device) -> torch.Tensor:
    """Compute one output tensor (in the output dtype, on the CPU)."""
    method = get_method(recipe.method)

    def load(model: str, tensor: str) -> torch.Tensor:
        # To the device first: from a pinned buffer the copy is asynchronous (it overlaps the
        # reading of the next inputs), and the conversions below then run on the device.
        x = read(model, tensor).to(device=device, non_blocking=True)
        if plan.input_dtype is not None and x.dtype.is_floating_point:
            x = x.to(plan.input_dtype)  # mergekit's `dtype`: inputs are rounded to it first
        return x.to(dtype=plan.compute_dtype) if x.dtype.is_floating_point else x

    if recipe.method == "passthrough" and recipe.params.get("scale", (1.0,))[0] == 1.0:
        # A pure copy: no float round trip, so the bytes are exactly the input's when dtypes agree.
        src = recipe.inputs[0]
        return read(src.model, src.tensor).to(recipe.out_dtype)
    inputs = [load(s.model, s.tensor) for s in recipe.inputs]
    base = load(recipe.base.model, recipe.base.tensor) if recipe.base else None
    generator = torch.Generator(device="cpu").manual_seed(recipe.seed) if method.randomized else None
    try:
        out = method(inputs, base=base, generator=generator, **{k: list(v) if isinstance(v, tuple) else v for k, v in recipe.params.items()})
    except MergeError as e:  # a method refusing degenerate inputs does not know the tensor's name
        raise MergeError(f"{recipe.name}: {e}") from None
    del inputs, base  # the inputs are the bulk of this recipe's memory
    if out.is_floating_point() and not _all_finite(out):
        raise MergeError(f"{recipe.name}: {recipe.method} produced NaN or Inf; check the inputs and parameters for this tensor")
    return out.to(device="cpu", dtype=recipe.out_dtype)


def execute(
    plan: Plan,
    checkpoints: Mapping[str, Checkpoint],
    out_dir: str | Path,
    *,
    options: MergeOptions = MergeOptions(),
    progress: Callable[[Progress], None] | None = None,
) -> MergeResult:
    """Write the merged model to `out_dir` (via `out_dir.partial`, renamed when complete)."""
    out_dir = Path(out_dir)
    device = resolve_device(options.device)
    partial = prepare_output(out_dir, checkpoints, plan.output_bytes, force=options.force)
    hasher = _InputHasher() if options.hash_inputs else None

    def read(source: TensorSource, pin_memory: bool) -> torch.Tensor:
        x = checkpoints[source.model].read(source.tensor, pin_memory=pin_memory)
        if hasher is not None:
            hasher.add(source.model, source.tensor, x)  # on the reading thread, beside the I/O
        return x

    def nbytes(source: TensorSource) -> int:
        return checkpoints[source.model].tensors[source.tensor].nbytes

    jobs = [r.sources() for r in plan.recipes]
    # One recipe's inputs ahead of the workers (at least 256 MiB, so small tensors stream freely).
    budget = max(256 * 2**20, max((sum(nbytes(s) for s in job) for job in jobs), default=0))
    reader = ReadAhead(
        jobs,
        read,
        nbytes,
        budget=budget,
        prefetch=lambda s: checkpoints[s.model].prefetch(s.tensor),
        pin_memory=device.type == "cuda",
    )
    index = {id(r): i for i, r in enumerate(plan.recipes)}
    specs = [OutputTensor(r.name, r.out_dtype, r.shape) for r in plan.recipes]
    metadata = {"modelalloy_method": plan.method.name}
    writer = ShardedWriter(partial, specs, max_shard_size=parse_size(options.max_shard_size), metadata=metadata)
    start = time.perf_counter()
    done = written = 0
    total_bytes = plan.output_bytes
    lock = threading.Lock()

    def run(recipe: TensorRecipe) -> None:
        nonlocal done, written
        inputs = reader.take(index[id(recipe)])
        uses = Counter(recipe.sources())

        def take_input(model: str, tensor: str) -> torch.Tensor:
            # Popped at its last use, so a read buffer is freed once converted, as before read-ahead.
            key = TensorSource(model, tensor)
            uses[key] -= 1
            return inputs[key] if uses[key] > 0 else inputs.pop(key)

        writer.write(recipe.name, merge_tensor(recipe, take_input, plan, device))
        with lock:
            done += 1
            written += recipe.out_nbytes
            if progress is not None:
                progress(Progress(done, len(plan.recipes), written, total_bytes, recipe.name, time.perf_counter() - start))

    try:
        if options.threads == 1:
            for recipe in plan.recipes:
                run(recipe)
        else:
            _run_bounded(plan.recipes, run, options.threads)
        files = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    input_hashes = hasher.result() if hasher else {}
    write_text_durably(partial / "config.json", json.dumps(plan.output_config, indent=2, sort_keys=True) + "\n")
    if options.copy_tokenizer:
        copy_support_files(checkpoints[plan.donor].path, partial)
    if options.write_model_card:
        write_model_card(partial, plan, checkpoints, input_hashes)
    _fsync_dir(partial)
    if out_dir.exists():  # only reachable with --force (checked in prepare_output)
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    _fsync_dir(out_dir.parent)
    return MergeResult(out_dir, len(plan.recipes), written, files, time.perf_counter() - start, input_hashes)


def _run_bounded(recipes: list[TensorRecipe], run: Callable[[TensorRecipe], None], threads: int) -> None:
    """At most `threads` recipes in flight, started in plan order; the first error stops the rest."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
        pending = set()
        for recipe in recipes:
            if len(pending) >= threads:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in finished:
                    f.result()  # re-raises the first failure
            pending.add(pool.submit(run, recipe))
        for f in pending:
            f.result()


def prepare_output(out_dir: Path, checkpoints: Mapping[str, Checkpoint], out_bytes: int, *, force: bool) -> Path:
    """Check the output location and create `OUT.partial/`; nothing is written before this passes."""
    check_output(out_dir, checkpoints, out_bytes, force=force)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def check_output(out_dir: Path, checkpoints: Mapping[str, Checkpoint], out_bytes: int, *, force: bool) -> None:
    resolved = out_dir.resolve()
    for ckpt in checkpoints.values():
        model_dir = ckpt.path.resolve()
        if resolved == model_dir or resolved.is_relative_to(model_dir) or model_dir.is_relative_to(resolved):
            raise OutputError(f"{out_dir}: the output overlaps the input model {ckpt.ref}; choose another directory")
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir}: already exists; pass --force to replace it, or choose another directory")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if out_bytes > free:
        raise OutputError(f"{out_dir}: the merge writes {out_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free there")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
