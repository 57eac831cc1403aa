"""Reading streamed tensors ahead of the workers, in large spans, with direct I/O where the page
cache does not already hold the bytes.

Why (`io/direct.py`): a cold read through the page cache costs the kernel a copy out of freshly
filled cache pages, slow on virtual machines; a cold 1.1B linear merge spent 7 of its 13
CPU-seconds there. Spans the page cache holds (most of their pages, asked with `mincore`) are
left to the workers, who copy them into their small, cache-hot block buffers as before: a warm
merge stays warm. The others are read with `O_DIRECT` (plain reads where the file system has no
direct I/O), eight requests of up to 64 MiB in flight (measured: 2.0-2.1 GB/s, 16 MiB 1.4-1.7).

Direct reads fill no page cache for a second look, so a merge with statistics passes (TIES,
SLERP, ...) keeps every span of its recipe until the recipe is done, and re-reads the spans
(1.1B TIES, cold: 22.3-23.3 s -> 16.7-17.1 s, 38 -> 27 CPU-seconds). The buffers grow for such
recipes up to the budget plus twice the largest input tensor; a recipe still too large for half
of them is left to the page cache (two workers must each be able to hold one). Where the
inputs are read three times or more, their cached spans are copied in too: once, by a reading
thread, instead of once per pass by the worker (warm TIES 16.3-16.8 s -> 15.3-15.6 s; for two
reads it does not pay, warm SLERP 5.8-6.5 s -> 6.3-6.7 s).
The spans of a recipe are read in the order its blocks are consumed (span k of every input, then
span k+1) and recipes in plan order, so the earliest recipe in flight always gets its spans.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.direct import ALIGN, align_down, align_up, aligned_buffer, open_direct

SPAN_BYTES = 64 << 20  # measured: 64 MiB requests 2.0-2.1 GB/s, 16 MiB 1.4-1.7, 4 MiB 1.1-1.4
BUFFER_BUDGET = 512 << 20  # of span buffers; with 256 MiB a cold 1.1B linear merge took 6.5-6.9 s, not 6.3-6.6
READERS = 8  # requests in flight
MIN_SPANS = 8


@dataclass(frozen=True)
class SpanSource:
    """The bytes one recipe reads of one input tensor, in blocks of `granule` bytes (the last may be shorter)."""

    path: str
    offset: int  # the tensor's first byte in the file
    nbytes: int
    granule: int
    reads: int = 1  # passes over the tensor; read more than once, its spans stay until the recipe releases it


class SpanReader:
    """Reads `recipes[i]` (a list of (key, SpanSource)) for i = 0, 1, … with `READERS` threads into
    `budget` bytes of reused, aligned buffers (more, up to `budget` + 2 × the largest input tensor,
    where a recipe read in passes needs them); `read(key, start, stop)` hands out a block.

    A block never straddles two spans (spans are whole blocks). A span is given back when its
    key's next span is read, or at `release(key)` when the recipe is done with the key; a source
    read more than once keeps all its spans until then. A recipe with such a source whose spans
    need more than half the buffers, even grown, is not served (`key in reader` is false for its keys).
    """

    def __init__(self, recipes: Sequence[Sequence[tuple[Hashable, SpanSource]]], *, budget: int = BUFFER_BUDGET, readers: int = READERS) -> None:
        widest = max((len(r) for r in recipes), default=1)
        # Enough buffers for a recipe to hold one span of every input while the next ones are read.
        count = max(MIN_SPANS, 2 * widest + 1)
        self._span_bytes = max(ALIGN, align_down(min(SPAN_BYTES, budget // count)))
        span_lens = [{key: max(1, self._span_bytes // source.granule) * source.granule for key, source in recipe} for recipe in recipes]
        span_counts = [{key: -(-source.nbytes // span_len[key]) for key, source in recipe} for recipe, span_len in zip(recipes, span_lens)]
        held = [sum(spans.values()) for spans in span_counts]
        multi_pass = [any(source.reads > 1 for _, source in recipe) for recipe in recipes]
        # A recipe read in passes holds all its spans, and two workers must each be able to hold
        # one, plus a span for the next: the buffers grow for the largest such recipe, up to the
        # budget plus twice the largest input tensor (so memory stays within 1 GB + 3 × the
        # largest tensor). A 7B's MLP tensors (6 spans for 3 models) are then held, not re-read
        # through the page cache at each pass.
        largest = max((source.nbytes for recipe in recipes for _, source in recipe), default=0)
        limit = (budget + 2 * largest) // self._span_bytes
        count = max([count, *(2 * h + 1 for h, m in zip(held, multi_pass) if m and 2 * h + 1 <= limit)])
        self._capacity = count
        self._sources: dict[Hashable, SpanSource] = {}
        self._span_len: dict[Hashable, int] = {}
        self._jobs: list[tuple[Hashable, int]] = []
        for recipe, span_len, spans, h, m in zip(recipes, span_lens, span_counts, held, multi_pass):
            if m and h > count // 2:
                continue  # held whole, it could keep the other worker from any buffer
            for key, source in recipe:
                self._sources[key] = source
                self._span_len[key] = span_len[key]
            for k in range(max(spans.values(), default=0)):
                self._jobs.extend((key, k) for key, n in spans.items() if k < n)
        # A span and the partial blocks at either end that direct reads round out to.
        self._buffer_bytes = max(self._span_len.values(), default=0) + 2 * ALIGN
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self._next = 0  # the next job a reading thread takes
        self._serving = 0  # the job whose turn it is to get a buffer
        self._ready: dict[tuple[Hashable, int], torch.Tensor] = {}
        self._handed: dict[Hashable, set[int]] = {}  # key -> the spans its worker holds
        self._given_back: set[tuple[Hashable, int]] = set()
        self._errors: dict[tuple[Hashable, int], BaseException] = {}
        self._closed = False
        self._cond = threading.Condition()
        self._fds: dict[tuple[str, bool], int | None] = {}  # (path, direct) -> descriptor
        self._retired: list[int] = []
        self._fd_lock = threading.Lock()
        self.peak_bytes = 0  # buffer bytes allocated, for tests and reports
        self._threads = [threading.Thread(target=self._loop, name="merge-span-read", daemon=True) for _ in range(min(readers, len(self._jobs)))]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ workers' side

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sources

    def read(self, key: Hashable, start: int, stop: int) -> torch.Tensor | None:
        """Bytes [start, stop) of `key`'s tensor (one block), as a uint8 tensor valid until the
        next `read` of this key or its `release`; None where the page cache held that span and
        the tensor is read at most twice (the caller reads the block itself: a copy straight into
        its small, cache-hot buffer beats a copy into a span and another out of it)."""
        span_len = self._span_len[key]
        k = start // span_len
        if stop > (k + 1) * span_len:  # a bug of ours: blocks are whole within spans
            raise AssertionError(f"bytes {start}..{stop} straddle spans of {span_len}")
        with self._cond:
            handed = self._handed.setdefault(key, set())
            if self._sources[key].reads == 1:
                for previous in handed - {k}:
                    self._give_back((key, previous))
                handed.intersection_update({k})
            handed.add(k)
            while (key, k) not in self._ready:
                if (key, k) in self._given_back:  # a bug of ours: waiting would never end
                    raise AssertionError(f"span {k} of {key} was read again after it was given back")
                if (key, k) in self._errors:
                    raise self._errors.pop((key, k))
                if self._closed:
                    raise RuntimeError("span reader closed")
                self._cond.wait()
            buf = self._ready[(key, k)]
        if buf is None:
            return None
        delta = (self._sources[key].offset + k * span_len) % ALIGN
        return buf[delta + start - k * span_len : delta + stop - k * span_len]

    def release(self, key: Hashable) -> None:
        """The recipe is done with `key`: the spans it holds go back to the pool."""
        with self._cond:
            for k in self._handed.pop(key, ()):
                self._give_back((key, k))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        for fd in [*self._fds.values(), *self._retired]:
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._retired.clear()

    def _give_back(self, job: tuple[Hashable, int]) -> None:  # with self._cond held
        self._given_back.add(job)
        buf = self._ready.pop(job, None)
        if buf is not None:
            self._free.append(buf)
            self._cond.notify_all()

    # ------------------------------------------------------------ reading threads

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed or self._next >= len(self._jobs):
                    return
                ticket = self._next
                self._next += 1
            job = self._jobs[ticket]
            source, (begin, end) = self._sources[job[0]], self._file_range(job)
            try:
                in_cache = cached_fraction(self._fd(source.path, direct=False), begin, end) >= 0.5
            except OSError:  # the file is gone: reading the span says so, to the worker waiting for it
                in_cache = False
            # Read three times or more, a cached span is still copied in: once, here, not per pass.
            left_to_worker = in_cache and source.reads < 3
            with self._cond:
                # Buffers go to jobs in order: the earliest span a worker waits for is never
                # starved by later ones holding every buffer.
                while not self._closed and (self._serving != ticket or not (left_to_worker or self._free or self._allocated < self._capacity)):
                    self._cond.wait()
                if self._closed:
                    return
                self._serving += 1
                buf = None if left_to_worker else self._free.pop() if self._free else self._new_buffer()
                self._cond.notify_all()
            try:
                if buf is not None:
                    self._read_span(source, begin, end, buf, direct=not in_cache)
            except BaseException as e:  # handed to the worker that waits for this span
                with self._cond:
                    self._errors[job] = e
                    self._free.append(buf)
                    self._cond.notify_all()
                continue
            with self._cond:
                if self._closed:
                    return
                self._ready[job] = buf
                self._cond.notify_all()

    def _file_range(self, job: tuple[Hashable, int]) -> tuple[int, int]:
        key, k = job
        source, span_len = self._sources[key], self._span_len[key]
        begin = source.offset + k * span_len
        return begin, begin + min(span_len, source.nbytes - k * span_len)

    def _new_buffer(self) -> torch.Tensor:  # with self._cond held
        self._allocated += 1
        self.peak_bytes = self._allocated * (self._buffer_bytes + ALIGN)
        return aligned_buffer(self._buffer_bytes)

    def _read_span(self, source: SpanSource, begin: int, end: int, buf: torch.Tensor, *, direct: bool) -> None:
        """File bytes [begin, end) into `buf` from index `begin % ALIGN`, so that aligned file
        offsets land on aligned addresses (direct I/O), with direct reads if asked and where the
        file allows."""
        view = memoryview(buf.numpy())
        origin = align_down(begin)  # the file offset at buf[0]
        if direct and self._fd(source.path, direct=True) is not None:
            try:
                self._fill(source.path, True, view, origin, end, origin)
                return
            except CheckpointError:
                raise
            except OSError:  # the file system took O_DIRECT at open but not for this read
                self._no_direct(source.path)
        self._fill(source.path, False, view, begin, end, origin)

    def _fill(self, path: str, direct: bool, view: memoryview, at: int, end: int, view_origin: int) -> None:
        """Read file bytes [at, end) (at least: direct reads are rounded out to whole blocks) into
        `view`, whose index 0 holds file offset `view_origin`."""
        fd = self._fd(path, direct=direct)
        stop = align_up(end) if direct else end
        while at < end:
            n = os.preadv(fd, [view[at - view_origin : stop - view_origin]], at)
            if n <= 0:
                raise CheckpointError(f"{path}: cut short at byte {at} of a tensor that ends at {end}; the file is truncated")
            at += n

    def _fd(self, path: str, *, direct: bool) -> int | None:
        """This file's descriptor, opened once; None for direct I/O where the file system refuses it."""
        with self._fd_lock:
            if (path, direct) not in self._fds:
                self._fds[(path, direct)] = open_direct(path, os.O_RDONLY) if direct else os.open(path, os.O_RDONLY)
            return self._fds[(path, direct)]

    def _no_direct(self, path: str) -> None:
        """Direct reads of `path` failed after it opened: plain reads from now on (the descriptor
        stays open until `close`, other threads may be reading with it)."""
        with self._fd_lock:
            fd = self._fds.get((path, True))
            if fd is not None:
                self._retired.append(fd)
            self._fds[(path, True)] = None


