"""Running a plan: read each recipe's inputs, merge, cast, write; a few recipes in flight at once.

Two paths, one result. A recipe whose method has a blockwise form (linear, SLERP, the task-vector
family) and whose inputs are plain safetensors tensors is *streamed* (`stream_tensor`): read in
row blocks of 2^18 entries straight from the files, merged block by block, each output block
written at its offset, so memory holds a few blocks whatever the tensor's size. Any other recipe
(per-matrix methods, vocabulary alignment, base+adapter or GGUF inputs, CUDA) is merged whole from
tensors a read-ahead thread reads in plan order. Either way the recipes in flight (`threads`)
bound memory, threads overlap reading (positioned reads release the GIL) with arithmetic (torch
kernels release it too), and results do not depend on the thread count: every tensor has a fixed
place in the output files and its own random seed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import shutil
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from modelalloy.errors import ConfigError, MergeError, OutputError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.manifest import Manifest, new_digest, open_partial
from modelalloy.io.output import write_model_card, write_tokenizer_files
from modelalloy.io.writer import OutputTensor, ShardedWriter, layout_shards, parse_size, shard_names, write_text_durably
from modelalloy.methods import get_method
from modelalloy.io.spans import SpanReader, SpanSource
from modelalloy.methods.blockwise import Block, BlockMerge, TensorSpec, block_rows
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
    hash_inputs: bool = Field(True, description="BLAKE3 digest of every input tensor read, recorded in the model card")
    out_format: Literal["safetensors", "gguf"] = Field("safetensors", description="output weights: safetensors shards, or one GGUF file (llama.cpp)")
    out_type: Literal["f32", "f16", "bf16", "q8_0"] = Field("f16", description="tensor type inside a GGUF output (norms stay f32)")
    resume: bool = Field(True, description="reuse the finished shards an interrupted run of the same merge left in OUT.partial")
    backend: Literal["local", "ray"] = Field("local", description="local: a thread pool in this process; ray: one Ray task per output shard (inputs and output on storage every worker sees)")
    ray_address: str | None = Field(None, description="with --backend ray: the Ray cluster to join (e.g. auto, ray://host:10001); without it a local Ray instance is started")


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
    shards_reused: int = 0  # finished shards taken over from an interrupted run

    def summary(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "tensors": self.tensors,
            "bytes_written": self.bytes_written,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "input_hashes": self.input_hashes,
            "shards_reused": self.shards_reused,
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


def _all_finite(x: torch.Tensor) -> bool:
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


def checked_output(recipe: TensorRecipe, out: torch.Tensor) -> torch.Tensor:
    """A method's result (or a block of it) cast to the output dtype on the CPU; a NaN or Inf,
    or an overflow in the cast, is an error naming the tensor."""
    result = out.to(device="cpu", dtype=recipe.out_dtype)
    # NaN and Inf survive the cast, so one check of the result finds both kinds of problem.
    if result.is_floating_point() and not _all_finite(result):
        if out.is_floating_point() and not _all_finite(out):
            raise MergeError(f"{recipe.name}: {recipe.method} produced NaN or Inf; check the inputs and parameters for this tensor")
        dtype = str(recipe.out_dtype).removeprefix("torch.")
        raise MergeError(f"{recipe.name}: the {recipe.method} result overflows {dtype} (Inf after the cast); use a wider out_dtype or smaller weights")
    return result


def _method_params(recipe: TensorRecipe) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.params.items()}


@contextlib.contextmanager
def _naming(recipe: TensorRecipe):
    """A method refusing degenerate inputs does not know the tensor's name: add it."""
    try:
        yield
    except MergeError as e:
        raise MergeError(f"{recipe.name}: {e}") from None


