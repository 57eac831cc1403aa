"""Reading the next recipes' inputs while the current ones are computed.

One thread walks the plan in order and reads every input of each recipe (positioned reads, which
release the GIL), at most `budget` bytes ahead of the workers that `take` them. Before it reads a
recipe it asks the kernel to start fetching the following recipe's bytes (`prefetch`), so the disk
stays busy while this thread copies or hashes. On CUDA the buffers are pinned, which makes the
workers' host-to-device copies asynchronous; nothing else here depends on the device.

Results cannot depend on any of this: the workers receive exactly the tensors they would have
read themselves, whenever they ask.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)


class ReadAhead(Generic[Key]):
    """Reads `jobs[i]` (a list of keys) for i = 0, 1, … in a background thread; `take(i)` hands them over.

    `read(key, pin_memory)` returns a tensor, `nbytes(key)` its size before reading, `prefetch(key)`
    (optional) hints the kernel. The thread waits while it holds `budget` bytes nobody has taken;
    a single recipe larger than the budget is still read (alone), so the merge always progresses.
    `take` must be called for every index, in any order; workers that start in plan order (our
    pool does) can never wait on each other through the budget.
    """

    def __init__(
        self,
        jobs: Sequence[Sequence[Key]],
        read: Callable[[Key, bool], torch.Tensor],
        nbytes: Callable[[Key], int],
        *,
        budget: int,
        prefetch: Callable[[Key], None] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self._jobs = [list(dict.fromkeys(job)) for job in jobs]  # a tensor used twice is read once
        self._read, self._nbytes, self._prefetch = read, nbytes, prefetch
        self._budget, self._pin = budget, pin_memory
        self._ready: dict[int, dict[Key, torch.Tensor]] = {}
        self._sizes: dict[int, int] = {}
        self._held = 0
        self.peak_held = 0  # the most bytes read but not yet taken, for tests and reports
        self._next = 0  # the first index not yet read
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="merge-read", daemon=True)
        self._thread.start()

    def _job_bytes(self, i: int) -> int:
        return sum(self._nbytes(k) for k in self._jobs[i])

    def _loop(self) -> None:
        try:
            for i, job in enumerate(self._jobs):
                need = self._job_bytes(i)
                with self._cond:
                    while not self._closed and self._held > 0 and self._held + need > self._budget:
                        self._cond.wait()
                    if self._closed:
                        return
                if self._prefetch is not None and i + 1 < len(self._jobs):
                    for key in self._jobs[i + 1]:
                        self._prefetch(key)
                tensors = {key: self._read(key, self._pin) for key in job}
                with self._cond:
                    self._ready[i] = tensors
                    self._sizes[i] = need
                    self._held += need
                    self.peak_held = max(self.peak_held, self._held)
                    self._next = i + 1
                    self._cond.notify_all()
        except BaseException as e:  # handed to the worker that waits for it
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def take(self, index: int) -> dict[Key, torch.Tensor]:
        """The tensors of job `index`, read; waits for them. Re-raises the reader's error."""
        with self._cond:
            while index not in self._ready:
                if self._error is not None and self._next <= index:
                    raise self._error
                if self._closed:
                    raise RuntimeError("read-ahead closed")
                self._cond.wait()
            tensors = self._ready.pop(index)
            self._held -= self._sizes.pop(index)
            self._cond.notify_all()
            return tensors

    def close(self) -> None:
        """Stop reading and drop what was read but not taken (after an error elsewhere, or at the end)."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()