def _libc_calls():
    """libc's mmap, mincore and munmap (Linux), to ask which pages of a file are cached without
    reading them; None elsewhere. (A non-blocking read, `RWF_NOWAIT`, would tell too, but it
    starts the kernel's read-ahead into the page cache: the bytes would be read twice.)"""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_, mincore, munmap = libc.mmap, libc.mincore, libc.munmap
    except (OSError, AttributeError):
        return None
    mmap_.restype, mmap_.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return mmap_, mincore, munmap


_LIBC = _libc_calls()
_PROT_READ, _MAP_SHARED, _MAP_FAILED = 1, 1, ctypes.c_void_p(-1).value


def cached_fraction(fd: int, begin: int, end: int) -> float:
    """The fraction of file bytes [begin, end)'s pages in the page cache (0.0 where we cannot tell)."""
    if _LIBC is None or end <= begin:
        return 0.0
    mmap_, mincore, munmap = _LIBC
    page = os.sysconf("SC_PAGE_SIZE")
    first = begin - begin % page
    length = end - first
    addr = mmap_(None, length, _PROT_READ, _MAP_SHARED, fd, first)
    if addr in (None, _MAP_FAILED):
        return 0.0
    try:
        pages = -(-length // page)
        vec = ctypes.create_string_buffer(pages)
        if mincore(addr, length, vec) != 0:
            return 0.0
        return 1.0 - vec.raw[:pages].count(b"\0") / pages  # bit 0 of each byte: resident; others reserved (zero)
    finally:
        munmap(addr, length)
