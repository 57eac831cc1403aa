"""The span reader: streamed inputs read ahead in spans, directly from the disk where the page
cache does not hold them; every byte checked against the file."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from modelalloy.errors import CheckpointError
from modelalloy.io import direct
from modelalloy.io.direct import ALIGN, open_direct
from modelalloy.io.spans import SpanReader, SpanSource, cached_fraction

GRANULE = 1000  # bytes per block: spans of whole blocks, at offsets that are not aligned


def write_uncached(path: Path, data: bytes) -> None:
    """Write `data` durably, then drop its pages from the page cache (clean pages only)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def direct_io_works(path: Path) -> bool:
    fd = open_direct(path, os.O_RDONLY)
    if fd is not None:
        os.close(fd)
    return fd is not None


@pytest.fixture
def two_files(tmp_path):
    """Two 'checkpoints' of random bytes; tensors at odd offsets, one ending exactly at EOF."""
    rng = np.random.default_rng(0)
    data = {name: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for name, size in (("a", 300_123), ("b", 210_517))}
    paths = {}
    for name, blob in data.items():
        paths[name] = tmp_path / f"{name}.bin"
        write_uncached(paths[name], blob)
    return paths, data


def recipes_of(paths, data, count=6):
    """`count` recipes, each reading a slice of both files (different lengths, odd offsets)."""
    recipes = []
    for i in range(count):
        recipe = []
        for name in ("a", "b"):
            offset = 17 + 4099 * i
            nbytes = len(data[name]) - offset if i == count - 1 and name == "a" else 9_000 + 7_777 * i
            recipe.append(((i, name), SpanSource(str(paths[name]), offset, nbytes, GRANULE)))
        recipes.append(recipe)
    return recipes


def consume(reader: SpanReader, recipe, data, passes: int = 1) -> int:
    """Read a recipe's blocks the way `stream_tensor` does (block by block, every input in turn,
    `passes` times), checking each against the file's bytes; returns how many blocks came from
    the reader."""
    served = 0
    longest = max(src.nbytes for _, src in recipe)
    for _ in range(passes):
        for start in range(0, longest, GRANULE):
            for key, src in recipe:
                if start >= src.nbytes:
                    continue
                stop = min(src.nbytes, start + GRANULE)
                got = reader.read(key, start, stop)
                if got is not None:
                    served += 1
                    expected = data[key[1]][src.offset + start : src.offset + stop]
                    assert got.numpy().tobytes() == expected, (key, start)
    for key, _ in recipe:
        reader.release(key)
    return served


def read_all(recipes, data, readers: int) -> tuple[SpanReader, list[int]]:
    """Every recipe consumed in order through one reader with small buffers (many spans per
    tensor, fewer buffers than spans); the reader (closed) and the blocks it served per recipe."""
    reader = SpanReader(recipes, budget=8 * 16 * ALIGN, readers=readers)
    try:
        return reader, [consume(reader, r, data) for r in recipes]
    finally:
        reader.close()


