"""`alloy merge --backend ray` on a real local Ray instance (num_cpus=2): the same bytes as local.

One Ray instance for the module (starting one costs seconds; conftest.py keeps the module on
one pytest-xdist worker); the backend reuses the connection
it finds, as it would inside a program that had called `ray.init` itself. Many small shards (--max-shard-size) so that several tasks run at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "safety"))
from alloy_helpers import assert_one_line_error, run_alloy, write_config  # noqa: E402

import modelalloy  # noqa: E402
from modelalloy.engine.backends.local import LocalBackend  # noqa: E402
from modelalloy.cli import app  # noqa: E402
from modelalloy.errors import ConfigError, MergeError  # noqa: E402
from modelalloy.io.manifest import MANIFEST, Manifest  # noqa: E402

SHARD = "20KB"  # the tiny llama's tensors in several shards


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def forbid_local_backend(monkeypatch) -> None:
    """From here on, a run that quietly took the local path fails."""

    def refuse(*args, **kwargs):
        raise AssertionError("the local backend ran")

    monkeypatch.setattr(LocalBackend, "write_shards", refuse)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def dare_ties(llama) -> dict:
    # DARE draws random masks: equal bytes are only possible because every tensor has its own seed.
    return {
        "merge_method": "dare_ties",
        "base_model": str(llama["base"]),
        "models": [{"model": str(llama[m]), "parameters": {"density": 0.6, "weight": 0.5}} for m in ("ft_dense", "ft_sparse", "ft_flip")],
        "random_seed": 7,
    }


def ties(llama) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(llama["base"]),
        "models": [{"model": str(llama[m]), "parameters": {"density": 0.5, "weight": 0.7}} for m in ("ft_dense", "ft_flip")],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


@pytest.mark.parametrize("make_config", [dare_ties, ties])
def test_ray_output_is_bit_identical_to_local(tmp_path, llama, ray_instance, make_config, monkeypatch):
    cfg = write_config(tmp_path / "merge.yaml", make_config(llama))
    local = modelalloy.merge(cfg, tmp_path / "local", max_shard_size=SHARD, threads=2)
    assert len(local.files) >= 4  # several shards, hence several Ray tasks
    forbid_local_backend(monkeypatch)
    seen = []
    on_ray = modelalloy.merge(cfg, tmp_path / "ray", max_shard_size=SHARD, threads=1, backend="ray", progress=seen.append)
    assert on_ray.files == local.files and on_ray.input_hashes == local.input_hashes
    assert files_of(tmp_path / "ray") == files_of(tmp_path / "local")  # every shard, the index, config, card, manifest
    assert "model.safetensors.index.json" in files_of(tmp_path / "ray")
    # Progress arrives per finished shard (several tensors at once), as only the Ray backend reports it.
    assert [p.done for p in seen][-1] == local.tensors and len(seen) == len(local.files)
    assert not (tmp_path / "ray.partial").exists()


def test_cli_backend_ray_matches_local(tmp_path, llama, ray_instance, monkeypatch):
    cfg = write_config(tmp_path / "merge.yaml", dare_ties(llama))
    reference = modelalloy.merge(cfg, tmp_path / "local", max_shard_size=SHARD)
    forbid_local_backend(monkeypatch)
    result = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "--backend", "ray", "--max-shard-size", SHARD, "-j", "1", "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == reference.files
    assert files_of(tmp_path / "out") == files_of(tmp_path / "local")


def test_interrupted_ray_merge_resumes_from_its_finished_shards(tmp_path, llama, ray_instance):
    cfg = write_config(tmp_path / "merge.yaml", dare_ties(llama))
    modelalloy.merge(cfg, tmp_path / "local", max_shard_size=SHARD)

    def stop_after_first_shard(p) -> None:
        raise KeyboardInterrupt  # what Ctrl-C or `kill` (SIGTERM) raises in `alloy merge`

    out, partial = tmp_path / "out", tmp_path / "out.partial"
    with pytest.raises(KeyboardInterrupt):
        modelalloy.merge(cfg, out, max_shard_size=SHARD, threads=1, backend="ray", progress=stop_after_first_shard)
    assert not out.exists()
    finished = Manifest.load(partial).shards
    assert 1 <= len(finished) < len(files_of(tmp_path / "local")) - 3  # some shards, not all
    result = modelalloy.merge(cfg, out, max_shard_size=SHARD, threads=1, backend="ray")
    assert result.shards_reused >= len(finished)
    assert files_of(out) == files_of(tmp_path / "local")
    assert json.loads((out / MANIFEST).read_text())["shards"].keys() >= finished.keys()


def test_error_in_a_worker_is_one_line_and_leaves_nothing(tmp_path, llama, ray_instance):
    # 5e4 · (1 + 1) on the norm weights (≈ 1) is 1e5: finite in float32, Inf in float16.
    config = {
        "merge_method": "linear",
        "models": [{"model": str(llama[m]), "parameters": {"weight": 5e4}} for m in ("ft_dense", "ft_sparse")],
        "parameters": {"normalize": False},
        "out_dtype": "float16",
    }
    cfg = write_config(tmp_path / "m.yaml", config)
    with pytest.raises(MergeError, match=r"^model\.layers\.\d+\.\S+: the linear result overflows float16 \(Inf after the cast\); use a wider out_dtype or smaller weights$"):
        modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD, threads=1, backend="ray")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_bad_input_fails_at_plan_time_before_ray_starts(tmp_path, llama):
    # A real `alloy` process: the missing model is found while planning, so no Ray instance is
    # started (the command returns at once) and nothing is written.
    config = dare_ties(llama)
    config["models"][1]["model"] = str(tmp_path / "no-such-model")
    cfg = write_config(tmp_path / "merge.yaml", config)
    result = run_alloy("merge", cfg, tmp_path / "out", "--backend", "ray", cwd=tmp_path)
    assert_one_line_error(result, "no-such-model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_unknown_backend_is_one_line(tmp_path, llama):
    cfg = write_config(tmp_path / "merge.yaml", dare_ties(llama))
    result = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "--backend", "spark"])
    assert result.exit_code == 2
    assert result.output == "error: --backend spark: unknown backend; available: local, ray\n"
    assert not (tmp_path / "out").exists()


def test_one_file_gguf_output_is_refused_on_ray(tmp_path, llama):
    cfg = write_config(tmp_path / "merge.yaml", dare_ties(llama))
    with pytest.raises(ConfigError, match=r"^--backend ray writes safetensors shards; --out-format gguf \(one file\) needs --backend local$"):
        modelalloy.merge(cfg, tmp_path / "out", backend="ray", out_format="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]
