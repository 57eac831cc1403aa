"""Opening a model checkpoint lazily: headers now, tensors one at a time when asked.

A model reference is a local Hugging Face directory (``config.json`` plus ``model.safetensors``
or shards listed by ``model.safetensors.index.json``), or a model id already in the local
Hugging Face cache (looked up offline; we never download). Pickle ``.bin`` checkpoints run code
when unpickled, so they are refused unless the caller opts in, and then loaded with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelalloy.arch import check_model_config
from modelalloy.errors import CheckpointError
from modelalloy.io.files import check_regular, open_regular, read_regular
from modelalloy.io.safetensors_format import TensorLocation, itemsize, layout_problem, read_exactly, read_header, read_tensor

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# config.json and index files are kilobytes; one of gigabytes is refused rather than parsed.
MAX_JSON_BYTES = 64 * 2**20


@dataclass
class Checkpoint:
    """One input model: where it is, its config, and where each tensor lives (nothing loaded)."""

    ref: str  # what the user wrote
    path: Path  # the resolved directory
    config: dict
    tensors: dict[str, TensorLocation]
    revision: str | None = None  # the HF cache snapshot commit, when it came from the cache
    _fds: dict[str, int] = field(default_factory=dict, repr=False)
    _pickled: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def read(self, name: str, *, pin_memory: bool = False) -> torch.Tensor:
        """The tensor `name` as stored (dtype and shape from the file), in a buffer of its own
        (page-locked with `pin_memory`, for asynchronous copies to a GPU)."""
        loc = self.tensors.get(name)
        if loc is None:
            raise CheckpointError(f"{self.ref}: no tensor named {name!r}")
        if loc.file.endswith(".bin"):
            return self._pickled[loc.file][name]
        return read_tensor(self._fd(loc.file), loc, pin_memory=pin_memory)

    def streams(self, name: str) -> bool:
        """Whether `read_entries` can read `name` in pieces straight from its file (subclasses
        that build tensors on read, such as base+adapter or GGUF, read whole tensors only)."""
        loc = self.tensors.get(name)
        return type(self).read is Checkpoint.read and loc is not None and not loc.file.endswith(".bin")

    def read_entries(self, name: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Entries [start, stop) of tensor `name` in flat order, typed, read into the front of
        `buffer` (a uint8 tensor large enough, reused from block to block)."""
        loc = self.tensors[name]
        size = itemsize(loc.dtype)
        buf = buffer[: (stop - start) * size]
        read_exactly(self._fd(loc.file), loc, loc.start + start * size, buf)
        return buf.view(loc.dtype)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading `name`'s bytes into the page cache; returns at once."""
        loc = self.tensors.get(name)
        if loc is None or loc.file.endswith(".bin") or not hasattr(os, "posix_fadvise"):
            return
        os.posix_fadvise(self._fd(loc.file), loc.start, loc.nbytes, os.POSIX_FADV_WILLNEED)

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:  # two threads may ask for the same shard at once
                fd = self._fds.get(file)
                if fd is None:
                    fd = open_regular(file)
                    self._fds[file] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled.clear()

    @property
    def weight_files(self) -> list[str]:
        return sorted({t.file for t in self.tensors.values()})

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_model_path(ref: str) -> tuple[Path, str | None]:
    """A local directory, or the snapshot of an HF id in the local cache; (path, revision)."""
    local = Path(ref).expanduser()
    try:
        os.stat(local)  # is_dir()/exists() would hide a symlink loop or a forbidden parent as "missing"
    except (FileNotFoundError, NotADirectoryError):  # not a local path: maybe an HF id
        if local.is_symlink():
            raise CheckpointError(f"{ref}: is a symlink to {os.readlink(local)}, which does not exist") from None
    except OSError as e:  # ELOOP (symlink loop), EACCES (a parent directory we may not enter)
        raise CheckpointError(f"{ref}: cannot open ({e.strerror or e}); check the path and its permissions") from None
    try:
        if local.is_dir():
            return local, None
        if local.exists():
            raise CheckpointError(f"{ref}: is a file; a model is a directory with config.json and *.safetensors")
    except OSError as e:  # symlink loops, permission denied on a parent
        raise CheckpointError(f"{ref}: cannot open ({e.strerror or e})") from None
    repo_id, _, revision = ref.rpartition("@") if "@" in ref else (ref, "", "")
    if revision and Path(repo_id).expanduser().is_dir():
        # mergekit's `path@revision` on a local directory: the directory is what there is (as in mergekit).
        warnings.warn(f"{ref}: {repo_id} is a local directory; its revision {revision!r} is ignored", stacklevel=3)
        return Path(repo_id).expanduser(), None
    if repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~")):
        # Offline by construction: a model that is not in the cache is an error, never a download.
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
            at = f" at revision {revision!r}" if revision else ""
            get = f"huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "")
            raise CheckpointError(
                f"{ref}: no such directory, and not in the local Hugging Face cache{at}; download it first ({get}) or give a local path"
            ) from None
        return Path(path), Path(path).name
    raise CheckpointError(f"{ref}: model directory not found")


