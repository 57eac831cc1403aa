"""The fused float32 kernels (methods/kernels.py) against the torch path they replace: the same
bits, for every keep rule, rescale, consensus and divisor branch of the task-vector family, with
ties at the thresholds straddling blocks, and with bfloat16 blocks widened in the kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelalloy.methods import get_method, kernels
from modelalloy.methods.blockwise import Block, TensorSpec, as_rows
from modelalloy.methods.radix_select import RadixSelect


def _run(name, tensors, base, rows_per_block, *, fused, seed=3, **params):
    method = get_method(name)
    for p in method.params:
        if not p.required:
            params.setdefault(p.name, [p.default] * len(tensors) if p.per_model else p.default)
    spec = TensorSpec(tuple(base.shape), torch.float32, base.device)
    merge = method.block_merge(spec, seed=seed, **params)
    assert merge.fused, f"{name} {params} should take the fused path"
    if not fused:
        merge.fused = False
    rows = [as_rows(t, spec) for t in tensors]
    base_rows = as_rows(base, spec)
    out = []
    for step in range(merge.passes + 1):
        merge.start(step)
        for r in range(0, spec.rows, rows_per_block):
            block = Block(r * spec.row_length, [x[r : r + rows_per_block] for x in rows], base_rows[r : r + rows_per_block])
            if step < merge.passes:
                merge.observe(block)
            else:
                out.append(merge.output(block).clone())
    return torch.cat(out).reshape(spec.shape)


def _models(shape, *, tied, seed=0):
    """bf16-valued base and three fine-tunes; `tied`: deltas on a coarse grid (many |δ| equal at
    every threshold, some entries not changed at all)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).bfloat16()
    if tied:
        fts = [(base.float() + torch.round(torch.randn(shape, generator=g) * 3) / 64).bfloat16() for _ in range(3)]
    else:
        fts = [(base.float() + 0.02 * torch.randn(shape, generator=g)).bfloat16() for _ in range(3)]
    return base, fts


CASES = [
    ("ties", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.3, 0.8]}),
    ("ties", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.3, 0.8], "normalize": False, "lambda": 0.6}),
    ("ties", {"weight": [0.7, -0.4, 0.9], "density": [0.5, 0.3, 0.8]}),  # a negative weight: the divisor's other floor
    ("ties", {"weight": [0.5, 0.5, 0.5], "density": [1.0, 0.5, 0.001]}),  # keep all, and none at the smallest sizes
    ("breadcrumbs", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.3, 0.8], "gamma": [0.1, 0.01, 0.05]}),
    ("breadcrumbs_ties", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.3, 0.8], "gamma": [0.1, 0.01, 0.05]}),
    ("breadcrumbs", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.3, 0.8], "gamma": [0.1, 0.01, 0.05], "rescale": "inverse_p"}),
    ("dare_ties", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.3, 0.8]}),
    ("dare_ties", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.3, 0.8], "rescale": "inverse_p"}),
    ("dare_ties", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.3, 0.8], "rescale": False}),
    ("dare_linear", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.3, 0.8]}),
    ("task_arithmetic", {"weight": [0.7, 0.4, 0.9], "lambda": 1.3}),
    ("task_arithmetic", {"weight": [0.7, -0.7, 0.0], "normalize": True}),  # weights summing to 0: divisor 1
]


def _bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("tied", [True, False])
# The last: blocks of 9600 entries, in tiles of TILE (4096): tie windows opening, closing and
# wholly inside or outside a tile.
@pytest.mark.parametrize(("shape", "rows_per_block"), [((7,), 1), ((256,), 1), ((64, 33), 5), ((40, 96), 40), ((96, 200), 48)])
def test_fused_kernels_give_the_torch_paths_bits(name, params, tied, shape, rows_per_block):
    base, fts = _models(shape, tied=tied)
    wide_base, wide = base.float(), [t.float() for t in fts]
    expected = _run(name, wide, wide_base, rows_per_block, fused=False, **params)
    assert not expected.eq(wide_base).all(), "the merge changed nothing: a weak case"
    fused = _run(name, wide, wide_base, rows_per_block, fused=True, **params)
    from_bf16 = _run(name, fts, base, rows_per_block, fused=True, **params)  # bf16 blocks, as the engine streams them
    assert torch.equal(_bits(fused), _bits(expected))
    assert torch.equal(_bits(from_bf16), _bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_histogram_kernel_counts_like_bincount(dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(5000, generator=g) * 0.1).to(dtype)
    base = (torch.round(torch.randn(5000, generator=g) * 4) / 8).to(dtype)
    bits = (x.float() - base.float()).abs().view(torch.int32).numpy().view(np.uint32).astype(np.int64)
    counts = np.zeros((1, 2**16), dtype=np.int64)
    scratch = kernels.scratch(5000).view(np.uint32)
    kernels.abs_delta_histogram(kernels.kernel_array(x), kernels.kernel_array(base), scratch, 16, np.zeros(0, dtype=np.int64), counts)
    assert np.array_equal(counts[0], np.bincount(bits >> 16, minlength=2**16))
    # The low digit among the entries under two prefixes (the two most common top digits).
    tops = np.argsort(counts[0])[-2:]
    prefixes = (tops << 16).astype(np.int64)
    low = np.zeros((2, 2**16), dtype=np.int64)
    kernels.abs_delta_histogram(kernels.kernel_array(x), kernels.kernel_array(base), scratch, 0, prefixes, low)
    for row, top in zip(low, tops):
        assert np.array_equal(row, np.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=2**16))
        assert row.sum() == counts[0][top] > 0


