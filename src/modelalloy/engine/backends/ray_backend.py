"""The Ray backend: one Ray task per output shard; the driver keeps the manifest and writes the index.

Why by shard: the shard is what the manifest records and a resumed run reuses, and a shard written
by a single task needs no coordination with any other: its header, size and every tensor's offset
are fixed by the layout before anything runs. Each task opens the inputs it needs itself, from the
paths the driver resolved (so inputs and OUT.partial/ must be on storage every worker sees: one
machine's disk for a local Ray instance, a shared file system on a cluster), merges its shard's
recipes with the local backend's own code, and returns the shard's digest. The driver adds that
to the same manifest the local backend keeps, so an interrupted run resumes on either backend.
The bytes equal the local backend's: same recipes, same per-tensor seeds, same layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from modelalloy.engine.backends import ShardsWritten, ShardWork
from modelalloy.engine.inputs import InputHasher, InputReader, NonFiniteInputs
from modelalloy.engine.options import MergeOptions, Progress
from modelalloy.engine.output import OutputJob
from modelalloy.engine.worker import write_recipes
from modelalloy.errors import CheckpointError, ConfigError, ModelAlloyError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.opener import open_checkpoint
from modelalloy.io.stats_file import open_stats
from modelalloy.plan import Plan

# A worker cancelled after an interruption is waited for (so that none still writes into
# OUT.partial/ when a rerun starts) at most this long.
_CANCEL_WAIT_SECONDS = 30


@dataclass(frozen=True)
class InputFiles:
    """How a worker opens one input (model or statistics file), and the weight files as planned."""

    ref: str  # as the config wrote it: errors name it so
    path: str  # the resolved directory (or statistics file)
    is_stats: bool
    files: tuple[tuple[str, int, int], ...]  # (weight file, size, mtime_ns) the plan was made from

    @classmethod
    def of(cls, ckpt: Checkpoint) -> InputFiles:
        files = tuple((f, (st := os.stat(f)).st_size, st.st_mtime_ns) for f in ckpt.weight_files)
        return cls(ckpt.ref, str(ckpt.path), ckpt.path.is_file(), files)

    def open(self, *, allow_pickle: bool) -> Checkpoint:
        ckpt = open_stats(self.path) if self.is_stats else open_checkpoint(self.path, allow_pickle=allow_pickle)
        ckpt.ref = self.ref
        for file, size, mtime in self.files:
            st = os.stat(file)
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                ckpt.close()
                raise CheckpointError(
                    f"{self.ref}: {file} on Ray worker {os.uname().nodename} is not the file the merge was planned from "
                    "(size or modification time differ); every worker must see the same inputs (shared storage), unchanged while merging"
                )
        return ckpt


@dataclass(frozen=True)
class ShardDone:
    """What a worker sends back: the manifest record of its finished shard, and what it noticed."""

    file: str
    digest: str
    nbytes: int
    inputs: dict[str, dict[str, str]]  # model -> tensor -> digest of the input tensors read
    nonfinite_inputs: tuple[str, ...]


def merge_shard(job: OutputJob, plan: Plan, file: str, inputs: Mapping[str, InputFiles], options: MergeOptions) -> ShardDone:
    """Run in a Ray worker: merge and write the one shard `file` of OUT.partial/, leaving the others alone."""
    recipes = job.recipes_by_shard(plan)[file]
    checkpoints: dict[str, Checkpoint] = {}
    try:
        for ref in sorted({s.model for r in recipes for s in r.sources()}):
            checkpoints[ref] = inputs[ref].open(allow_pickle=options.allow_pickle)
        nonfinite = NonFiniteInputs()
        read = InputReader(checkpoints, nonfinite, InputHasher() if options.hash_inputs else None)
        done: dict[str, tuple[int, str]] = {}
        writer = job.writer(finished=[f for f in job.files if f != file], on_shard_done=lambda f, size, digest: done.update({f: (size, digest)}))
        try:
            write_recipes(recipes, writer, read, plan, job.device, options.threads)
        finally:
            writer.abort()  # closes the shard if a recipe failed; nothing is open once it is complete
        if file not in done:  # a bug of ours: the layout promised these recipes fill the shard
            raise AssertionError(f"{file}: not every tensor of the shard was written")
        size, digest = done[file]
        return ShardDone(file, digest, size, read.input_digests(recipes), tuple(sorted(nonfinite.found)))
    finally:
        for ckpt in checkpoints.values():
            ckpt.close()


class RayBackend:
    def check(self, options: MergeOptions) -> None:
        if options.out_format != "safetensors":
            raise ConfigError(f"--backend ray writes safetensors shards; --out-format {options.out_format} (one file) needs --backend local")

    def write_shards(self, work: ShardWork, progress: Callable[[Progress], None] | None) -> ShardsWritten:
        """Every unfinished shard as a Ray task; each finished one recorded in the manifest as it arrives.

        Uses the Ray connection this process has if any; otherwise joins `options.ray_address`,
        or starts a local instance and stops it after.
        """
        job, plan, checkpoints, options, nonfinite = work.job, work.plan, work.checkpoints, work.options, work.nonfinite
        ray = _import_ray()
        started = _connect(ray, options)
        try:
            grouped = job.recipes_by_shard(plan)
            todo = [f for f in job.files if grouped[f] and f not in job.reused]
            task = ray.remote(merge_shard).options(
                num_cpus=options.threads,  # the task runs `threads` recipes at once, as the local pool does
                num_gpus=1 if job.device.type == "cuda" else 0,
            )
            # Put once: every task reads the same plan and job from the object store.
            job_ref = ray.put(dataclasses.replace(job, manifest=None, lock=None))
            plan_ref = ray.put(plan)
            inputs_ref = ray.put({ref: InputFiles.of(ckpt) for ref, ckpt in checkpoints.items()})
            pending = {task.remote(job_ref, plan_ref, file, inputs_ref, options): file for file in todo}
            done = sum(len(grouped[f]) for f in job.reused)
            written = sum(r.out_nbytes for f in job.reused for r in grouped[f])
            start = time.perf_counter()
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        del pending[ref]
                        shard = _result(ray, ref)
                        job.manifest.add(shard.file, shard.digest, shard.nbytes, shard.inputs)
                        nonfinite.found.update(shard.nonfinite_inputs)
                        done += len(grouped[shard.file])
                        written += sum(r.out_nbytes for r in grouped[shard.file])
                        if progress is not None:
                            progress(Progress(done, len(plan.recipes), written, plan.output_bytes, grouped[shard.file][-1].name, time.perf_counter() - start))
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=True)
                ray.wait(list(pending), num_returns=len(pending), timeout=_CANCEL_WAIT_SECONDS)
                raise
        finally:
            if started:
                ray.shutdown()
        files = job.writer(finished=job.files).finalize()  # every shard is done: this writes the index only
        input_hashes = InputHasher(job.manifest.input_digests()).result() if options.hash_inputs else {}
        return ShardsWritten(files, input_hashes)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray, which is not installed; pip install 'modelalloy[ray]'") from None
    return ray


def _connect(ray, options: MergeOptions) -> bool:
    """Connect to Ray unless already connected; True when this call started the connection."""
    if ray.is_initialized():
        return False
    try:
        # No dashboard and no forwarded worker output: the library never prints.
        ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"--ray-address {options.ray_address}" if options.ray_address else "a local Ray instance"
        raise ConfigError(f"{where}: cannot start or join Ray ({str(e).splitlines()[0]}); check the address, or leave --ray-address out for a local instance") from None
    return True


def _result(ray, ref) -> ShardDone:
    """The task's result; a user error raised in a worker comes back as itself (one line), not wrapped."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ModelAlloyError):
            raise e.cause from None
        raise