def merge_tensor(recipe: TensorRecipe, read: Callable[[str, str], torch.Tensor], plan: Plan, device: torch.device) -> torch.Tensor:
    """Compute one output tensor (in the output dtype, on the CPU)."""
    method = get_method(recipe.method)
    if recipe.aligned:  # embedding/head rows are put in the output vocabulary's order first
        read = plan.vocab.aligned_reader(read)

    def load(model: str, tensor: str) -> torch.Tensor:
        # To the device first: from a pinned buffer the copy is asynchronous (it overlaps the
        # reading of the next inputs), and the conversions then run on the device.
        return to_compute_dtype(read(model, tensor).to(device=device, non_blocking=True), plan)

    if recipe.method == "passthrough" and recipe.params.get("scale", (1.0,))[0] == 1.0:
        # A pure copy: no float round trip, so the bytes are exactly the input's when dtypes agree.
        src = recipe.inputs[0]
        return read(src.model, src.tensor).to(recipe.out_dtype)
    inputs = [load(s.model, s.tensor) for s in recipe.inputs]
    base = load(recipe.base.model, recipe.base.tensor) if recipe.base else None
    # Statistics are not rounded to the config's `dtype`: they are weights, not model tensors.
    stats = [read(s.model, s.tensor).to(device=device, dtype=plan.compute_dtype) for s in recipe.stats] or None
    with _naming(recipe):
        out = method(inputs, base=base, seed=recipe.seed, stats=stats, **_method_params(recipe))
    del inputs, base, stats  # the inputs are the bulk of this recipe's memory
    return checked_output(recipe, out)


def streams(recipe: TensorRecipe, plan: Plan, checkpoints: Mapping[str, Checkpoint], device: torch.device) -> bool:
    """Whether `recipe` can be merged in row blocks straight from the input files (`stream_tensor`):
    a blockwise method on the CPU, every input a plain floating-point tensor in a safetensors file,
    no vocabulary alignment and no per-model statistics."""
    if device.type != "cpu" or recipe.aligned or recipe.stats or not get_method(recipe.method).blockwise:
        return False
    return all(checkpoints[s.model].streams(s.tensor) and checkpoints[s.model].tensors[s.tensor].dtype.is_floating_point for s in recipe.sources())


def _block_merge(recipe: TensorRecipe, plan: Plan) -> tuple[BlockMerge, TensorSpec]:
    spec = TensorSpec(recipe.shape, plan.compute_dtype, torch.device("cpu"))
    with _naming(recipe):
        return get_method(recipe.method).block_merge(spec, seed=recipe.seed, **_method_params(recipe)), spec


def span_sources(recipe: TensorRecipe, plan: Plan, checkpoints: Mapping[str, Checkpoint]) -> list[tuple[tuple[int, TensorSource], SpanSource]]:
    """What a streamed recipe reads, for the `SpanReader` (which keeps the spans of a merge with
    statistics passes until the recipe is done: direct reads fill no page cache to re-read)."""
    merge, spec = _block_merge(recipe, plan)
    granule_entries = block_rows(spec) * spec.row_length
    out = []
    for s in dict.fromkeys(recipe.sources()):
        loc = checkpoints[s.model].tensors[s.tensor]
        if loc.start % loc.dtype.itemsize:  # a typed view of the bytes needs an aligned start
            return []
        out.append(((id(recipe), s), SpanSource(loc.file, loc.start, loc.nbytes, granule_entries * loc.dtype.itemsize, reads=merge.passes + 1)))
    return out


