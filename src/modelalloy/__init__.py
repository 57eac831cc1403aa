"""modelalloy: merge the weights of trained language models, and measure whether it paid off."""

import os as _os

# A merge allocates and frees tensors of hundreds of MB per recipe; with 4 KiB pages every fresh
# buffer costs a page fault per page (measured: 4x slower than converting into a reused one).
# torch backs allocations of 2 MiB and more with transparent huge pages when this is set, and reads
# it once, at its first allocation: so it is set before torch loads, and a user's value wins.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from modelalloy.api import merge, open_models, plan_merge
from modelalloy.config import MergeConfig, load_config, parse_config
from modelalloy.errors import ModelAlloyError
from modelalloy.engine import MergeOptions, MergeResult
from modelalloy.version import __version__

__all__ = [
    "__version__",
    "MergeConfig",
    "MergeOptions",
    "MergeResult",
    "ModelAlloyError",
    "load_config",
    "merge",
    "open_models",
    "parse_config",
    "plan_merge",
]