def test_fused_radix_select_finds_the_sorted_values():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(3000, generator=g)
    x = base + torch.round(torch.randn(3000, generator=g) * 5) / 32  # ties
    magnitude = (x - base).abs()
    ks = [1, 17, 1500, 2999, 3000]
    select = RadixSelect(ks, torch.float32)
    for step in range(select.passes):
        select.start(step)
        for start in range(0, 3000, 700):
            select.observe_difference(x[start : start + 700], base[start : start + 700])
    select.finish()
    ordered = magnitude.sort(descending=True).values
    for t, k in enumerate(ks):
        assert select.value[t] == float(ordered[k - 1])
        assert select.above[t] == int((magnitude > ordered[k - 1]).sum())
        assert select.equal[t] == int((magnitude == ordered[k - 1]).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "base"])
def test_radix_select_sees_nonfinite_inputs_in_its_first_pass(dtype, bad, where):
    """The top digit's bins from +Inf's bits up count |x − base|'s NaNs and Infs (kernel path for
    float32 x and base of float32 or bfloat16, torch's otherwise)."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(1000, generator=g)
    x = base + torch.randn(1000, generator=g) * 1e-2
    base, x = base.to(dtype), x.to(dtype)
    if bad is not None:
        (x if where == "x" else base)[777] = bad
    compute = torch.float32 if dtype == torch.bfloat16 else dtype  # the kernel widens bf16 itself
    select = RadixSelect([10], compute)
    for step in range(select.passes):
        select.start(step)
        for start in range(0, 1000, 300):
            xs, bs = x[start : start + 300], base[start : start + 300]
            if compute == torch.float32:
                select.observe_difference(xs, bs)
            else:
                select.observe((xs - bs).abs())
    select.finish()
    assert select.saw_nonfinite == (bad is not None)


def test_a_difference_overflowing_to_inf_counts_as_nonfinite():
    base, x = torch.tensor([3e38, 0.0]), torch.tensor([-3e38, 1.0])  # finite, but x − base is −Inf
    select = RadixSelect([1], torch.float32)
    select.start(0)
    select.observe_difference(x, base)
    select.start(1)
    assert select.saw_nonfinite


@pytest.mark.parametrize("name", ["della", "ties"])
def test_what_the_kernels_do_not_cover_keeps_the_torch_path(name):
    method = get_method(name)
    params = {p.name: ([p.default] * 2 if p.per_model else p.default) for p in method.params if not p.required}
    params.update({"weight": [0.5, 0.5], "density": [0.5, 0.5]})
    if name == "ties":  # the majority-count consensus, and a 16-bit compute dtype
        assert not method.block_merge(TensorSpec((8, 8), torch.float32, torch.device("cpu")), **params | {"consensus_method": "count"}).fused
        assert not method.block_merge(TensorSpec((8, 8), torch.bfloat16, torch.device("cpu")), **params).fused
    else:  # per-entry keep-probabilities
        assert not method.block_merge(TensorSpec((8, 8), torch.float32, torch.device("cpu")), seed=0, **params).fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 9001])
@pytest.mark.parametrize("density", [0.7, 0.1])
def test_the_l1_kernel_packs_the_masks_and_sums_like_numpy(dtype, n, density):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(dtype)
    x = (base.float() + 0.1 * torch.randn(n, generator=g)).to(dtype)
    if n > 8:
        x[3] = float("inf")  # δ·0 is NaN: the kept sum turns NaN when entry 3 is dropped, as torch's does
    draws = torch.rand(n, generator=g)
    draws[0] = float(np.float32(density))  # at the threshold: float32 comparison drops it
    bits = np.full(-(-n // 8), 0xFF, dtype=np.uint8)
    scratch = np.empty(2 * min(n, kernels.TILE), dtype=np.float32)
    before, after = kernels.l1_sums_with_mask_bits(kernels.kernel_array(x), kernels.kernel_array(base), draws.numpy(), np.float32(density), bits, scratch)

    delta = x.float().numpy() - base.float().numpy()
    mask = draws.numpy() < np.float32(density)
    assert not mask[0]
    np.testing.assert_array_equal(bits, np.packbits(mask))
    with np.errstate(invalid="ignore"):
        kept = delta * mask.astype(np.float32)
    np.testing.assert_allclose([before, after], [np.abs(delta.astype(np.float64)).sum(), np.abs(kept.astype(np.float64)).sum()], rtol=1e-12)



@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, -5])
def test_the_draws_are_torch_rands(seed):
    """Call after call, across the generator's 624-word refills and at odd sizes."""
    draws = kernels.UniformDraws(seed)
    generator = torch.Generator().manual_seed(seed)
    for shape in [(5,), (1000,), (624,), (3, 7), (1 << 18,), (1,), (623,), (2, 1250)]:
        ours = draws.draw(shape)
        assert ours.shape == shape and ours.dtype == torch.float32
        assert torch.equal(ours, torch.rand(shape, generator=generator))
