"""Timing a command: wall, CPU and peak RSS of its whole process tree; the raw-read and write bounds.

Peak RSS is the largest *sum* over the tree, polled every 0.25 s (a merge tool may fork workers, and mergekit's
mapped shards count as resident once touched), or the largest single process's own high-water
mark (VmHWM, kept by the kernel since its exec) if that is larger: a peak between two polls is
not missed. Not wait4's ru_maxrss: a child forked from this (large) benchmark process starts
with the parent's resident pages, so ru_maxrss reports the benchmark's size, not the tool's.
CPU time comes from wait4's rusage, which covers the child and every descendant it waited for.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

# Each poll walks /proc to find the tree (a few ms of the benchmark's CPU): at 20 ms that took
# 0.3-0.7 s from a 5 s merge on 2 cores. Peaks between polls are still seen, process by process,
# through VmHWM.
POLL_SECONDS = 0.25


@dataclass
class RunStats:
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    returncode: int
    stderr_tail: str


def _tree_rss(proc: psutil.Process, high_water: dict[int, int]) -> int:
    """The tree's summed RSS now; records each process's VmHWM in `high_water`."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
            high_water[p.pid] = max(high_water.get(p.pid, 0), _vm_hwm(p.pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            pass
    return total


def _vm_hwm(pid: int) -> int:
    """Peak resident set of one process since its exec, in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, log_file: Path | None = None) -> RunStats:
    """Run `cmd` to completion; poll the tree's RSS every POLL_SECONDS."""
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL
    start = time.perf_counter()
    popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log_file else subprocess.DEVNULL, env=env)
    proc = psutil.Process(popen.pid)
    peak = 0
    high_water: dict[int, int] = {}
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, _tree_rss(proc, high_water))
            except psutil.NoSuchProcess:
                return
            done.wait(POLL_SECONDS)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(popen.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    popen.returncode = os.waitstatus_to_exitcode(status)
    if log_file:
        out.close()
    peak = max(peak, max(high_water.values(), default=0))  # the largest single process, as a floor
    tail = log_file.read_text(errors="replace")[-2000:] if log_file else ""
    return RunStats(wall, usage.ru_utime + usage.ru_stime, peak, popen.returncode, tail)


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU since boot (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def wait_until_idle(busy_below: float = 0.1, window_s: float = 0.5, timeout_s: float = 30.0) -> float:
    """Wait until the machine is idle (under `busy_below` of its CPUs busy over two consecutive
    windows), at most `timeout_s`; returns the seconds waited. Deleting the previous run's output
    and flushing it keep a kernel thread busy for seconds after the call returns (measured: one
    core at 100 % system time for up to 10 s), which would be charged to whichever run comes next."""
    start = time.perf_counter()
    quiet = 0
    while quiet < 2 and time.perf_counter() - start < timeout_s:
        busy0, total0 = _cpu_times()
        time.sleep(window_s)
        busy1, total1 = _cpu_times()
        quiet = quiet + 1 if (busy1 - busy0) < busy_below * max(1, total1 - total0) else 0
    return time.perf_counter() - start


def evict(paths: list[Path]) -> None:
    """Ask the kernel to drop these files' clean pages from the page cache (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[Path], chunk: int = 64 << 20) -> tuple[float, int]:
    """Seconds and bytes to read every byte of `paths` once, sequentially, into one reused buffer."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while True:
                got = os.preadv(fd, [view], offset)
                if got <= 0:
                    break
                offset += got
            total += offset
        finally:
            os.close(fd)
    return time.perf_counter() - start, total


def raw_read_direct(paths: list[Path], chunk: int = 64 << 20, readers: int = 8) -> float | None:
    """Seconds to read every byte of `paths` once with direct I/O (`O_DIRECT`: the disk writes into
    our buffers, no page cache, no copy), `readers` requests of `chunk` bytes in flight (the disk
    of this VM reads 2.0-2.1 GB/s so, 0.6-1.7 GB/s with one plain reader copying out of the page
    cache); None where the file system has no direct I/O. A cold read's lower bound: alloy reads
    cold inputs this way (`modelalloy/io/spans.py`)."""
    import mmap

    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
    except OSError:
        return None
    jobs = [(fd, offset) for fd, p in zip(fds, paths) for offset in range(0, p.stat().st_size, chunk)]
    lock = threading.Lock()

    def read() -> None:
        buf = mmap.mmap(-1, chunk)  # page-aligned, as direct I/O needs
        view = memoryview(buf)
        while True:
            with lock:
                if not jobs:
                    return
                fd, offset = jobs.pop(0)
            os.preadv(fd, [view], offset)  # the last chunk of a file comes back short

    start = time.perf_counter()
    threads = [threading.Thread(target=read) for _ in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for fd in fds:
        os.close(fd)
    return elapsed


def raw_write(directory: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    """Seconds to write `nbytes` of random bytes (nothing a disk could compress or skip) to a new
    file in `directory` durably through the page cache (write-back started after every chunk,
    one fsync at the end); the file is removed afterwards. On this VM the copy into freshly
    allocated page-cache pages bounds it (2.2 GB in 3.4-6.9 s, a core at system time)."""
    from modelalloy.io.writer import start_writeback

    block = memoryview(os.urandom(chunk))
    path = directory / ".raw-write-bound"
    wait_until_idle()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < nbytes:
            n = os.write(fd, block[: min(nbytes - written, chunk)])
            start_writeback(fd, written, n)
            written += n
        os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    os.sync()
    return elapsed


def raw_write_direct(directory: Path, nbytes: int, chunk: int = 8 << 20) -> float | None:
    """Seconds to write `nbytes` of random bytes durably with direct I/O, one `chunk` at a time
    from one aligned buffer, as alloy writes its output (`modelalloy/io/direct_writes.py`; this
    VM's disk takes 2.2 GB so in 0.75-0.9 s); None where the file system has no direct I/O."""
    import mmap

    if not hasattr(os, "O_DIRECT"):
        return None
    buf = mmap.mmap(-1, chunk)  # page-aligned, as direct I/O needs
    buf.write(os.urandom(chunk))
    view = memoryview(buf)
    nbytes -= nbytes % chunk  # whole chunks: the tail of a direct write must be aligned too
    path = directory / ".raw-write-bound"
    wait_until_idle()
    start = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError:
        return None
    try:
        written = 0
        while written < nbytes:
            written += os.pwrite(fd, view, written)
        os.fsync(fd)
        elapsed = time.perf_counter() - start
    except OSError:  # the file system opened with O_DIRECT and refused the write
        return None
    finally:
        os.close(fd)
        path.unlink()
    os.sync()
    return elapsed


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))