def stream_tensor(recipe: TensorRecipe, read: InputReader, plan: Plan, writer: ShardedWriter, spans: SpanReader | None = None) -> None:
    """Merge one tensor in row blocks (`methods/blockwise.py`) and write each output block at its
    offset: every pass reads the inputs' rows (from `spans` when it holds them, read ahead; else
    from the files, the first pass from disk and the others from the page cache), so memory holds
    a few blocks (or, from `spans`, the recipe's spans) whatever the tensor's size. The first
    pass also hashes the inputs and checks them for NaN/Inf, as whole-tensor reads do."""
    merge, spec = _block_merge(recipe, plan)
    sources = list(dict.fromkeys(recipe.sources()))
    hashes = {s: new_digest() for s in sources if read.hasher is not None and not read.hasher.known(s.model, s.tensor)}
    rows = block_rows(spec)
    stored = {s: read.checkpoints[s.model].tensors[s.tensor].dtype for s in sources}
    spanned = {s: (id(recipe), s) for s in sources if spans is not None and (id(recipe), s) in spans}
    buffers = {s: torch.empty(rows * spec.row_length * stored[s].itemsize, dtype=torch.uint8) for s in sources}  # raw bytes, reused
    # Inputs already in the config's dtype (or without one) are converted into reused buffers.
    converted = {s: torch.empty(rows * spec.row_length, dtype=plan.compute_dtype) for s in sources if plan.input_dtype in (None, stored[s])}
    for step in range(merge.passes + 1):
        with _naming(recipe):  # e.g. statistics that leave the method no answer
            merge.start(step)
        for first_row in range(0, spec.rows, rows):
            start, stop = first_row * spec.row_length, min(spec.rows, first_row + rows) * spec.row_length
            raws, values = {}, {}
            for s in sources:
                size = stored[s].itemsize
                raw = spans.read(spanned[s], start * size, stop * size) if s in spanned else None
                if raw is None:  # not read ahead, or in the page cache
                    raw = read.checkpoints[s.model].read_entries(s.tensor, start, stop, buffers[s])
                raws[s] = raw = raw.view(stored[s])
                if step == 0:
                    if not merge.spreads_nonfinite:
                        read.nonfinite.check(s.model, s.tensor, raw)
                    if s in hashes:
                        hashes[s].update(memoryview(raw.view(torch.uint8).numpy()))
                value = converted[s][: raw.numel()].copy_(raw) if s in converted else to_compute_dtype(raw, plan)
                values[s] = value.reshape(-1, spec.row_length)
            block = Block(start, [values[s] for s in recipe.inputs], values[recipe.base] if recipe.base else None)
            with _naming(recipe):
                if step < merge.passes:
                    merge.observe(block)
                    continue
                out = merge.output(block)
            try:
                result = checked_output(recipe, out)
            except MergeError:
                if merge.spreads_nonfinite:  # the inputs were not checked: name those at fault
                    for s, raw in raws.items():
                        read.nonfinite.check(s.model, s.tensor, raw)
                raise
            writer.write_range(recipe.name, start, result)
        if step == 0:
            for s, h in hashes.items():
                read.hasher.put(s.model, s.tensor, h.hexdigest())
    for key in spanned.values():
        spans.release(key)
    writer.finish(recipe.name)


def execute(
    plan: Plan,
    checkpoints: Mapping[str, Checkpoint],
    out_dir: str | Path,
    *,
    options: MergeOptions = MergeOptions(),
    progress: Callable[[Progress], None] | None = None,
) -> MergeResult:
    """Write the merged model to `out_dir` (via `out_dir.partial`, renamed when complete).

    Shards finished by an interrupted run of the same plan are verified and kept (see
    `io/manifest.py`); the result is bit-identical to an uninterrupted run, on either backend.
    """
    if options.backend == "ray" and options.out_format != "safetensors":
        raise ConfigError(f"--backend ray writes safetensors shards; --out-format {options.out_format} (one file) needs --backend local")
    job = prepare_output(plan, checkpoints, Path(out_dir), options)
    start = time.perf_counter()
    nonfinite = _NonFiniteInputs()
    try:
        if options.backend == "ray":
            from modelalloy.backends.ray_backend import write_shards_on_ray  # Ray is an optional extra

            files, input_hashes = write_shards_on_ray(job, plan, checkpoints, options, nonfinite, progress)
        else:
            files, input_hashes = _write_shards_locally(job, plan, checkpoints, options, nonfinite, progress)
    except MergeError:
        # The same plan would fail the same way again, so its shards are not worth resuming from.
        shutil.rmtree(job.partial, ignore_errors=True)
        raise
    finally:
        nonfinite.warn()
    finish_output(job, plan, checkpoints, options, input_hashes)
    return MergeResult(job.out_dir, len(plan.recipes), plan.output_bytes, files, time.perf_counter() - start, input_hashes, len(job.reused))


