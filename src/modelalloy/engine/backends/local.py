"""The local backend: every unfinished shard (or one GGUF file) from this process's thread pool."""

from __future__ import annotations

import copy
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from modelalloy.engine.backends import ShardsWritten, ShardWork
from modelalloy.engine.inputs import InputHasher, InputReader
from modelalloy.engine.options import MergeOptions, Progress
from modelalloy.engine.worker import torch_threads_per_worker, write_recipes
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.writer import OutputTensor
from modelalloy.plan import Plan, TensorRecipe


class LocalBackend:
    def check(self, options: MergeOptions) -> None:
        pass  # writes every output format

    def write_shards(self, work: ShardWork, progress: Callable[[Progress], None] | None) -> ShardsWritten:
        job, plan, options = work.job, work.plan, work.options
        hasher = InputHasher(job.manifest.input_digests()) if options.hash_inputs else None
        read = InputReader(work.checkpoints, work.nonfinite, hasher)
        recipes_in = job.recipes_by_shard(plan)

        def shard_done(file: str, size: int, digest: str) -> None:
            job.manifest.add(file, digest, size, read.input_digests(recipes_in[file]))

        if options.out_format == "gguf":  # one file, written whole (no shards to resume from)
            writer = _gguf_writer(plan, work.checkpoints, job.partial, job.specs, options)
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
        return ShardsWritten(files, hasher.result() if hasher else {})


def _gguf_writer(plan: Plan, checkpoints: Mapping[str, Checkpoint], partial: Path, specs: list[OutputTensor], options: MergeOptions):
    """One GGUF file, its metadata (config, tokenizer, chat template) written before any tensor."""
    from modelalloy.io.gguf import GGUFWriter
    from modelalloy.plan.tokenizer import load_tokenizer

    tokenizer = plan.vocab.tokenizer if plan.vocab is not None else load_tokenizer(checkpoints[plan.donor])
    if plan.chat_template is not None:
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = plan.chat_template
    try:
        return GGUFWriter(partial / "model.gguf", specs, config=plan.output_config, tokenizer=tokenizer, out_type=options.out_type)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
