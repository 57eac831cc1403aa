"""The merge engine: running a plan.

- `options.py`: `MergeOptions` (what the CLI's flags are made from), `Progress`, `MergeResult`.
- `inputs.py`: reading input tensors (NaN/Inf checks, BLAKE3 hashes, the compute dtype).
- `tensors.py`: one output tensor, whole or streamed in row blocks.
- `readahead.py`, `worker.py`: the recipes of one worker, `threads` at a time, inputs read ahead.
- `output.py`: the output directory (checks, shard layout, `OUT.partial/`, finishing).
- `backends/`: where the shards are written (`local` threads, `ray` tasks), looked up by name.
- `run.py`: `execute()`, the one entry point.
"""

from modelalloy.engine.options import MergeOptions, MergeResult, Progress, resolve_device
from modelalloy.engine.output import check_output, fresh_partial
from modelalloy.engine.run import execute
from modelalloy.engine.tensors import merge_tensor
from modelalloy.engine.worker import keep_freed_buffers

__all__ = ["MergeOptions", "MergeResult", "Progress", "check_output", "execute", "fresh_partial", "keep_freed_buffers", "merge_tensor", "resolve_device"]
