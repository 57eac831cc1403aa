"""Scoring's large buffers kept for the next batch instead of mapped afresh (glibc only).

A batch's logits are [batch, width, vocab] floats (400 MB for the demo's 8 × 256 × 49,152) and
log-softmax makes as many again. glibc's malloc serves blocks that large with a fresh `mmap` and
unmaps them on free, so every batch faulted in ~1.4 GB of zeroed pages: on the demo's 135M model
a full forward took 3.30 s per batch of 2,048 tokens, 1.22 s of it in the kernel, against 2.48 s
with the blocks kept. Within `reused_buffers()` large blocks come from the heap and stay there
between batches; on leaving, glibc's documented defaults are restored (128 KiB for both
thresholds) and the heap is trimmed, so the memory goes back to the system. With another C
library or OS it does nothing. The merge engine never runs inside it: its memory figures are
glibc's defaults.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024  # glibc's documented default for both
_KEEP = 1 << 30  # blocks up to 1 GiB from the heap; larger ones are still mapped
_lock = threading.Lock()
_depth = 0


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


@contextlib.contextmanager
def reused_buffers() -> Iterator[None]:
    """Within: freed large blocks stay in the heap for the next allocation (nests; thread-safe)."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _KEEP)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
                _LIBC.malloc_trim(0)
