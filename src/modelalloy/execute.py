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
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from modelalloy.errors import MergeError, OutputError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.manifest import open_partial, sha256_file
from modelalloy.io.output import write_model_card, write_tokenizer_files
from modelalloy.io.writer import OutputTensor, ShardedWriter, layout_shards, parse_size, write_text_durably
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
    out_format: Literal["safetensors", "gguf"] = Field("safetensors", description="output weights: safetensors shards, or one GGUF file (llama.cpp)")
    out_type: Literal["f32", "f16", "bf16", "q8_0"] = Field("f16", description="tensor type inside a GGUF output (norms stay f32)")
    resume: bool = Field(True, description="reuse the finished shards an interrupted run of the same merge left in OUT.partial")


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
    """Order-independent content hash per model: SHA-256 over sorted (tensor, SHA-256 of bytes)."""

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
    if recipe.aligned:  # embedding/head rows are put in the output vocabulary's order first
        read = plan.vocab.aligned_reader(read)

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
    # Statistics are not rounded to the config's `dtype`: they are weights, not model tensors.
    stats = [read(s.model, s.tensor).to(device=device, dtype=plan.compute_dtype) for s in recipe.stats] or None
    generator = torch.Generator(device="cpu").manual_seed(recipe.seed) if method.randomized else None
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.params.items()}
    try:
        out = method(inputs, base=base, generator=generator, stats=stats, **params)
    except MergeError as e:  # a method refusing degenerate inputs does not know the tensor's name
        raise MergeError(f"{recipe.name}: {e}") from None
    del inputs, base, stats  # the inputs are the bulk of this recipe's memory
    if out.is_floating_point() and not _all_finite(out):
        raise MergeError(f"{recipe.name}: {recipe.method} produced NaN or Inf; check the inputs and parameters for this tensor")
    result = out.to(device="cpu", dtype=recipe.out_dtype)
    if result.is_floating_point() and not _all_finite(result):
        dtype = str(recipe.out_dtype).removeprefix("torch.")
        raise MergeError(f"{recipe.name}: the {recipe.method} result overflows {dtype} (Inf after the cast); use a wider out_dtype or smaller weights")
    return result


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
    `io/manifest.py`); the result is bit-identical to an uninterrupted run.
    """
    out_dir = Path(out_dir)
    device = resolve_device(options.device)
    check_output(out_dir, checkpoints, plan.output_bytes, force=options.force)
    specs = [OutputTensor(r.name, r.out_dtype, r.shape) for r in plan.recipes]
    metadata = {"modelalloy_method": plan.method.name}
    max_shard_size = parse_size(options.max_shard_size)
    partial = out_dir.with_name(out_dir.name + ".partial")
    fingerprint = plan_fingerprint(plan, checkpoints, layout_shards(specs, max_shard_size), metadata, device)
    # One GGUF file has no finished shards to resume from: it is always written afresh.
    manifest = open_partial(partial, fingerprint, resume=options.resume and options.out_format == "safetensors")
    reused = set(manifest.shards)
    hasher = _InputHasher(manifest.input_digests()) if options.hash_inputs else None
    nonfinite = _NonFiniteInputs()

    def read(source: TensorSource, pin_memory: bool) -> torch.Tensor:
        ckpt = checkpoints[source.model]
        # Other readers (base+adapter) take no pin flag; only the CUDA path passes it.
        x = ckpt.read(source.tensor, pin_memory=True) if pin_memory else ckpt.read(source.tensor)
        nonfinite.check(source.model, source.tensor, x)
        if hasher is not None:
            hasher.add(source.model, source.tensor, x)  # on the reading thread, beside the I/O
        return x

    recipes_in: dict[str, list[TensorRecipe]] = {}

    def shard_done(file: str, size: int) -> None:
        inputs = hasher.digests_of(s for r in recipes_in[file] for s in r.sources()) if hasher else {}
        manifest.add(file, sha256_file(partial / file), size, inputs)

    if options.out_format == "gguf":
        writer = _gguf_writer(plan, checkpoints, partial, specs, options)
        shard_of = {r.name: writer.path.name for r in plan.recipes}
    else:
        writer = ShardedWriter(partial, specs, max_shard_size=max_shard_size, metadata=metadata, finished=reused, on_shard_done=shard_done)
        shard_of = writer.shard_of()
    for r in plan.recipes:
        recipes_in.setdefault(shard_of[r.name], []).append(r)
    todo = [r for r in plan.recipes if shard_of[r.name] not in reused]

    def nbytes(source: TensorSource) -> int:
        return checkpoints[source.model].tensors[source.tensor].nbytes

    jobs = [r.sources() for r in todo]
    # One recipe's inputs ahead of the workers (at least 256 MiB, so small tensors stream freely).
    budget = max(256 * 2**20, max((sum(nbytes(s) for s in job) for job in jobs), default=0))
    reader = ReadAhead(
        jobs,
        read,
        nbytes,
        budget=budget,
        prefetch=lambda s: getattr(checkpoints[s.model], "prefetch", lambda name: None)(s.tensor),
        pin_memory=device.type == "cuda",
    )
    index = {id(r): i for i, r in enumerate(todo)}
    start = time.perf_counter()
    done = len(plan.recipes) - len(todo)
    written = sum(r.out_nbytes for r in plan.recipes if shard_of[r.name] in reused)
    total_bytes = plan.output_bytes
    lock = threading.Lock()
    # Test hook: slows every tensor down so that interruption tests can kill a run mid-way.
    debug_delay = float(os.environ.get("MODELALLOY_DEBUG_SECONDS_PER_TENSOR") or 0)

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
        if debug_delay:
            time.sleep(debug_delay)
        with lock:
            done += 1
            written += recipe.out_nbytes
            if progress is not None:
                progress(Progress(done, len(plan.recipes), written, total_bytes, recipe.name, time.perf_counter() - start))

    try:
        if options.threads == 1:
            for recipe in todo:
                run(recipe)
        else:
            _run_bounded(todo, run, options.threads)
        files = writer.finalize()
    except MergeError:
        # The same plan would fail the same way again, so its shards are not worth resuming from.
        writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except BaseException:
        writer.abort()  # finished shards stay recorded in the manifest: a rerun resumes from them
        raise
    finally:
        reader.close()
        nonfinite.warn()
    input_hashes = hasher.result() if hasher else {}
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
    return MergeResult(out_dir, len(plan.recipes), written, files, time.perf_counter() - start, input_hashes, len(reused))


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
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
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
    from modelalloy.vocab import load_tokenizer

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
    """Check the output location and create a fresh `OUT.partial/` (for writers that do not resume)."""
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