@dataclass
class OutputJob:
    """An output being written: where, its fixed shard layout, and the shards already finished."""

    out_dir: Path
    partial: Path
    specs: list[OutputTensor]
    metadata: dict[str, str]
    max_shard_size: int
    device: torch.device
    manifest: Manifest | None  # None in a Ray worker's copy: only the driver records finished shards
    files: list[str]  # every shard file, in layout order
    shard_of: dict[str, str]  # output tensor -> its shard file
    reused: frozenset[str]  # shards an interrupted run finished (verified by their digests)

    def writer(self, *, finished: Collection[str], on_shard_done: Callable[[str, int, str], None] | None = None) -> ShardedWriter:
        """A writer for this layout that leaves the shards in `finished` alone (done, or someone else's)."""
        return ShardedWriter(self.partial, self.specs, max_shard_size=self.max_shard_size, metadata=self.metadata, finished=finished, on_shard_done=on_shard_done)

    def recipes_by_shard(self, plan: Plan) -> dict[str, list[TensorRecipe]]:
        grouped: dict[str, list[TensorRecipe]] = {f: [] for f in self.files}
        for r in plan.recipes:
            grouped[self.shard_of[r.name]].append(r)
        return grouped


def prepare_output(plan: Plan, checkpoints: Mapping[str, Checkpoint], out_dir: Path, options: MergeOptions) -> OutputJob:
    """Check the output, lay out its shards and open OUT.partial with an interrupted run's finished shards."""
    device = resolve_device(options.device)
    check_output(out_dir, checkpoints, plan.output_bytes, force=options.force)
    specs = [OutputTensor(r.name, r.out_dtype, r.shape) for r in plan.recipes]
    metadata = {"modelalloy_method": plan.method.name}
    max_shard_size = parse_size(options.max_shard_size)
    layout = layout_shards(specs, max_shard_size)
    files = shard_names(len(layout))
    partial = out_dir.with_name(out_dir.name + ".partial")
    fingerprint = plan_fingerprint(plan, checkpoints, layout, metadata, device)
    # One GGUF file has no finished shards to resume from: it is always written afresh.
    manifest = open_partial(partial, fingerprint, resume=options.resume and options.out_format == "safetensors")
    shard_of = {t.name: file for file, shard in zip(files, layout) for t in shard}
    return OutputJob(out_dir, partial, specs, metadata, max_shard_size, device, manifest, files, shard_of, frozenset(manifest.shards))


class InputReader:
    """Reads input tensors for merging, noting non-finite values and (optionally) content hashes."""

    def __init__(self, checkpoints: Mapping[str, Checkpoint], nonfinite: _NonFiniteInputs, hasher: _InputHasher | None) -> None:
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


