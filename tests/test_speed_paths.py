"""The engine's fast paths give the same numbers as the plain ones.

Radix select against torch.kthvalue and a sort; the read-ahead thread (order, memory budget,
errors, the pinned-buffer request that the CUDA path relies on) with a fake reader; the one-pass
finite check; and whole merges whose bytes must not depend on the number of worker threads.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import modelalloy
from modelalloy.engine.inputs import all_finite as _all_finite
from modelalloy.io.opener import open_checkpoint
from modelalloy.methods.radix_select import kth_largest_magnitude
from modelalloy.methods.sparsifiers import magnitude_mask
from modelalloy.engine.readahead import ReadAhead


def _cases(dtype: torch.dtype, count: int = 120):
    g = torch.Generator().manual_seed(7)
    for trial in range(count):
        n = int(torch.randint(1, 2500, (1,), generator=g))
        x = torch.randn(n, generator=g, dtype=dtype)
        if trial % 3 == 0:
            x = torch.round(x * 4) / 4  # many exact ties
        if trial % 5 == 0:
            x[: n // 2] = 0.0
        if trial % 7 == 0:
            x[::3] = -0.0
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        yield x.abs(), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_is_kthvalue(dtype):
    for magnitude, k in _cases(dtype):
        got = kth_largest_magnitude(magnitude, k)
        want = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
        assert got.dtype == dtype and got.item() == want.item(), (magnitude.numel(), k)


def test_radix_select_extremes():
    x = torch.tensor([0.0, 1e-45, 3.4e38, float("inf"), 1.0])  # subnormal, huge, inf
    for k in range(1, 6):
        assert kth_largest_magnitude(x, k).item() == torch.sort(x, descending=True).values[k - 1].item()


def test_magnitude_mask_keeps_exactly_k_taking_ties_in_index_order():
    delta = torch.tensor([0.5, -1.0, 0.5, 0.25, -0.5, 2.0, 0.5])
    mask = magnitude_mask(delta, density=4 / 7)  # k = 4: 2.0, 1.0 and the first two of the three 0.5s
    assert mask.tolist() == [True, True, True, False, False, True, False]
    for magnitude, k in _cases(torch.float32, 40):
        density = k / magnitude.numel()
        kept = magnitude_mask(magnitude, density)
        k = int(density * magnitude.numel())
        assert int(kept.sum()) == k
        if 0 < k < magnitude.numel():  # every kept entry is at least every dropped one
            assert magnitude[kept].min() >= magnitude[~kept].max()


def test_all_finite():
    assert _all_finite(torch.zeros(0))
    assert _all_finite(torch.tensor([1.0, -3e38, 0.0]))
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not _all_finite(torch.tensor([1.0, bad, 2.0]))
    assert not _all_finite(torch.tensor([float("inf"), float("-inf")]))


class _FakeDisk:
    """Tensors of known sizes; records what was read, with which pin flag, and what was prefetched."""

    def __init__(self, sizes: dict[str, int], fail_on: str | None = None, delay: float = 0.0):
        self.sizes, self.fail_on, self.delay = sizes, fail_on, delay
        self.reads: list[tuple[str, bool]] = []
        self.prefetched: list[str] = []
        self.lock = threading.Lock()

    def read(self, key: str, pin: bool) -> torch.Tensor:
        if key == self.fail_on:
            raise OSError(f"cannot read {key}")
        time.sleep(self.delay)
        with self.lock:
            self.reads.append((key, pin))
        return torch.full((self.sizes[key],), float(len(key)))

    def nbytes(self, key: str) -> int:
        return self.sizes[key]


def test_read_ahead_hands_over_every_job_in_order_within_the_budget():
    sizes = {f"t{i}": 100 for i in range(20)} | {"big": 1000}
    jobs = [["t0", "t1"], ["t2"], ["big", "t3"], ["t4", "t4"], *[[f"t{i}"] for i in range(5, 20)]]
    disk = _FakeDisk(sizes)
    reader = ReadAhead(jobs, disk.read, disk.nbytes, budget=300, prefetch=disk.prefetched.append)
    try:
        for i, job in enumerate(jobs):
            time.sleep(0.002)  # a slow worker: the reader runs ahead up to the budget
            got = reader.take(i)
            assert set(got) == set(job) and all(got[k].numel() == sizes[k] for k in job)
    finally:
        reader.close()
    assert [k for k, _ in disk.reads] == [k for job in jobs for k in dict.fromkeys(job)]  # plan order, each once
    assert reader.peak_held <= 1100  # the budget, or one job larger than it on its own
    assert all(not pin for _, pin in disk.reads)
    assert disk.prefetched[:3] == ["t2", "big", "t3"]  # the next job is hinted before a job is read


def test_read_ahead_requests_pinned_buffers_for_the_gpu_path():
    disk = _FakeDisk({"a": 4, "b": 4})
    reader = ReadAhead([["a"], ["b"]], disk.read, disk.nbytes, budget=8, pin_memory=True)
    try:
        reader.take(0), reader.take(1)
    finally:
        reader.close()
    assert disk.reads == [("a", True), ("b", True)]


def test_read_ahead_error_reaches_the_worker_that_needs_it():
    disk = _FakeDisk({"a": 4, "b": 4, "c": 4}, fail_on="b")
    reader = ReadAhead([["a"], ["b"], ["c"]], disk.read, disk.nbytes, budget=100)
    try:
        assert set(reader.take(0)) == {"a"}
        with pytest.raises(OSError, match="cannot read b"):
            reader.take(1)
        with pytest.raises(OSError):
            reader.take(2)
    finally:
        reader.close()


def test_read_ahead_close_stops_a_reader_waiting_on_the_budget():
    disk = _FakeDisk({f"t{i}": 10 for i in range(50)})
    reader = ReadAhead([[f"t{i}"] for i in range(50)], disk.read, disk.nbytes, budget=20)
    time.sleep(0.05)
    reader.close()  # nobody took anything: the thread must not hang
    assert len(disk.reads) <= 3


def test_checkpoint_read_and_prefetch(llama):
    ckpt = open_checkpoint(str(llama["base"]))
    name = "model.layers.0.mlp.up_proj.weight"
    ckpt.prefetch(name)
    ckpt.prefetch("no.such.tensor")  # a hint: never an error
    want = load_file(str(next(llama["base"].glob("*.safetensors"))))[name]
    assert torch.equal(ckpt.read(name, pin_memory=False), want)
    ckpt.close()


@pytest.mark.parametrize("method", ["ties", "linear", "slerp"])
def test_merge_bytes_do_not_depend_on_threads(tmp_path, llama, method):
    models = [{"model": str(llama["base"])}, {"model": str(llama["ft_dense"]), "parameters": {"weight": 0.7, "density": 0.5}}]
    if method != "slerp":
        models.append({"model": str(llama["ft_flip"]), "parameters": {"weight": 0.4, "density": 0.3}})
    config = {"merge_method": method, "base_model": str(llama["base"]), "models": models, "dtype": "bfloat16"}
    if method == "linear":
        config = {"merge_method": "linear", "models": [{"model": m["model"], "parameters": {"weight": 1.0}} for m in models]}
    if method == "slerp":
        config["parameters"] = {"t": 0.3}
        for m in config["models"]:
            m.pop("parameters", None)
    outputs = []
    for threads in (1, 3):
        out = tmp_path / f"out{threads}"
        modelalloy.merge(modelalloy.parse_config(yaml.safe_dump(config)), out, threads=threads, write_model_card=False)
        outputs.append({f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))})
    assert outputs[0] == outputs[1]
