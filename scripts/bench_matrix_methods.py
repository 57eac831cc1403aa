"""Seconds per output tensor for the per-matrix methods on random [n, n] task vectors.

Usage: .venv/bin/python scripts/bench_matrix_methods.py [n ...]   (default 512 1024 2048)
Not part of the test suite; the numbers depend on the machine and its load. Torch threads come
from BENCH_THREADS (default 1: on a shared, loaded machine a thread pool mostly spins).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from modelalloy.methods import get_method


def bench(n: int, tasks: int = 3) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, n, generator=g)
    models = [base + 0.01 * torch.randn(n, n, generator=g) for _ in range(tasks)]
    grams = [(x := torch.randn(4 * n, n, generator=g)).T @ x for _ in range(tasks)]
    times = {}
    for name in ("task_arithmetic", "tsv", "iso_c", "iso_cts", "wudi", "regmean"):
        method = get_method(name)
        params = {p.name: [p.default] * tasks if p.per_model else p.default for p in method.params}
        params |= {"layout": "out_in"} if "layout" in params else {}
        start = time.perf_counter()
        method(models, base=base, stats=grams if method.stats else None, **params)
        times[name] = time.perf_counter() - start
    return times


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    for n in [int(a) for a in sys.argv[1:]] or [512, 1024, 2048]:
        row = bench(n)
        print(f"n={n:5d}  " + "  ".join(f"{k} {v:6.2f}s" for k, v in row.items()), flush=True)