def write_recipes(
    recipes: list[TensorRecipe],
    writer: ShardedWriter,
    read: InputReader,
    plan: Plan,
    device: torch.device,
    threads: int,
    on_written: Callable[[TensorRecipe], None] | None = None,
) -> None:
    """Merge and write `recipes`, `threads` at a time (1: inline); the first error stops the rest.

    A read-ahead thread reads the next recipes' inputs (in plan order) while these compute."""
    # Test hook: slows every tensor down so that interruption tests can kill a run mid-way.
    debug_delay = float(os.environ.get("MODELALLOY_DEBUG_SECONDS_PER_TENSOR") or 0)
    # Within each shard the largest tensors go first, so that the workers finish together instead
    # of one merging the last big tensor alone; shards still finish (and become resumable) in order.
    shard_of = writer.shard_of() if isinstance(writer, ShardedWriter) else {}
    shard_rank = {file: i for i, file in enumerate(dict.fromkeys(shard_of.get(r.name, "") for r in recipes))}
    recipes = sorted(recipes, key=lambda r: (shard_rank[shard_of.get(r.name, "")], -r.out_nbytes))
    # Recipes that stream in row blocks read their own inputs; the read-ahead serves the rest.
    streamed = {id(r) for r in recipes if isinstance(writer, ShardedWriter) and streams(r, plan, read.checkpoints, device)}
    whole = [r for r in recipes if id(r) not in streamed]
    jobs = [r.sources() for r in whole]
    # Streamed recipes are read ahead in spans (`io/spans.py`) where the span reader takes them;
    # the kernel is asked to fetch the others' inputs into the page cache ahead of the workers.
    spanned = [span_sources(r, plan, read.checkpoints) if id(r) in streamed else [] for r in recipes]
    # One recipe's inputs ahead of the workers (at least 256 MiB, so small tensors stream freely).
    budget = max(256 * 2**20, max((sum(read.nbytes(s) for s in job) for job in jobs), default=0))
    reader = ReadAhead(
        jobs,
        lambda s, pin_memory: read(s.model, s.tensor, pin_memory),
        read.nbytes,
        budget=budget,
        prefetch=read.prefetch,
        pin_memory=device.type == "cuda",
    )
    spans = SpanReader([s for s in spanned if s])
    index = {id(r): i for i, r in enumerate(whole)}
    hint = _PrefetchWindow([r for r, s in zip(recipes, spanned) if not any(key in spans for key, _ in s)], read)

    def run(recipe: TensorRecipe) -> None:
        hint.started(recipe)
        if id(recipe) in streamed:
            stream_tensor(recipe, read, plan, writer, spans)
        else:
            merge_whole_recipe(recipe)
        if debug_delay:
            time.sleep(debug_delay)
        if on_written is not None:
            on_written(recipe)

    def merge_whole_recipe(recipe: TensorRecipe) -> None:
        inputs = reader.take(index[id(recipe)])
        uses = Counter(recipe.sources())

        def take_input(model: str, tensor: str) -> torch.Tensor:
            key = TensorSource(model, tensor)
            if key not in uses:  # read beyond the recipe's sources (vocabulary rows filled from another model)
                return read(model, tensor)
            # Popped at its last use, so a read buffer is freed once converted, as before read-ahead.
            uses[key] -= 1
            return inputs[key] if uses[key] > 0 else inputs.pop(key)

        writer.write(recipe.name, merge_tensor(recipe, take_input, plan, device))

    try:
        if threads == 1:
            for recipe in recipes:
                run(recipe)
        else:
            _run_bounded(recipes, run, threads)
    finally:
        reader.close()
        spans.close()


class _PrefetchWindow:
    """Keeps the disk busy ahead of the workers: when a recipe starts, the kernel is asked to
    fetch the inputs of the recipes after it, up to `window` bytes ahead (a hint: page cache, not
    our memory). Streamed recipes read their blocks synchronously, so without it a cold disk
    would idle while they compute."""

    def __init__(self, recipes: list[TensorRecipe], read: InputReader, window: int = 512 * 2**20) -> None:
        self.recipes, self.read, self.window = recipes, read, window
        self.position = {id(r): i for i, r in enumerate(recipes)}
        self.start_bytes = [0]  # input bytes of the recipes before each one
        for r in recipes:
            self.start_bytes.append(self.start_bytes[-1] + sum(read.nbytes(s) for s in r.sources()))
        self.hinted = 0  # recipes [0, hinted) have been asked for
        self.lock = threading.Lock()
        if recipes:
            self.started(recipes[0])

    def started(self, recipe: TensorRecipe) -> None:
        i = self.position.get(id(recipe))
        if i is None:  # read by other means
            return
        with self.lock:
            todo = []
            while self.hinted < len(self.recipes) and self.start_bytes[self.hinted] <= self.start_bytes[i] + self.window:
                todo.append(self.recipes[self.hinted])
                self.hinted += 1
        for r in todo:
            for s in r.sources():
                self.read.prefetch(s)


