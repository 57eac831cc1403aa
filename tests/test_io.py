"""Reading and writing checkpoints: header validation, positioned reads, the shard writer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelalloy.errors import CheckpointError
from modelalloy.io.opener import open_checkpoint
from modelalloy.io.safetensors_format import read_header
from modelalloy.io.writer import OutputTensor, ShardedWriter, layout_shards, parse_size

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "c.ids": torch.tensor([7, 8, 9], dtype=torch.int64),
    "d.empty": torch.zeros(0, 4),
}


def model_dir(tmp_path: Path, tensors=TENSORS) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"architectures": ["X"], "num_hidden_layers": 1}))
    return d


def test_reads_every_tensor_exactly(tmp_path):
    ckpt = open_checkpoint(str(model_dir(tmp_path)))
    for name, value in TENSORS.items():
        got = ckpt.read(name)
        assert got.dtype == value.dtype and torch.equal(got, value)
    ckpt.close()


def corrupt(tmp_path: Path, mutate) -> Path:
    d = model_dir(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(mutate(f.read_bytes()))
    return f


def with_header(data: bytes, header: dict) -> bytes:
    n = int.from_bytes(data[:8], "little")
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def header_of(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d[:5], "not a safetensors file"),
        (lambda d: (10**9).to_bytes(8, "little") + d[8:], "header claims"),
        (lambda d: d[:8] + b"x" + d[9:], "not valid JSON"),
        (lambda d: d[:-10], "truncated"),
        (lambda d: with_header(d, header_of(d) | {"a.weight": {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 48]}}), "needs 60 bytes"),
        (lambda d: with_header(d, header_of(d) | {"a.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 10**6]}}), "ends at byte"),
        (lambda d: with_header(d, header_of(d) | {"a.weight": {"dtype": "Q4", "shape": [3, 4], "data_offsets": [0, 48]}}), "unsupported dtype"),
        (lambda d: with_header(d, header_of(d) | {"a.weight": {"dtype": "F32", "shape": [-3, 4], "data_offsets": [0, 48]}}), "invalid shape"),
        (lambda d: with_header(d, header_of(d) | {"b.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), "overlap"),
    ],
)
def test_corrupt_files_are_one_line_errors_naming_the_file(tmp_path, mutate, message):
    f = corrupt(tmp_path, mutate)
    with pytest.raises(CheckpointError) as err:
        read_header(str(f))
    assert message in str(err.value) and str(f) in str(err.value) and "\n" not in str(err.value)


def test_missing_dir_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weight files"):
        open_checkpoint(str(tmp_path / "empty"))
    d = model_dir(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json missing"):
        open_checkpoint(str(d))
    (d / "config.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="unreadable config.json"):
        open_checkpoint(str(d))


def test_sharded_index_missing_shard_and_escape(tmp_path):
    d = model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(str(d))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        open_checkpoint(str(d))


def test_pickle_refused_unless_allowed(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pickle can run arbitrary code"):
        open_checkpoint(str(d))
    ckpt = open_checkpoint(str(d), allow_pickle=True)
    assert torch.equal(ckpt.read("w"), torch.ones(2))


def test_model_id_from_the_local_hf_cache_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    snap.parent.mkdir(parents=True)
    shutil.copytree(model_dir(tmp_path), snap)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    ckpt = open_checkpoint("org/tiny")
    assert ckpt.revision == "0123abcd" and torch.equal(ckpt.read("a.weight"), TENSORS["a.weight"])
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        open_checkpoint("org/absent")


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5K", 1500), (123, 123)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_layout_respects_limit_and_keeps_order():
    specs = [OutputTensor(f"t{i}", torch.float32, (10,)) for i in range(7)]  # 40 bytes each
    shards = layout_shards(specs, 100)
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6"]]
    assert layout_shards([OutputTensor("big", torch.float32, (100,))], 100)[0][0].name == "big"


def test_writer_output_loads_with_safetensors_and_bytes_do_not_depend_on_order(tmp_path):
    tensors = {f"layer.{i}.w": torch.randn(5, 3) for i in range(6)} | {"ids": torch.arange(4)}
    specs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]

    def write(out: Path, order: list[str]) -> list[bytes]:
        out.mkdir()
        w = ShardedWriter(out, specs, max_shard_size=130, metadata={"k": "v"})
        for name in order:
            w.write(name, tensors[name])
        files = w.finalize()
        return [(out / f).read_bytes() for f in files]

    names = list(tensors)
    first = write(tmp_path / "a", names)
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert write(tmp_path / "b", shuffled) == first
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    loaded = {}
    for f in sorted(set(index["weight_map"].values())):
        loaded |= load_file(tmp_path / "a" / f)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
