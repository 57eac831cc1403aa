"""Scoring's large buffers come from the heap and stay there between batches (glibc), and go back afterwards."""

from __future__ import annotations

import resource

import pytest
import torch

from modelalloy.evaluate import allocator
from modelalloy.evaluate.scoring import perplexity

from .conftest import char_tokenizer, tiny_llama

pytestmark = pytest.mark.skipif(allocator._LIBC is None, reason="glibc only: elsewhere reused_buffers does nothing")

SIZE = 64 * 1024 * 1024  # bytes: far above glibc's mmap threshold, like a batch's logits


def _in_heap(tensor: torch.Tensor) -> bool:
    """Whether the tensor's memory lies in the process heap (brk), not a mapping of its own."""
    ptr = tensor.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if start <= ptr < end:
                    return True
    return False


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_large_blocks_come_from_the_heap_inside_and_go_back_after():
    assert not _in_heap(torch.ones(SIZE // 4))  # by default: a mapping of its own, unmapped on free
    with allocator.reused_buffers():
        with allocator.reused_buffers():  # nesting keeps the setting until the outer exit
            pass
        block = torch.ones(SIZE // 4)
        assert _in_heap(block)  # from the heap: freed, it stays for the next batch
        del block
        held = _rss_kib()
    assert _rss_kib() < held - SIZE // 1024 // 2  # on leaving, the heap is trimmed: the block goes back
    assert not _in_heap(torch.ones(SIZE // 4))  # and the default is back


def test_scoring_runs_inside_it(monkeypatch):
    entered = []

    class Probe:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(allocator, "reused_buffers", lambda: Probe())
    tok, model = char_tokenizer(), tiny_llama(0)
    perplexity(model, tok, ["abcabcabc" * 5], max_tokens=40, window=16)
    assert entered == [True]