def _write_shards_locally(
    job: OutputJob,
    plan: Plan,
    checkpoints: Mapping[str, Checkpoint],
    options: MergeOptions,
    nonfinite: _NonFiniteInputs,
    progress: Callable[[Progress], None] | None,
) -> tuple[list[str], dict[str, str]]:
    """The local backend: every unfinished shard from this process's thread pool; returns (files, input hashes)."""
    hasher = _InputHasher(job.manifest.input_digests()) if options.hash_inputs else None
    read = InputReader(checkpoints, nonfinite, hasher)
    recipes_in = job.recipes_by_shard(plan)

    def shard_done(file: str, size: int, digest: str) -> None:
        job.manifest.add(file, digest, size, read.input_digests(recipes_in[file]))

    if options.out_format == "gguf":  # one file, written whole (no shards to resume from)
        writer = _gguf_writer(plan, checkpoints, job.partial, job.specs, options)
    else:
        writer = job.writer(finished=job.reused, on_shard_done=shard_done)
    todo = [r for r in plan.recipes if job.shard_of[r.name] not in job.reused]
    start = time.perf_counter()
    done = len(plan.recipes) - len(todo)
    written = sum(r.out_nbytes for r in plan.recipes if job.shard_of[r.name] in job.reused)
    lock = threading.Lock()

    def on_written(recipe: TensorRecipe) -> None:
        nonlocal done, written
        with lock:
            done += 1
            written += recipe.out_nbytes
            if progress is not None:
                progress(Progress(done, len(plan.recipes), written, plan.output_bytes, recipe.name, time.perf_counter() - start))

    try:
        with torch_threads_per_worker(options.threads):
            write_recipes(todo, writer, read, plan, job.device, options.threads, on_written)
        files = writer.finalize()
    except BaseException:
        writer.abort()  # finished shards stay recorded in the manifest: a rerun resumes from them
        raise
    return files, hasher.result() if hasher else {}


def finish_output(job: OutputJob, plan: Plan, checkpoints: Mapping[str, Checkpoint], options: MergeOptions, input_hashes: dict[str, str]) -> None:
    """Every shard is written (and the index): add config, support files and card, then rename into place."""
    partial, out_dir = job.partial, job.out_dir
    write_text_durably(partial / "config.json", json.dumps(plan.output_config, indent=2, sort_keys=True) + "\n")
    if options.copy_tokenizer:
        tokenizer = plan.vocab.tokenizer if plan.vocab is not None else None
        write_tokenizer_files(checkpoints[plan.donor], partial, tokenizer=tokenizer, chat_template=plan.chat_template)
    if plan.vocab is not None:
        write_text_durably(partial / "vocab_report.json", json.dumps(plan.vocab.report, indent=2, ensure_ascii=False) + "\n")
    if options.write_model_card:
        write_model_card(partial, plan, checkpoints, input_hashes)
    _fsync_dir(partial)
    if out_dir.exists():  # only reachable with --force (checked in check_output)
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    _fsync_dir(out_dir.parent)


def plan_fingerprint(plan: Plan, checkpoints: Mapping[str, Checkpoint], layout: list[list[OutputTensor]], metadata: dict, device: torch.device) -> str:
    """SHA-256 of everything that decides the output bytes: recipes, shard layout, the input files
    (path, size, mtime), code version and device. Finished shards are reused only on a match."""
    from modelalloy import __version__

    h = hashlib.sha256()

    def put(*items: object) -> None:
        h.update(repr(items).encode() + b"\n")

    put(__version__, device.type, str(plan.input_dtype), str(plan.compute_dtype), sorted(metadata.items()))
    for r in plan.recipes:
        put(r.name, r.method, [(s.model, s.tensor) for s in r.sources()], r.base is not None, sorted(r.params.items()), r.shape, str(r.out_dtype), r.seed)
    for shard in layout:
        put([t.name for t in shard])
    if plan.vocab is not None:  # which row of which model fills each output row
        put(plan.vocab.fingerprint())
    for ref in sorted({s.model for r in plan.recipes for s in r.sources()}):
        for file in checkpoints[ref].weight_files:
            st = os.stat(file)
            put(ref, file, st.st_size, st.st_mtime_ns)
    return h.hexdigest()


