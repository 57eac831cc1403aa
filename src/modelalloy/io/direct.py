"""Direct I/O (`O_DIRECT`): the disk reads into our buffers, past the page cache.

Why we bother: on the VM this project is built on, a copy out of freshly filled page-cache pages
runs at ~1 GB/s of a core's time (the first touch of those pages is slow), and that copy was
most of a cold merge's CPU. Reading 6.6 GB of cold inputs: one plain reader 3.0-10.8 s, almost
all of it kernel time; eight direct readers of 64 MiB 3.1-3.4 s with 0.7 s of CPU. The output
is written direct too (`io/direct_writes.py`). Direct I/O wants the buffer's address, the file offset and the
length in multiples of the device's block size; ALIGN (4096) covers the usual 512 and 4096.
"""

from __future__ import annotations

import os

import torch

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux, FreeBSD; elsewhere there is no direct I/O


def align_down(n: int) -> int:
    return n - n % ALIGN


def align_up(n: int) -> int:
    return align_down(n + ALIGN - 1)


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` whose first byte is at an ALIGN-aligned address."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    shift = -raw.data_ptr() % ALIGN
    return raw[shift : shift + nbytes]


def open_direct(path: str | os.PathLike, flags: int) -> int | None:
    """`path` opened with `flags | O_DIRECT`, or None where the file system (or OS) has no direct I/O."""
    if not O_DIRECT:
        return None
    try:
        return os.open(path, flags | O_DIRECT)
    except OSError:  # EINVAL: tmpfs, some network and FUSE file systems
        return None
