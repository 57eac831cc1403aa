"""The streaming sharded safetensors writer.

The plan knows every output tensor's name, dtype and shape before any arithmetic, so the shard
layout (which tensor goes in which file, at which offset) is fixed up front: each shard's header
is written first, the file is sized, and every finished tensor is written straight to its offset
with a positioned write. Nothing is buffered beyond the tensor in hand, tensors can finish in any
order (threads), and the bytes do not depend on that order.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from modelalloy.errors import ConfigError
from modelalloy.io.safetensors_format import encode_header, itemsize


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, 1000 -> 1000 (bytes, as HF uses)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"size {text!r} is not understood; write it like 5GB, 500MB or 2GiB")
    number, unit, binary = m.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


def layout_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Greedy split in plan order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count <= 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Writes planned tensors into pre-laid-out shards; `write` is safe from several threads.

    Shards named in `finished` (by an earlier, interrupted run) are left untouched. When the last
    tensor of a shard is written, the shard is fsynced and closed, and `on_shard_done(file, size)`
    is called from the writing thread (to hash it and record it as finished).
    """

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        *,
        max_shard_size: int,
        metadata: dict[str, str],
        finished: Collection[str] = (),
        on_shard_done: Callable[[str, int], None] | None = None,
    ):
        self.out_dir = out_dir
        self.metadata = {"format": "pt", **metadata}
        self.shards = layout_shards(tensors, max_shard_size)
        self.files = shard_names(len(self.shards))
        self.on_shard_done = on_shard_done
        self._where: dict[str, tuple[int, int, OutputTensor, str]] = {}  # name -> (fd, absolute offset, spec, file)
        self._fds: dict[str, int] = {}
        self._remaining: dict[str, int] = {}  # tensors still to write, per open shard
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        for file, shard in zip(self.files, self.shards):
            header, offsets = encode_header([(t.name, t.dtype, t.shape) for t in shard], self.metadata)
            self._sizes[file] = len(header) + (offsets[-1][1] if offsets else 0)
            if file in finished:
                continue
            fd = os.open(out_dir / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[file] = fd
            self._remaining[file] = len(shard)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, self._sizes[file])
            for t, (begin, _) in zip(shard, offsets):
                self._where[t.name] = (fd, len(header) + begin, t, file)

    def shard_of(self) -> dict[str, str]:
        """Output tensor name -> the shard file it is written to."""
        return {t.name: file for file, shard in zip(self.files, self.shards) for t in shard}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        fd, offset, spec, file = self._where[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            # A bug of ours, never a user's: the plan promised this dtype and shape.
            raise AssertionError(f"{name}: planned {spec.dtype} {spec.shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy())
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        with self._lock:
            self._remaining[file] -= 1
            complete = self._remaining[file] == 0
            if complete:
                del self._fds[file]
        if complete:  # every tensor of this shard is on its way to disk: make it durable, then record it
            os.fsync(fd)
            os.close(fd)
            if self.on_shard_done is not None:
                self.on_shard_done(file, self._sizes[file])

    def finalize(self) -> list[str]:
        """fsync and close every shard, write the index when sharded; returns the file names."""
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                "weight_map": {t.name: file for file, shard in zip(self.files, self.shards) for t in shard},
            }
            write_text_durably(self.out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        return list(self.files)

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_text_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
