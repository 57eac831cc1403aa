"""Merging in row blocks gives the numbers of merging whole tensors.

The blockwise methods (linear, the SLERPs, model stock and the task-vector family) are one implementation for both paths
(`merge_whole` runs the block merge on one block); these tests check that cutting a tensor into
many blocks changes nothing: exact-k trimming with ties at the threshold counted across blocks,
random draws continuing from block to block, the l1 rescale's sums taken over every block, and
the engine writing blocks at their offsets straight from the input files.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch
import yaml

import modelalloy
from modelalloy.engine import tensors, worker
from modelalloy.io.opener import open_checkpoint
from modelalloy.io.direct import ALIGN
from modelalloy.io.spans import SpanReader
from modelalloy.methods import REGISTRY, get_method
from modelalloy.methods.blockwise import Block, TensorSpec, as_rows
from modelalloy.methods.radix_select import RadixSelect

BLOCKWISE = sorted(m.name for m in REGISTRY if m.blockwise)


def _in_blocks(method, tensors, base, rows_per_block, seed=0, **params):
    """Run `method`'s block merge over `rows_per_block`-row blocks, as the engine does."""
    spec = TensorSpec(tuple(tensors[0].shape), tensors[0].dtype, tensors[0].device)
    merge = method.block_merge(spec, seed=seed, **params)
    rows = [as_rows(t, spec) for t in tensors]
    base_rows = None if base is None else as_rows(base, spec)
    out = []
    for step in range(merge.passes + 1):
        merge.start(step)
        for r in range(0, spec.rows, rows_per_block):
            block = Block(r * spec.row_length, [x[r : r + rows_per_block] for x in rows], None if base_rows is None else base_rows[r : r + rows_per_block])
            if step < merge.passes:
                merge.observe(block)
            else:
                out.append(merge.output(block))
    return torch.cat(out).reshape(spec.shape)


def _params(method, count, **overrides):
    params = {p.name: ([p.default] * count if p.per_model else p.default) for p in method.params if not p.required}
    params.update({p.name: [0.7, 0.4, 0.9][:count] if p.per_model else 0.3 for p in method.params if p.required})
    params.update(overrides)
    return params


