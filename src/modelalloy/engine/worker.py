"""What one worker process does with its share of a plan: merge and write the recipes, `threads`
at a time, while a read-ahead thread reads the next recipes' inputs (in plan order) and the kernel
is asked to fetch the ones after. Both backends run this: the local one for the whole plan, a Ray
task for one shard. Results do not depend on the thread count: every tensor has a fixed place in
the output files and its own random seed."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch

from modelalloy.engine.inputs import InputReader
from modelalloy.engine.readahead import ReadAhead
from modelalloy.engine.tensors import merge_tensor, span_sources, stream_tensor, streams
from modelalloy.io.spans import SpanReader
from modelalloy.io.writer import ShardedWriter
from modelalloy.plan import Plan, TensorRecipe, TensorSource


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
    hint = PrefetchWindow([r for r, s in zip(recipes, spanned) if not any(key in spans for key, _ in s)], read)

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
            run_bounded(recipes, run, threads)
    finally:
        reader.close()
        spans.close()


class PrefetchWindow:
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


def run_bounded(recipes: list[TensorRecipe], run: Callable[[TensorRecipe], None], threads: int) -> None:
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
