"""The safetensors file format, read and laid out by hand so that we control every byte.

Layout: 8 bytes little-endian u64 N, then N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the buffer's start. We parse and validate the
header ourselves (instead of ``safe_open``, which maps the whole file) so that tensors can be
read with positioned reads into fresh buffers: mapped pages of a whole checkpoint would count
in the process's RSS.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.files import open_regular

# safetensors dtype names <-> torch dtypes (the subset torch can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a real checkpoint (the reference library uses 100 MB).
MAX_HEADER_BYTES = 100_000_000


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; two entries for one tensor would be ambiguous.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def read_header(path: str) -> tuple[dict[str, TensorLocation], dict[str, str]]:
    """Parse and validate a safetensors header; returns (tensors by name, metadata).

    Every inconsistency (truncation, bad JSON, offsets outside the data, byte length not matching
    dtype and shape, overlapping tensors) is a `CheckpointError` naming the file and tensor.
    """
    fd = open_regular(path)  # a FIFO or a device is refused here, before a byte is read
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); re-download or re-save it")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: safetensors header claims {n} bytes but the file has {size}; the file is truncated or corrupt"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt") from None
    except RecursionError:  # nesting deep enough to exhaust the parser: never a real header
        raise CheckpointError(f"{path}: safetensors header is nested too deeply; the file is corrupt") from None
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: safetensors header names {e.args[0]!r} twice; the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: safetensors __metadata__ is not an object")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorLocation] = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where} has a malformed header entry (need dtype, shape, data_offsets)")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{where} has unsupported dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_len:
            raise CheckpointError(
                f"{where} ends at byte {end} of the data but the file holds {data_len}; the file is truncated"
            )
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: {info['dtype']} {shape} needs {expected} bytes but the header gives {end - begin}; the file is corrupt"
            )
        tensors[name] = TensorLocation(name, path, dtype, tuple(shape), data_start + begin, data_start + end)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data; the file is corrupt")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def layout_problem(path: str, tensors: dict[str, TensorLocation]) -> str | None:
    """What the reference safetensors loader would refuse in a file whose header `read_header`
    accepted: bytes before a tensor that no tensor covers, or bytes after the last one. Our
    reader does not need the data to be packed, so this is a warning for inputs (an error in
    `alloy verify`)."""
    fd = open_regular(path)
    try:
        data_start = 8 + int.from_bytes(os.pread(fd, 8, 0), "little")
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    pos = data_start
    for loc in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if loc.start != pos:
            return f"{path}: {loc.start - pos} unaccounted bytes before tensor {loc.name!r}"
        pos = loc.end
    if pos != size:
        return f"{path}: {size - pos} bytes after the last tensor; the file is corrupt or was appended to"
    return None


def read_tensor(fd: int, loc: TensorLocation, *, pin_memory: bool = False) -> torch.Tensor:
    """Read one tensor with positioned reads into a fresh buffer (no mapping, no shared pages).

    `pin_memory` (CUDA only) page-locks the buffer so that its copy to the GPU can be asynchronous.
    """
    buf = torch.empty(loc.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
    read_exactly(fd, loc, loc.start, buf)
    return buf.view(loc.dtype).reshape(loc.shape)


def read_exactly(fd: int, loc: TensorLocation, offset: int, buf: torch.Tensor) -> None:
    """Fill the uint8 tensor `buf` from absolute `offset` of `loc`'s file (preadv may return short counts)."""
    if not buf.numel():
        return
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(f"{loc.file}: tensor {loc.name!r} is cut short; the file is truncated")
        done += got


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (length prefix included, padded to 8) and each entry's data offsets, in order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append((pos, pos + nbytes))
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-aligned, as the reference writer does
    return len(raw).to_bytes(8, "little") + raw, offsets
