"""`execute()`: a plan written to an output directory, by the backend the options name."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from modelalloy.engine.backends import ShardWork, get_backend
from modelalloy.engine.inputs import NonFiniteInputs
from modelalloy.engine.options import MergeOptions, MergeResult, Progress
from modelalloy.engine.output import finish_output, prepare_output
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
        written = backend.write_shards(ShardWork(job, plan, checkpoints, options, nonfinite), progress)
    except MergeError:
        # The same plan would fail the same way again, so its shards are not worth resuming from.
        shutil.rmtree(job.partial, ignore_errors=True)
        raise
    finally:
        nonfinite.warn()
    finish_output(job, plan, checkpoints, options, written.input_hashes)
    return MergeResult(job.out_dir, len(plan.recipes), plan.output_bytes, written.files, time.perf_counter() - start, written.input_hashes, len(job.reused))
