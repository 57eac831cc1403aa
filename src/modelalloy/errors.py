"""Errors that users can cause, and how they are told.

    ModelAlloyError            anything a user can fix; the CLI prints its one line and exits 2
     ├── ConfigError           the merge YAML: schema, unknown keys/methods/parameters, bad values
     ├── CheckpointError       an input model: missing files, corrupt safetensors, pickle refused
     ├── PlanError             inputs that don't fit together: missing tensors, shape mismatch
     ├── OutputError           the output directory: exists, inside an input, not enough disk
     └── MergeError            a merge produced something unusable (NaN/Inf), named by tensor

Every message is one line that names the file, tensor, field or value and, where there is one,
the fix. Only `modelalloy.cli` prints errors and picks the exit code; the library raises.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ModelAlloyError(Exception):
    """Base class for errors a user can fix; `str(err)` is the one line we show."""


class ConfigError(ModelAlloyError):
    pass


class CheckpointError(ModelAlloyError):
    pass


class PlanError(ModelAlloyError):
    pass


class OutputError(ModelAlloyError):
    pass


class MergeError(ModelAlloyError):
    pass


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choices, or '' when nothing is close."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