def test_the_blockwise_methods():
    assert {"linear", "slerp", "nuslerp", "multislerp", "model_stock", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"} <= set(BLOCKWISE)


@pytest.mark.parametrize("name", BLOCKWISE)
@pytest.mark.parametrize("rows_per_block", [1, 3, 7])
def test_blocks_give_the_whole_tensor_result(name, rows_per_block):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(23, 17, generator=g)
    # Rounded deltas: many exact ties in |δ|, so the threshold's ties straddle blocks.
    method = get_method(name)
    count = min(3, method.max_models or 3)
    tensors = [base + torch.round(torch.randn(23, 17, generator=g) * 8) / 16 for _ in range(count)]
    extra = {"density": [0.35, 0.5, 0.2][:count]} if method.param("density") else {}
    if method.param("rescale") is not None:
        extra["rescale"] = "l1"
    params = _params(method, count, **extra)
    with_base = method.base != "unused"
    whole = method(tensors, base=base if with_base else None, seed=5, **params)
    blocks = _in_blocks(method, tensors, base if with_base else None, rows_per_block, seed=5, **params)
    # The l1 rescale's ‖δ‖₁ and the spherical methods' norms and dots are summed block by block
    # (float64): the factors may move in the last bits.
    exact = params.get("rescale") != "l1" and name not in SUMS_NORMS
    torch.testing.assert_close(blocks, whole, rtol=0 if exact else 1e-6, atol=0)


SUMS_NORMS = {"slerp", "nuslerp", "multislerp", "model_stock"}


@pytest.mark.parametrize(
    ("name", "params", "with_base"),
    [
        ("model_stock", {"filter_wise": True}, True),
        ("nuslerp", {"weight": [1.0, 3.0], "nuslerp_flatten": False, "nuslerp_row_wise": False}, True),
        ("nuslerp", {"weight": [1.0, 3.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}, True),
        ("nuslerp", {"weight": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}, False),
        ("multislerp", {"weight": [0.5, 0.2, 0.3], "normalize_weights": True, "eps": 1e-8}, True),
        ("multislerp", {"weight": [0.5, 0.2, 0.3], "normalize_weights": False, "eps": 1e-8}, False),
    ],
)
@pytest.mark.parametrize("rows_per_block", [1, 4])
def test_blocks_give_the_whole_tensor_result_for_per_vector_variants(name, params, with_base, rows_per_block):
    """Per-row and per-column vectors (dim 0 of a 3-d tensor: every block mixes columns of many
    vectors), with and without a base."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 3, 5, generator=g)
    tensors = [base + 0.3 * torch.randn(4, 3, 5, generator=g) for _ in range(len(params.get("weight", [0] * 3)))]
    method = get_method(name)
    whole = method(tensors, base=base if with_base else None, **params)
    blocks = _in_blocks(method, tensors, base if with_base else None, rows_per_block, **params)
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-7)


def test_multislerp_cancelling_directions_fall_back_or_fail_in_blocks():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    method = get_method("multislerp")
    two = _in_blocks(method, [x, -x], None, 2, weight=[0.5, 0.5], normalize_weights=True, eps=1e-8)
    torch.testing.assert_close(two, torch.zeros_like(x), rtol=0, atol=1e-7)  # the linear mix of x and -x
    from modelalloy.errors import MergeError

    with pytest.raises(MergeError, match="cancel out"):
        _in_blocks(method, [x, -x, x.clone(), -x], None, 2, weight=[0.25] * 4, normalize_weights=True, eps=1e-8)


def test_streamed_radix_select_matches_sort_and_counts_ties():
    g = torch.Generator().manual_seed(3)
    x = (torch.round(torch.randn(5000, generator=g) * 4) / 4).abs()  # heavy ties
    ordered = torch.sort(x, descending=True).values
    for k in (1, 17, 2500, 4999, 5000):
        select = RadixSelect([k], torch.float32)
        for step in range(select.passes):
            select.start(step)
            for chunk in x.split(333):
                select.observe(chunk)
        select.finish()
        assert select.value[0] == ordered[k - 1].item()
        assert select.above[0] == int((x > ordered[k - 1]).sum())


def test_ties_keeps_exactly_k_across_blocks():
    base = torch.zeros(6, 5)
    x = torch.tensor([1.0, 0.5] * 15).reshape(6, 5)  # 15 entries tie at 1.0
    method = get_method("ties")
    params = _params(method, 1, density=[0.2])  # k = 6 of the 15 tied 1.0s: the first six in index order
    out = _in_blocks(method, [x], base, 1, **params).reshape(-1)
    assert int((out != 0).sum()) == 6
    assert out.nonzero().squeeze(1).tolist() == [0, 2, 4, 6, 8, 10]


def _config(llama, method):
    models = [{"model": str(llama["base"])}]
    takes_density = get_method(method).param("density") is not None
    models += [{"model": str(llama[ft]), "parameters": {"weight": w} | ({"density": d} if takes_density else {})} for ft, w, d in (("ft_dense", 0.7, 0.5), ("ft_flip", 0.4, 0.3))]
    config = {"merge_method": method, "base_model": str(llama["base"]), "models": models, "dtype": "bfloat16"}
    if method == "linear":
        config = {"merge_method": "linear", "models": [{"model": m["model"], "parameters": {"weight": 1.0}} for m in models]}
    if method == "slerp":
        config = {"merge_method": "slerp", "base_model": str(llama["base"]), "models": [{"model": str(llama["base"])}, {"model": str(llama["ft_dense"])}], "parameters": {"t": 0.3}, "dtype": "bfloat16"}
    if method == "model_stock":
        config["models"] = [{"model": m["model"]} for m in models]
    if method == "nuslerp":
        models = [{"model": str(llama[ft]), "parameters": {"weight": w}} for ft, w in (("ft_dense", 1.0), ("ft_flip", 2.0))]
        config = {"merge_method": "nuslerp", "base_model": str(llama["base"]), "models": models, "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "dtype": "bfloat16"}
    return modelalloy.parse_config(yaml.safe_dump(config))


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "breadcrumbs", "task_arithmetic", "slerp", "model_stock", "multislerp", "nuslerp"])
def test_streamed_merge_is_the_whole_tensor_merge(tmp_path, llama, method, monkeypatch):
    """The engine streams these methods in blocks (here of 64 entries, so every tensor is cut);
    forcing the whole-tensor path must give the same tensors."""
    config = _config(llama, method)
    monkeypatch.setattr(tensors, "block_rows", lambda spec: max(1, 64 // spec.row_length))
    streamed = []
    real = worker.stream_tensor
    monkeypatch.setattr(worker, "stream_tensor", lambda recipe, *a: (streamed.append(recipe.name), real(recipe, *a)))
    modelalloy.merge(config, tmp_path / "streamed", write_model_card=False)
    assert streamed, "nothing was streamed"
    monkeypatch.setattr(worker, "streams", lambda *a: False)
    modelalloy.merge(config, tmp_path / "whole", write_model_card=False)
    a, b = open_checkpoint(str(tmp_path / "streamed")), open_checkpoint(str(tmp_path / "whole"))
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        if method == "dare_ties" or method in SUMS_NORMS:  # sums in another order: at most a bf16 rounding apart
            torch.testing.assert_close(a.read(name).float(), b.read(name).float(), rtol=2**-7, atol=0)
        else:
            assert torch.equal(a.read(name), b.read(name)), name


def test_streaming_hashes_and_checks_inputs_like_whole_reads(tmp_path, llama, monkeypatch):
    """The model card's input digests do not depend on the path that read the tensors."""
    config = _config(llama, "ties")
    monkeypatch.setattr(tensors, "block_rows", lambda spec: max(1, 64 // spec.row_length))
    streamed = modelalloy.merge(config, tmp_path / "streamed").input_hashes
    monkeypatch.setattr(worker, "streams", lambda *a: False)
    whole = modelalloy.merge(config, tmp_path / "whole").input_hashes
    assert streamed == whole and len(streamed) == 3


@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_streaming_odd_shapes_and_dtypes(tmp_path, method, monkeypatch):
    """Scalars, empty tensors, vectors and float32/float16 inputs stream like whole tensors."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    shapes = {"a.scalar": (), "b.empty_rows": (0, 4), "c.empty_cols": (4, 0), "d.vector": (5,), "e.matrix": (3, 7)}
    dirs = []
    for i, dtype in enumerate((torch.float32, torch.float16, torch.float32)):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
        dirs.append(str(d))
    config = {"merge_method": method, "base_model": dirs[0], "models": [{"model": dirs[0]}, {"model": dirs[1], "parameters": {"weight": 0.6, "density": 0.5}}]}
    if method != "slerp":
        config["models"].append({"model": dirs[2], "parameters": {"weight": 0.3, "density": 0.7}})
    if method == "linear":
        config = {"merge_method": "linear", "models": [{"model": d, "parameters": {"weight": 1.0}} for d in dirs], "dtype": "float16"}
    if method == "slerp":
        config["parameters"] = {"t": 0.4}
        config["models"][1].pop("parameters")
    parsed = modelalloy.parse_config(yaml.safe_dump(config))
    monkeypatch.setattr(tensors, "block_rows", lambda spec: 2)
    modelalloy.merge(parsed, tmp_path / "streamed", write_model_card=False, copy_tokenizer=False)
    monkeypatch.setattr(worker, "streams", lambda *a: False)
    modelalloy.merge(parsed, tmp_path / "whole", write_model_card=False, copy_tokenizer=False)
    a, b = open_checkpoint(str(tmp_path / "streamed")), open_checkpoint(str(tmp_path / "whole"))
    for name, shape in shapes.items():
        x, y = a.read(name), b.read(name)
        assert tuple(x.shape) == shape and x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=1e-6 if method == "slerp" else 0, atol=0)


def _evict(model_dirs):
    for d in model_dirs:
        for path in d.glob("*.safetensors"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # only clean pages can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"])
def test_inputs_read_ahead_from_disk_or_from_the_page_cache_merge_alike(tmp_path, llama, method, monkeypatch):
    """Streamed merges read cold inputs ahead in spans (directly from the disk where it allows;
    methods with statistics passes re-read the spans they keep); with the inputs in the page
    cache each block is read as before. Same output, same digests."""
    # Fresh copies: pages of the shared fixture that an earlier test keeps mapped cannot be evicted.
    llama = {name: shutil.copytree(llama[name], tmp_path / "inputs" / name) for name in ("base", "ft_dense", "ft_flip")}
    config = _config(llama, method)
    monkeypatch.setattr(tensors, "block_rows", lambda spec: max(1, 64 // spec.row_length))
    monkeypatch.setattr(worker, "SpanReader", functools.partial(worker.SpanReader, budget=8 * ALIGN, readers=3))
    served = []
    real_read = SpanReader.read
    monkeypatch.setattr(SpanReader, "read", lambda self, *a: (b := real_read(self, *a), served.append(b is not None))[0])
    inputs = [llama["base"], llama["ft_dense"], llama["ft_flip"]]
    _evict(inputs)
    cold = modelalloy.merge(config, tmp_path / "cold")
    # Not all: reading a file's header, the kernel reads ahead into the page cache most of a file
    # this small (the span reader leaves what it finds cached to the caller).
    assert any(served), "the cold merge did not read its inputs ahead"
    for d in inputs:
        for path in d.glob("*.safetensors"):
            path.read_bytes()  # into the page cache
    served.clear()
    warm = modelalloy.merge(config, tmp_path / "warm")
    # Cached inputs are read block by block as before, except by methods that read them three
    # times (TIES: two statistics passes): copied into spans once, those are re-read from there.
    assert served and any(served) == (method == "ties"), served
    assert cold.input_hashes == warm.input_hashes
    a, b = open_checkpoint(str(tmp_path / "cold")), open_checkpoint(str(tmp_path / "warm"))
    for name in a.tensors:
        assert torch.equal(a.read(name), b.read(name)), name


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs"])
def test_bfloat16_inputs_stream_as_stored_into_the_fused_kernels(tmp_path, method, monkeypatch):
    """bf16 checkpoints merged in float32: the task-vector family takes the stored bf16 blocks
    (widened exactly in its kernels, no float32 copy of each block) and writes the bits of the
    whole-tensor path, which widens the tensors first."""
    import json

    from safetensors.torch import save_file

    from modelalloy.methods.task_vector_merge import TaskVectorMerge

    g = torch.Generator().manual_seed(8)
    base = {"a.weight": torch.randn(24, 16, generator=g), "b.weight": torch.randn(40, generator=g)}
    dirs = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        d.mkdir()
        weights = {k: (v if i == 0 else v + torch.round(torch.randn(v.shape, generator=g) * 4) / 32).bfloat16() for k, v in base.items()}
        save_file(weights, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
        dirs.append(str(d))
    params = {"weight": 0.6, "density": 0.4} | ({"gamma": 0.05} if method == "breadcrumbs" else {})
    config = {"merge_method": method, "base_model": dirs[0], "models": [{"model": dirs[0]}] + [{"model": d, "parameters": params} for d in dirs[1:]]}
    parsed = modelalloy.parse_config(yaml.safe_dump(config))
    seen = []
    real_output = TaskVectorMerge.output
    monkeypatch.setattr(TaskVectorMerge, "output", lambda self, block: (seen.append(block.base.dtype), real_output(self, block))[1])
    monkeypatch.setattr(tensors, "block_rows", lambda spec: max(1, 48 // spec.row_length))
    modelalloy.merge(parsed, tmp_path / "streamed", write_model_card=False, copy_tokenizer=False)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    monkeypatch.setattr(worker, "streams", lambda *a: False)
    modelalloy.merge(parsed, tmp_path / "whole", write_model_card=False, copy_tokenizer=False)
    assert set(seen) == {torch.float32}
    a, b = open_checkpoint(str(tmp_path / "streamed")), open_checkpoint(str(tmp_path / "whole"))
    for name in base:
        assert a.read(name).dtype == torch.bfloat16
        assert torch.equal(a.read(name).view(torch.int16), b.read(name).view(torch.int16)), name
        assert not torch.equal(a.read(name), open_checkpoint(dirs[0]).read(name))