def open_hf_directory(ref: str, *, allow_pickle: bool = False) -> Checkpoint:
    """A Hugging Face model directory (or a model id in the local cache): config and every tensor
    header are read and validated; no tensor data. The opener's last resort (`io/opener.py`)."""
    path, revision = resolve_model_path(ref)
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{ref}: permission denied reading the directory")
    config_file = path / "config.json"
    config: dict = {}
    if config_file.exists():
        try:
            config = json.loads(read_regular(config_file, limit=MAX_JSON_BYTES))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_file}: unreadable config.json ({e})") from None
        except RecursionError:
            raise CheckpointError(f"{config_file}: unreadable config.json (nested too deeply)") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: config.json is not a JSON object")
        if (problem := check_model_config(config)) is not None:
            raise CheckpointError(f"{config_file}: {problem}")
    tensors = _safetensors_tensors(path, ref)
    ckpt = Checkpoint(ref=ref, path=path, config=config, tensors=tensors, revision=revision)
    if not tensors:
        bins = _pickle_files(path)
        if not bins:
            raise CheckpointError(f"{ref}: no weight files (*.safetensors or pytorch_model*.bin) in {path}")
        if not allow_pickle:
            raise CheckpointError(
                f"{ref}: only pickle .bin weights found; pickle can run arbitrary code when loaded, "
                "so it is refused: convert to safetensors, or pass --allow-pickle if you trust this file"
            )
        _load_pickled(ckpt, bins)
    if not config_file.exists():
        raise CheckpointError(f"{ref}: config.json missing in {path}; a Hugging Face model directory needs one")
    return ckpt


def _inside(path: Path, file: str, ref: str, index: Path) -> str:
    target = (path / file).resolve()
    if not target.is_relative_to(path.resolve()):
        raise CheckpointError(f"{index}: shard name {file!r} points outside the model directory; refusing it")
    if not target.exists():
        raise CheckpointError(f"{index}: lists shard {file!r}, which is missing from {path}")
    check_regular(target)
    return str(target)


def _safetensors_tensors(path: Path, ref: str) -> dict[str, TensorLocation]:
    index = path / SAFETENSORS_INDEX
    weight_map = None
    if index.exists():
        try:
            weight_map = json.loads(read_regular(index, limit=MAX_JSON_BYTES))["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        files = sorted({_inside(path, f, ref, index) for f in weight_map.values()})
    else:
        files = sorted(str(p) for p in path.glob("*.safetensors"))
        # An adapter or a non-model file beside the weights is not part of the model.
        files = [f for f in files if not Path(f).name.startswith("adapter_")]
    tensors: dict[str, TensorLocation] = {}
    for file in files:
        found, _ = read_header(file)
        # What `alloy verify` and the safetensors library refuse, our reader can still read: say so.
        if (problem := layout_problem(file, found)) is not None:
            warnings.warn(f"{problem}; alloy reads it, but the safetensors library refuses to load this file: re-save it", stacklevel=2)
        for name, loc in found.items():
            if name in tensors:
                raise CheckpointError(f"{ref}: tensor {name!r} appears in both {tensors[name].file} and {file}")
            tensors[name] = loc
    if weight_map is not None:
        _warn_index_mismatch(index, weight_map, tensors, path)
    return tensors


def _warn_index_mismatch(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorLocation], path: Path) -> None:
    """Tensors the index puts in another shard than their header (or does not list, or lists
    where they are not). We read each tensor from the header that has it, but transformers
    follows the index, so the model does not load elsewhere: one warning with the first case."""
    root = path.resolve()
    wrong = []
    for name, loc in sorted(tensors.items()):
        listed = weight_map.get(name)
        actual = str(Path(loc.file).relative_to(root)) if Path(loc.file).is_relative_to(root) else loc.file
        if listed is None:
            wrong.append(f"{name!r} is in {actual} but not listed")
        elif (root / listed).resolve() != Path(loc.file):
            wrong.append(f"{name!r} is in {actual}, not in {listed}")
    wrong += [f"{name!r} is listed in {file} but in no shard" for name, file in sorted(weight_map.items()) if name not in tensors]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        warnings.warn(
            f"{index}: does not match the shards: {wrong[0]}{more}; alloy reads every tensor from the shard whose header has it, "
            "but transformers follows the index and would not load this model: fix the index",
            stacklevel=3,
        )


def _pickle_files(path: Path) -> list[Path]:
    index = path / PICKLE_INDEX
    if index.exists():
        try:
            names = set(json.loads(read_regular(index, limit=MAX_JSON_BYTES))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        return [Path(_inside(path, n, str(path), index)) for n in sorted(names)]
    return sorted(path.glob("pytorch_model*.bin"))


def _load_pickled(ckpt: Checkpoint, files: list[Path]) -> None:
    """Opt-in only: torch.load with weights_only=True (no arbitrary code), memory-mapped."""
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for bad pickles
            raise CheckpointError(f"{file}: cannot load as a weights-only checkpoint ({type(e).__name__}: {e})") from None
        ckpt._pickled[str(file)] = state
        for name, t in state.items():
            ckpt.tensors[name] = TensorLocation(name, str(file), t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