class _NonFiniteInputs:
    """Names of input tensors holding NaN or Inf, checked on each tensor as it is read (one pass
    over memory already in cache), reported once as a warning: the user should know, but a
    method that drops those entries (TIES trimming, another model's slice) may still be fine."""

    def __init__(self) -> None:
        self.found: set[str] = set()
        self._lock = threading.Lock()

    def check(self, model: str, tensor: str, x: torch.Tensor) -> None:
        if x.is_floating_point() and not _all_finite(x):
            with self._lock:
                self.found.add(f"{tensor} in {model}")

    def warn(self) -> None:
        if self.found:
            names = sorted(self.found)
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            warnings.warn(f"input tensors hold NaN or Inf: {', '.join(names[:5])}{more}; check those models", stacklevel=3)


def _gguf_writer(plan: Plan, checkpoints: Mapping[str, Checkpoint], partial: Path, specs: list[OutputTensor], options: MergeOptions):
    """One GGUF file, its metadata (config, tokenizer, chat template) written before any tensor."""
    from modelalloy.io.gguf import GGUFWriter
    from modelalloy.tokenizer import load_tokenizer

    tokenizer = plan.vocab.tokenizer if plan.vocab is not None else load_tokenizer(checkpoints[plan.donor])
    if plan.chat_template is not None:
        import copy

        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = plan.chat_template
    try:
        return GGUFWriter(partial / "model.gguf", specs, config=plan.output_config, tokenizer=tokenizer, out_type=options.out_type)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def keep_freed_buffers() -> None:
    """glibc only: keep freed buffers (< 32 MiB) for reuse instead of returning them to the kernel
    after every block and faulting them in again (measured on 1.1B merges, 2 threads: TIES 17.0 s
    → 15.8 s; with 1M-entry blocks, 1.3M page faults → 0.13M). Whole-tensor buffers (≥ 32 MiB)
    are still mapped and unmapped one by one, and at most 128 MiB of free heap is kept per arena."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - not glibc (musl, macOS): leave the allocator alone
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 128 << 20)


@contextlib.contextmanager
def torch_threads_per_worker(workers: int):
    """Share the cores among our worker threads: torch's own intra-op threads on top of them
    would oversubscribe the machine (measured: slower, not faster, on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def fresh_partial(out_dir: Path, checkpoints: Mapping[str, Checkpoint], out_bytes: int, *, force: bool) -> Path:
    """Check the output location and create an empty `OUT.partial/`, for writers that do not resume (`alloy moe`)."""
    check_output(out_dir, checkpoints, out_bytes, force=force)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def check_output(out_dir: Path, checkpoints: Mapping[str, Checkpoint], out_bytes: int, *, force: bool) -> None:
    """Refuse an output that exists (without `force`), overlaps an input, or does not fit on disk.

    `alloy plan CONFIG OUT` runs this too, so these surface before any input is read."""
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
    partial = out_dir.with_name(out_dir.name + ".partial")
    # An interrupted run's shards are kept or overwritten in place: their allocated blocks (not their
    # size: unwritten regions of a laid-out shard are holes) count as available.
    reusable = sum(f.stat().st_blocks * 512 for f in partial.iterdir() if f.is_file()) if partial.is_dir() else 0
    if out_bytes > free + reusable:
        raise OutputError(
            f"{out_dir}: the merge writes {out_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free there; "
            "free some space or choose another disk"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
