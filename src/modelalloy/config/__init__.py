"""The merge configuration: mergekit's YAML schema, accepted as is, checked strictly.

- `schema`: the pydantic models (`MergeConfig` and its parts) and model references;
- `settings`: parameter values (scalars, gradients, filter lists), checked and evaluated per tensor;
- `reading`: YAML text and files into a `MergeConfig`, every problem one `ConfigError` line.

Unlike mergekit, an unknown key anywhere is an error with a "did you mean". Import these names
from `modelalloy.config`; the split into modules is for reading, not an API.
"""

from __future__ import annotations

from modelalloy.config.reading import load_config, parse_config, read_yaml_file, validation_line
from modelalloy.config.schema import (
    BUILTIN_CHAT_TEMPLATES,
    DTYPE_NAMES,
    InputModel,
    InputSlice,
    MergeConfig,
    ModelRef,
    ModelTokenSource,
    OutputSlice,
    Parameters,
    TokenEmbedding,
    TokenizerConfig,
    ZeroSource,
    model_ref,
)
from modelalloy.config.settings import Conditional, ParameterSetting, Scalar, check_setting, evaluate_setting

__all__ = [
    "BUILTIN_CHAT_TEMPLATES",
    "DTYPE_NAMES",
    "Conditional",
    "InputModel",
    "InputSlice",
    "MergeConfig",
    "ModelRef",
    "ModelTokenSource",
    "OutputSlice",
    "ParameterSetting",
    "Parameters",
    "Scalar",
    "TokenEmbedding",
    "TokenizerConfig",
    "ZeroSource",
    "check_setting",
    "evaluate_setting",
    "load_config",
    "model_ref",
    "parse_config",
    "read_yaml_file",
    "validation_line",
]
