"""Statistics files: per-model data statistics that data-aware merges (fisher, regmean) read.

One safetensors file per model, made by `alloy stats` (`modelalloy.stats.compute_stats`):

- ``fisher:<parameter name>``: the diagonal Fisher information of that parameter (its shape),
  the mean over samples of the squared gradient of the sample's log-likelihood;
- ``gram:<weight name>``: the Gram matrix XᵀX ([in, in], float32) of the inputs X ([tokens, in])
  of the linear layer owning that weight, summed over every token seen;
- ``__metadata__``: ``format`` = ``modelalloy.stats``, ``version``, ``samples``, ``tokens``,
  ``kinds`` and where they came from (``model``, ``data``).

A merge reads a statistics file like a model: lazily, tensor by tensor, with positioned reads
(it is opened as a `Checkpoint` whose ``path`` is the file itself).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelalloy.errors import CheckpointError, OutputError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.files import check_regular
from modelalloy.io.safetensors_format import read_header

FORMAT = "modelalloy.stats"
VERSION = "1"
KINDS = ("fisher", "gram")


def stat_key(kind: str, tensor: str) -> str:
    """The key of `tensor`'s statistic of `kind` ("fisher" or "gram") in a statistics file."""
    return f"{kind}:{tensor}"


def open_stats(path: str | Path) -> Checkpoint:
    """Open a statistics file lazily (header only); a file not made by `alloy stats` is an error."""
    path = Path(path)
    if not path.is_dir():
        check_regular(path)
    if not path.is_file():
        hint = "; it is a directory, give the .safetensors file `alloy stats` wrote" if path.is_dir() else ""
        raise CheckpointError(f"{path}: statistics file not found{hint}")
    tensors, metadata = read_header(str(path))
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a statistics file made by `alloy stats` (no format={FORMAT} in its metadata)")
    return Checkpoint(ref=str(path), path=path, config={}, tensors=tensors)


def stat_kinds(stats: Checkpoint) -> set[str]:
    """The kinds of statistic a file holds (from its keys)."""
    return {name.split(":", 1)[0] for name in stats.tensors if ":" in name}


def save_stats(
    path: str | Path,
    *,
    fisher: dict[str, torch.Tensor] | None = None,
    gram: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a statistics file atomically (temporary file, then rename)."""
    path = Path(path)
    tensors = {stat_key("fisher", k): v.contiguous() for k, v in (fisher or {}).items()}
    tensors |= {stat_key("gram", k): v.contiguous() for k, v in (gram or {}).items()}
    meta = {"format": FORMAT, "version": VERSION, "kinds": ",".join(k for k in KINDS if (fisher, gram)[KINDS.index(k)])}
    meta |= {str(k): str(v) for k, v in (metadata or {}).items()}
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the statistics file ({e.strerror or e})") from None
    return path
