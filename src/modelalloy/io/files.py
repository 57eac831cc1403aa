"""Opening the files of an input model without trusting what they are.

A model directory is someone else's: a "shard" may be a named pipe (opening it for reading
blocks until a writer comes, i.e. forever), a character device (`/dev/zero`: endless bytes), a
socket or a directory. Every file we read from an input is opened here, non-blocking, and
checked to be a regular file before a byte is read (the check is on the opened descriptor, so
a file swapped for a pipe between a check and the open cannot slip through).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from modelalloy.errors import CheckpointError

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def file_kind(mode: int) -> str:
    """'a named pipe (FIFO)', 'a directory', … for a stat mode that is not a regular file."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def not_regular(path: str | Path, mode: int) -> CheckpointError:
    return CheckpointError(f"{path}: is {file_kind(mode)}, not a regular file; refusing to read it (replace it with the real file)")


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of `path`, which must be a regular file (see the module docstring).

    O_NONBLOCK makes the open of a FIFO return at once instead of waiting for a writer; on a
    regular file it changes nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise not_regular(path, mode)
    return fd


def read_regular(path: str | Path, *, limit: int | None = None) -> bytes:
    """The bytes of the regular file `path`; one larger than `limit` bytes is refused unread."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise CheckpointError(f"{path}: {size / 1e6:.1f} MB, larger than any real one ({limit / 1e6:.0f} MB at most); is it the right file?")
        chunks = []
        while chunk := os.read(fd, 1 << 24):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)


def is_regular(path: str | Path) -> bool:
    """Whether `path` (following symlinks) is a regular file; False when it does not exist."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def check_regular(path: str | Path) -> None:
    """Raise the one-line error for an existing `path` that is not a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise not_regular(path, mode)
