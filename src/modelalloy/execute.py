"""Running a plan: read each recipe's inputs, merge, cast, write; a few recipes in flight at once.

Memory stays bounded by the recipes in flight (`threads`): each one holds its inputs, its
intermediates and its output, and drops them when written. Threads overlap reading (positioned
reads release the GIL) with arithmetic (torch kernels release it too). Results do not depend on
the thread count: every tensor has a fixed place in the output files and its own random seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from modelalloy.errors import MergeError, OutputError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.output import write_model_card, write_tokenizer_files
from modelalloy.io.writer import OutputTensor, ShardedWriter, parse_size, write_text_durably
from modelalloy.methods import get_method
from modelalloy.plan import Plan, TensorRecipe


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


def merge_tensor(recipe: TensorRecipe, read: Callable[[str, str], torch.Tensor], plan: Plan, device: torch.device) -> torch.Tensor:
    """Compute one output tensor (in the output dtype, on the CPU)."""
    method = get_method(recipe.method)
    if recipe.aligned:  # embedding/head rows are put in the output vocabulary's order first
        read = plan.vocab.aligned_reader(read)

    def load(model: str, tensor: str) -> torch.Tensor:
        x = read(model, tensor)
        if plan.input_dtype is not None and x.dtype.is_floating_point:
            x = x.to(plan.input_dtype)  # mergekit's `dtype`: inputs are rounded to it first
        return x.to(device=device, dtype=plan.compute_dtype if x.dtype.is_floating_point else x.dtype, non_blocking=True)

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
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):  # .item(): a sync point on CUDA
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

    def read(model: str, tensor: str) -> torch.Tensor:
        x = checkpoints[model].read(tensor)
        if hasher is not None:
            hasher.add(model, tensor, x)
        return x

    specs = [OutputTensor(r.name, r.out_dtype, r.shape) for r in plan.recipes]
    metadata = {"modelalloy_method": plan.method.name}
    if options.out_format == "gguf":
        writer = _gguf_writer(plan, checkpoints, partial, specs, options)
    else:
        writer = ShardedWriter(partial, specs, max_shard_size=parse_size(options.max_shard_size), metadata=metadata)
    start = time.perf_counter()
    done = written = 0
    total_bytes = plan.output_bytes
    lock = threading.Lock()

    def run(recipe: TensorRecipe) -> None:
        nonlocal done, written
        writer.write(recipe.name, merge_tensor(recipe, read, plan, device))
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
    if out_dir.exists():  # only reachable with --force (checked in prepare_output)
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    _fsync_dir(out_dir.parent)
    return MergeResult(out_dir, len(plan.recipes), written, files, time.perf_counter() - start, input_hashes)


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
