"""Shards written with direct I/O hold exactly the bytes of plain positioned writes."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelalloy.io import direct_writes
from modelalloy.io.direct import ALIGN
from modelalloy.io.writer import OutputTensor, ShardedWriter


def _direct_io_here(tmp_path: Path) -> bool:
    (tmp_path / "probe").touch()
    fd = direct_writes.open_for_direct_writes(tmp_path / "probe")
    if fd is None:
        return False
    os.close(fd)
    return True


@pytest.fixture
def small_stages(monkeypatch):
    """Stage buffers of two pages, so that a few-kilobyte tensor spans several of them."""
    monkeypatch.setattr(direct_writes, "STAGE_BYTES", 2 * ALIGN)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Sizes around the page: tiny ones sharing a page, one ending exactly on a page boundary
    # (from an unaligned start), a page and a byte, several stage buffers' worth.
    sizes = [1, 3, 7, 1023, 1024, 1025, 2047, 5000, 4 * 1024 + 1, 9 * 1024, 3, 17 * 1024 + 5]
    tensors = {f"t{i:02d}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    tensors["ids"] = torch.arange(11, dtype=torch.int64)
    tensors["half"] = torch.randn(3, 333, generator=g).to(torch.bfloat16)
    return tensors


def _write(out: Path, tensors: dict[str, torch.Tensor], *, direct: bool, order: list[str], pieces: int, threads: int) -> tuple[list[bytes], int]:
    out.mkdir()
    specs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(out, specs, max_shard_size=60_000, metadata={"k": "v" * 37}, direct=direct)
    used_direct = len(writer._direct)
    todo = list(order)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                name = todo.pop()
            flat = tensors[name].reshape(-1)
            bounds = sorted({0, flat.numel(), *random.Random(name).sample(range(flat.numel() + 1), min(pieces, flat.numel() + 1))})
            for start, stop in zip(bounds, bounds[1:]):
                writer.write_range(name, start, flat[start:stop])
            writer.finish(name)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    files = writer.finalize()
    return [(out / f).read_bytes() for f in files], used_direct


def test_direct_and_buffered_writes_give_the_same_bytes(tmp_path, small_stages):
    if not _direct_io_here(tmp_path):
        pytest.skip("this file system has no direct I/O")
    tensors = _tensors()
    names = list(tensors)
    plain, used = _write(tmp_path / "plain", tensors, direct=False, order=names, pieces=1, threads=1)
    assert used == 0 and len(plain) > 1  # sharded: several headers, each of its own length
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    direct, used = _write(tmp_path / "direct", tensors, direct=True, order=shuffled, pieces=5, threads=4)
    assert used == len(plain)
    assert [len(b) for b in direct] == [len(b) for b in plain]
    assert direct == plain
    loaded = {}
    for f in sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors")):
        loaded |= load_file(tmp_path / "direct" / f)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_a_writer_holding_every_stage_buffer_does_not_wait_forever(tmp_path, small_stages, monkeypatch):
    if not _direct_io_here(tmp_path):
        pytest.skip("this file system has no direct I/O")
    monkeypatch.setattr(direct_writes, "STAGE_BUFFERS", 1)
    g = torch.Generator().manual_seed(2)
    tensors = {f"w{i}": torch.randn(5 * 1024, generator=g) for i in range(4)}
    names = list(tensors)
    plain, _ = _write(tmp_path / "plain", tensors, direct=False, order=names, pieces=1, threads=1)
    (tmp_path / "direct").mkdir()
    specs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path / "direct", specs, max_shard_size=60_000, metadata={"k": "v" * 37})
    assert writer._direct

    def interleaved() -> None:  # a piece of each tensor in turn: the one buffer is half-filled by the first
        for start in range(0, 5 * 1024, 700):
            for name in names:
                writer.write_range(name, start, tensors[name][start : start + 700])
        for name in names:
            writer.finish(name)
        writer.finalize()

    thread = threading.Thread(target=interleaved, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the writer waited for a stage buffer that could never come back"
    files = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert [(tmp_path / "direct" / f).read_bytes() for f in files] == plain


def test_a_failed_direct_write_names_the_shard(tmp_path):
    if not _direct_io_here(tmp_path):
        pytest.skip("this file system has no direct I/O")
    tensors = {"a": torch.randn(3000), "b": torch.randn(10)}
    specs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, max_shard_size=10**9, metadata={})
    (shard,) = writer._direct.values()
    read_only = os.open(shard.path, os.O_RDONLY)  # its writes fail with EBADF, as a broken disk's would
    os.close(shard.fd)
    shard.fd = read_only
    with pytest.raises(OSError) as failed:  # from the write that finds it, or at the latest from finalize
        for name, t in tensors.items():
            writer.write(name, t)
        writer.finalize()
    assert failed.value.errno == errno.EBADF and failed.value.filename == shard.path
    writer.abort()


def test_the_probe_refuses_a_file_system_without_direct_writes(tmp_path, monkeypatch):
    if not _direct_io_here(tmp_path):
        pytest.skip("this file system has no direct I/O")
    real_pwrite = os.pwrite

    def refuse(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", refuse)
    tensors = {"a": torch.randn(2000)}
    specs = [OutputTensor("a", torch.float32, (2000,))]
    writer = ShardedWriter(tmp_path, specs, max_shard_size=10**9, metadata={})
    assert not writer._direct  # fell back to plain writes
    writer.write("a", tensors["a"])
    (file,) = writer.finalize()
    assert torch.equal(load_file(tmp_path / file)["a"], tensors["a"])

