"""Checks run in-process (cheaper than a subprocess): overflow in the cast to the output dtype, a
dangling symlink, duplicate header keys, an Inf input."""

from __future__ import annotations

import os

import pytest
from alloy_helpers import copy_model, rewrite_weights, write_config

import modelalloy
from modelalloy.errors import CheckpointError, MergeError
from modelalloy.io.checkpoint import open_checkpoint
from modelalloy.io.safetensors_format import read_header


def test_overflow_in_the_cast_to_the_output_dtype(tmp_path, llama):
    # 5e4 · (1 + 1) on the norm weights (≈ 1) is 1e5: finite in float32, Inf in float16 (max 65504).
    config = {
        "merge_method": "linear",
        "models": [{"model": str(llama[m]), "parameters": {"weight": 5e4}} for m in ("ft_dense", "ft_sparse")],
        "parameters": {"normalize": False},
        "out_dtype": "float16",
    }
    cfg = write_config(tmp_path / "m.yaml", config)
    with pytest.raises(MergeError, match=r"^model\.layers\.0\.\S+: the linear result overflows float16 \(Inf after the cast\)"):
        modelalloy.merge(cfg, tmp_path / "out", threads=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_dangling_symlink_is_named(tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(CheckpointError, match=r"link: is a symlink to .*gone, which does not exist"):
        open_checkpoint(str(tmp_path / "link"))


def test_duplicate_tensor_names_in_a_header(tmp_path):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = ('{"w":' + entry + ',"w":' + entry + "}").encode()
    (tmp_path / "dup.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match="names 'w' twice"):
        read_header(str(tmp_path / "dup.safetensors"))


def test_input_inf_warns_and_the_inf_it_produces_is_an_error(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "inf")
    rewrite_weights(model, lambda s: s["model.layers.2.mlp.gate_proj.weight"].__setitem__((0, 0), float("inf")))
    config = {"merge_method": "ties", "base_model": str(llama["base"]), "models": [{"model": str(model), "parameters": {"density": 0.3, "weight": 1.0}}, {"model": str(llama["ft_sparse"]), "parameters": {"density": 0.3, "weight": 1.0}}]}
    cfg = write_config(tmp_path / "m.yaml", config)
    # |Inf| is the largest magnitude, so TIES keeps it and the result is not finite.
    with pytest.warns(UserWarning, match=r"input tensors hold NaN or Inf: model\.layers\.2\.mlp\.gate_proj\.weight in .*inf; check those models"):
        with pytest.raises(MergeError, match=r"^model\.layers\.2\.mlp\.gate_proj\.weight: ties produced NaN or Inf"):
            modelalloy.merge(cfg, tmp_path / "out", threads=1)
