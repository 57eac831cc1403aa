"""Never half-written: kill -9 a real `alloy merge` at several points, rerun, get the same bytes.

The merge is made slow enough to interrupt deterministically by many small shards
(--max-shard-size) and the test-only MODELALLOY_DEBUG_SECONDS_PER_TENSOR hook; the kill points are
chosen by watching the manifest of finished shards in OUT.partial/.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alloy_helpers import alloy_env, run_alloy, write_config

import modelalloy
from modelalloy.errors import OutputError
from modelalloy.io.manifest import MANIFEST, Manifest, digest_shard

SHARD = "10KB"  # the tiny llama's 39 tensors in ~20 shards


def dare_config(llama) -> dict:
    # DARE draws random masks: the resumed output can only match if every tensor has its own seed.
    return {
        "merge_method": "dare_ties",
        "base_model": str(llama["base"]),
        "models": [{"model": str(llama[m]), "parameters": {"density": 0.6, "weight": 0.5}} for m in ("ft_dense", "ft_sparse", "ft_flip")],
        "random_seed": 7,
    }


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def finished_shards(partial: Path) -> dict[str, dict]:
    manifest = Manifest.load(partial) if partial.is_dir() else None
    return manifest.shards if manifest else {}


def start_merge(cfg: Path, out: Path, *extra: str, delay: str = "0.06") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "modelalloy.cli", "merge", str(cfg), str(out), "--max-shard-size", SHARD, "--json", "-q", *extra]
    env = alloy_env(MODELALLOY_DEBUG_SECONDS_PER_TENSOR=delay)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_when(proc: subprocess.Popen, partial: Path, shards_at_least: int, timeout: float = 120) -> dict[str, dict]:
    """SIGKILL `proc` once the manifest lists `shards_at_least` finished shards; returns the manifest's shards."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the merge ended before it could be killed: {proc.communicate()}"
        if partial.is_dir() and any(p.suffix == ".safetensors" for p in partial.iterdir()) and len(finished_shards(partial)) >= shards_at_least:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return finished_shards(partial)
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("timed out waiting for the merge to reach the kill point")


def test_kill_9_at_several_points_then_resume_bit_identical(tmp_path, llama):
    cfg = write_config(tmp_path / "merge.yaml", dare_config(llama))
    reference = run_alloy("merge", cfg, tmp_path / "reference", "--max-shard-size", SHARD, "-q", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    total = len(json.loads((tmp_path / "reference" / MANIFEST).read_text())["shards"])
    assert total >= 15

    out, partial = tmp_path / "out", tmp_path / "out.partial"
    kept: dict[str, int] = {}  # finished shard -> mtime when it was first seen finished
    for threads, kill_at in (("1", 0), ("2", 3), ("1", 8), ("2", 12)):
        proc = start_merge(cfg, out, "-j", threads)
        shards = kill_when(proc, partial, kill_at)
        assert not out.exists(), "a killed merge must not leave OUT behind"
        assert len(shards) >= kill_at
        for file, record in shards.items():  # what the manifest records is exactly what is on disk
            assert digest_shard(partial / file) == record["blake3"]
        for file, mtime in kept.items():  # shards finished by an earlier run were skipped, not rewritten
            assert file in shards and (partial / file).stat().st_mtime_ns == mtime
        kept.update({f: (partial / f).stat().st_mtime_ns for f in shards if f not in kept})

    final = run_alloy("merge", cfg, out, "--max-shard-size", SHARD, "--json", "-q", cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["shards_reused"] == len(kept) >= 12
    assert not partial.exists()
    assert files_of(out) == files_of(tmp_path / "reference")


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, llama):
    cfg = write_config(tmp_path / "merge.yaml", dare_config(llama))
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    # 0.2 s per tensor: on a loaded machine the merge must still be running when the signal comes
    # (with 0.1 s it once finished first under a full CI load).
    proc = start_merge(cfg, out, "-j", "2", delay="0.2")
    deadline = time.monotonic() + 120
    while len(finished_shards(partial)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the merge ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr and "out.partial" in stderr and "run the same command again to resume" in stderr
    assert not out.exists() and Manifest.load(partial) is not None


# In-process checks of the resume rules (an exception from the progress callback stands in for a crash).


class Stop(Exception):
    pass


def interrupt_after(n: int):
    def progress(p) -> None:
        if p.done >= n:
            raise Stop

    return progress


@pytest.fixture()
def reference(tmp_path, llama):
    cfg = write_config(tmp_path / "merge.yaml", dare_config(llama))
    modelalloy.merge(cfg, tmp_path / "reference", max_shard_size=SHARD, threads=2)
    return cfg, files_of(tmp_path / "reference")


@pytest.mark.parametrize("threads", [1, 2])
def test_resume_after_a_crash_is_bit_identical(tmp_path, reference, threads):
    cfg, expected = reference
    with pytest.raises(Stop):
        modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD, threads=threads, progress=interrupt_after(20))
    finished = finished_shards(tmp_path / "out.partial")
    assert finished
    result = modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD, threads=threads)
    assert result.shards_reused == len(finished)
    assert files_of(tmp_path / "out") == expected


def test_a_damaged_finished_shard_is_recomputed(tmp_path, reference):
    cfg, expected = reference
    with pytest.raises(Stop):
        modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD, threads=1, progress=interrupt_after(20))
    partial = tmp_path / "out.partial"
    finished = sorted(finished_shards(partial))
    damaged = partial / finished[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    damaged.write_bytes(bytes(data))
    result = modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD, threads=1)
    assert result.shards_reused == len(finished) - 1
    assert files_of(tmp_path / "out") == expected


def test_a_partial_output_of_another_plan_is_not_reused(tmp_path, reference, llama):
    cfg, expected = reference
    other = dare_config(llama) | {"random_seed": 8}
    with pytest.raises(Stop):
        modelalloy.merge(write_config(tmp_path / "other.yaml", other), tmp_path / "out", max_shard_size=SHARD, progress=interrupt_after(20))
    assert finished_shards(tmp_path / "out.partial")
    result = modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD)
    assert result.shards_reused == 0
    assert files_of(tmp_path / "out") == expected


def test_no_resume_starts_over(tmp_path, reference):
    cfg, expected = reference
    with pytest.raises(Stop):
        modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD, progress=interrupt_after(20))
    result = modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD, resume=False)
    assert result.shards_reused == 0
    assert files_of(tmp_path / "out") == expected


def test_free_disk_check_counts_the_partial_output(tmp_path, reference, monkeypatch):
    import shutil

    cfg, expected = reference
    with pytest.raises(Stop):
        modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD, progress=interrupt_after(3))
    allocated = sum(p.stat().st_blocks * 512 for p in (tmp_path / "out.partial").iterdir())
    plan_bytes = modelalloy.plan_merge(cfg)[0].output_bytes
    assert allocated > 0  # shards are laid out (and allocated, where the file system can) up front
    usage = shutil._ntuple_diskusage
    # Free space that is enough only once the partial output's blocks are counted: the rerun is
    # accepted, while a fresh output directory with the same free space is refused.
    free = max(0, plan_bytes - allocated)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12, free))
    with pytest.raises(OutputError, match=r"other: the merge writes 0\.00 GB but only 0\.00 GB is free"):
        modelalloy.merge(cfg, tmp_path / "other", max_shard_size=SHARD)
    modelalloy.merge(cfg, tmp_path / "out", max_shard_size=SHARD)
    assert files_of(tmp_path / "out") == expected