def test_cold_spans_are_read_directly_and_exactly(two_files):
    paths, data = two_files
    if not direct_io_works(paths["a"]):
        pytest.skip("no O_DIRECT on this file system")
    recipes = recipes_of(paths, data)
    reader, served = read_all(recipes, data, readers=3)
    served = sum(served)
    blocks = sum(-(-src.nbytes // GRANULE) for r in recipes for _, src in r)
    assert served == blocks
    assert reader.peak_bytes <= 8 * (16 * ALIGN + 3 * ALIGN)
    # Direct reads bypass the page cache: had they been plain reads, the files would now be cached.
    for path in paths.values():
        fd = os.open(path, os.O_RDONLY)
        try:
            assert cached_fraction(fd, 0, os.path.getsize(path)) < 0.2
        finally:
            os.close(fd)


def test_without_direct_io_plain_reads_give_the_same_bytes(two_files, monkeypatch):
    paths, data = two_files
    monkeypatch.setattr(direct, "O_DIRECT", 0)
    _, served = read_all(recipes_of(paths, data), data, readers=2)
    # Plain reads fill the page cache (with the kernel's read-ahead): later spans found cached
    # are left to the caller, whose blocks `consume` does not count.
    assert sum(served) > 0


def test_cached_spans_are_left_to_the_caller(two_files):
    paths, data = two_files
    for path in paths.values():
        path.read_bytes()  # into the page cache
    reader, served = read_all(recipes_of(paths, data, count=2), data, readers=8)
    assert served == [0, 0]
    assert reader.peak_bytes == 0  # no buffer was needed


@pytest.mark.parametrize("passes", [2, 3])
def test_cached_spans_of_a_tensor_read_three_times_are_copied_in_once(two_files, passes):
    paths, data = two_files
    for path in paths.values():
        path.read_bytes()  # into the page cache
    recipes = read_in_passes(recipes_of(paths, data, count=2), passes)
    reader = SpanReader(recipes, budget=8 * 64 * ALIGN, readers=8)  # spans of 256 KiB: each recipe fits
    try:
        for recipe in recipes:
            blocks = sum(-(-src.nbytes // GRANULE) for _, src in recipe)
            # Read twice, each pass copies from the page cache itself (served by the caller).
            assert consume(reader, recipe, data, passes) == (passes * blocks if passes >= 3 else 0)
    finally:
        reader.close()


def test_cached_fraction_counts_pages(tmp_path):
    path = tmp_path / "f.bin"
    write_uncached(path, bytes(1024 * ALIGN))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: only what is read is cached
        assert cached_fraction(fd, 0, 1024 * ALIGN) == 0.0
        os.pread(fd, 16 * ALIGN, 512 * ALIGN)
        assert cached_fraction(fd, 512 * ALIGN + 5, 528 * ALIGN) == 1.0  # unaligned start: its page counts
        assert cached_fraction(fd, 0, 1024 * ALIGN) == pytest.approx(16 / 1024)
    finally:
        os.close(fd)


def read_in_passes(recipes, passes: int = 2):
    """The same recipes, for a merge that reads its inputs `passes` times (statistics passes)."""
    return [[(key, dataclasses.replace(src, reads=passes)) for key, src in recipe] for recipe in recipes]


def test_a_tensor_read_in_several_passes_keeps_its_spans_until_released(two_files):
    paths, data = two_files
    if not direct_io_works(paths["a"]):
        pytest.skip("no O_DIRECT on this file system")
    recipes = read_in_passes(recipes_of(paths, data, count=12))
    budget = 8 * 4 * ALIGN  # 8 buffers (two inputs), spans of 16 KiB: 16 blocks of 1000 bytes
    span_len = budget // 8 // GRANULE * GRANULE
    held = [sum(-(-src.nbytes // span_len) for _, src in recipe) for recipe in recipes]
    largest = max(src.nbytes for recipe in recipes for _, src in recipe)
    # Held whole, a recipe may take half the buffers, so that two workers can each hold one; the
    # buffers grow for the largest recipe that needs at most the budget plus twice the largest tensor.
    buffers = max([8] + [2 * h + 1 for h in held if (2 * h + 1) * (budget // 8) <= budget + 2 * largest])
    fits = [h <= buffers // 2 for h in held]
    assert any(fits) and not all(fits)
    assert any(h > 4 for h, fit in zip(held, fits) if fit)  # would not fit in the budget's 8 buffers
    assert any(src.nbytes > span_len for recipe, fit in zip(recipes, fits) if fit for _, src in recipe)  # several spans
    reader = SpanReader(recipes, budget=budget, readers=4)
    try:
        assert [recipe[0][0] in reader for recipe in recipes] == fits
        for recipe, fit in zip(recipes, fits):
            blocks = sum(-(-src.nbytes // GRANULE) for _, src in recipe)
            if fit:  # the second pass re-reads the spans of the first: every block served, twice
                assert consume(reader, recipe, data, passes=2) == 2 * blocks
        assert reader.peak_bytes <= buffers * (span_len + 3 * ALIGN) <= budget + 2 * largest + buffers * 3 * ALIGN
    finally:
        reader.close()


@pytest.mark.parametrize("passes", [1, 2])
def test_concurrent_workers_in_plan_order_never_wait_on_each_other(two_files, passes):
    """Two workers take recipes in plan order, as the engine's pool does, with as few buffers as
    a recipe needs (one span per input plus one; for two passes, a recipe's spans held whole):
    every span is still read, exactly."""
    paths, data = two_files
    recipes = recipes_of(paths, data, count=12)
    if passes > 1:
        recipes = read_in_passes(recipes, passes)
    reader = SpanReader(recipes, budget=8 * 4 * ALIGN, readers=4)
    recipes = [r for r in recipes if r[0][0] in reader]
    todo = list(range(len(recipes)))
    lock = threading.Lock()
    failures = []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                consume(reader, recipes[i], data, passes)
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)
                return

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    alive = any(t.is_alive() for t in threads)
    reader.close()
    assert not alive, "workers deadlocked on the span reader"
    assert not failures, failures


def test_a_truncated_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "short.bin"
    write_uncached(path, bytes(5000))
    reader = SpanReader([[("k", SpanSource(str(path), 100, 9000, GRANULE))]], budget=8 * 4 * ALIGN)
    try:
        with pytest.raises(CheckpointError, match="short.bin.*truncated"):
            for start in range(0, 9000, GRANULE):
                reader.read("k", start, min(9000, start + GRANULE))
    finally:
        reader.close()
