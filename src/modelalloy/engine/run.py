"""`execute()`: a plan written to an output directory, by the backend the options name."""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from modelalloy.engine.backends import ShardWork, get_backend
from modelalloy.engine.inputs import NonFiniteInputs
from modelalloy.engine.options import MergeOptions, MergeResult, Progress
from modelalloy.engine.output import finish_output, output_error, prepare_output
from modelalloy.errors import MergeError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.plan import Plan


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
    backend = get_backend(options.backend)
    backend.check(options)
    job = prepare_output(plan, checkpoints, Path(out_dir), options)
    start = time.perf_counter()
    nonfinite = NonFiniteInputs()
    try:
        try:
            written = backend.write_shards(ShardWork(job, plan, checkpoints, options, nonfinite), progress)
        except MergeError:
            # The same plan would fail the same way again, so its shards are not worth resuming from.
            shutil.rmtree(job.partial, ignore_errors=True)
            raise
        finally:
            nonfinite.warn()
        finish_output(job, plan, checkpoints, options, written.input_hashes)
    except OSError as e:
        if not _about_output(e, job.partial):
            raise
        remaining = plan.output_bytes - sum(int(r.get("bytes", 0)) for r in job.manifest.shards.values())
        raise output_error(e, job.partial, remaining=remaining, finished=job.manifest.shards) from None
    finally:
        if job.lock is not None:
            job.lock.release()  # a no-op once finish_output has handed it over with the rename
    return MergeResult(job.out_dir, len(plan.recipes), plan.output_bytes, written.files, time.perf_counter() - start, written.input_hashes, len(job.reused))


def _about_output(e: OSError, partial: Path) -> bool:
    """Whether `e` comes from writing the output (a full disk, a file there we cannot write),
    not from reading an input (those are not ours to explain as output problems)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    return e.filename is not None and Path(e.filename).resolve().is_relative_to(partial.resolve())
