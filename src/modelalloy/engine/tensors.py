"""Computing one output tensor: whole (`merge_tensor`), or streamed in row blocks straight from
the input files and written block by block at its offset (`stream_tensor`).

A recipe whose method has a blockwise form (linear, SLERP, the task-vector family) and whose
inputs are plain safetensors tensors is streamed, so memory holds a few blocks whatever the
tensor's size. Any other recipe (per-matrix methods, vocabulary alignment, base+adapter or GGUF
inputs, CUDA) is merged whole. Both give the same result (tested), cast to the output dtype with a
NaN/Inf check that names the tensor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch

from modelalloy.engine.inputs import InputReader, all_finite, to_compute_dtype
from modelalloy.errors import MergeError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.manifest import new_digest
from modelalloy.io.spans import SpanReader, SpanSource
from modelalloy.io.writer import ShardedWriter
from modelalloy.methods import get_method
from modelalloy.methods.blockwise import Block, BlockMerge, TensorSpec, block_rows
from modelalloy.plan import Plan, TensorRecipe, TensorSource


def checked_output(recipe: TensorRecipe, out: torch.Tensor) -> torch.Tensor:
    """A method's result (or a block of it) cast to the output dtype on the CPU; a NaN or Inf,
    or an overflow in the cast, is an error naming the tensor."""
    result = out.to(device="cpu", dtype=recipe.out_dtype)
    # NaN and Inf survive the cast, so one check of the result finds both kinds of problem.
    if result.is_floating_point() and not all_finite(result):
        if out.is_floating_point() and not all_finite(out):
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
    # Inputs already in the config's dtype (or without one) are converted into reused buffers,
    # unless the merge takes them as stored.
    as_stored = merge.takes_bfloat16 and spec.dtype == torch.float32 and all(stored[s] == torch.bfloat16 and plan.input_dtype in (None, torch.bfloat16) for s in sources)
    converted = {s: torch.empty(rows * spec.row_length, dtype=plan.compute_dtype) for s in sources if plan.input_dtype in (None, stored[s]) and not as_stored}
    # The inputs' NaN/Inf check (which names them) runs in the first pass, or, when the merge's
    # first pass shows whether there is any (`finds_nonfinite`), in the second, only if it saw one.
    check_in_pass = None if merge.spreads_nonfinite else 1 if merge.finds_nonfinite else 0
    for step in range(merge.passes + 1):
        with _naming(recipe):  # e.g. statistics that leave the method no answer
            merge.start(step)
        if step == 1 and check_in_pass == 1 and not merge.first_pass_saw_nonfinite():
            check_in_pass = None
        for first_row in range(0, spec.rows, rows):
            start, stop = first_row * spec.row_length, min(spec.rows, first_row + rows) * spec.row_length
            raws, values = {}, {}
            for s in sources:
                size = stored[s].itemsize
                raw = spans.read(spanned[s], start * size, stop * size) if s in spanned else None
                if raw is None:  # not read ahead, or in the page cache
                    raw = read.checkpoints[s.model].read_entries(s.tensor, start, stop, buffers[s])
                raws[s] = raw = raw.view(stored[s])
                if step == check_in_pass:
                    read.nonfinite.check(s.model, s.tensor, raw)
                if step == 0 and s in hashes:
                    hashes[s].update(memoryview(raw.view(torch.uint8).numpy()))
                if as_stored:
                    value = raw
                else:
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
