"""modelalloy: merge the weights of trained language models, and measure whether it paid off."""

from modelalloy.api import merge, open_models, plan_merge
from modelalloy.config import MergeConfig, load_config, parse_config
from modelalloy.errors import ModelAlloyError
from modelalloy.execute import MergeOptions, MergeResult

__version__ = "0.1.0"

__all__ = [
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
