"""Issue #21, part one: hostile inputs. No hang, no traceback: a FIFO where a shard should be, a
10 MB config, a 40,000-value gradient, two merges into one output, a full disk, an output
directory that cannot be written. Each through the real `alloy` command (in-process with typer's
runner, or a subprocess where a second process or a real file system is the point)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from alloy_helpers import alloy_env, copy_model, invoke, one_error, snapshot, ties_config, write_config

write = write_config
ties = ties_config
alloy = invoke


# --- a shard that is a named pipe: refused before it is opened, by merge, plan and verify


def _bounded(fifo: Path, call, limit: float = 5.0):
    """`call()` (in this thread: `alloy merge` sets signal handlers), watched: if it is still
    running after `limit` seconds it is stuck in the FIFO's open, so a writer opens the other end
    to let it go on, and the test fails. Returns (result, seconds)."""
    fired = []

    def unblock() -> None:
        fired.append(True)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader then sees EOF
        except OSError:
            pass

    watchdog = threading.Timer(limit, unblock)
    watchdog.start()
    start = time.perf_counter()
    try:
        result = call()
    finally:
        watchdog.cancel()
    seconds = time.perf_counter() - start
    assert not fired, f"blocked on the FIFO {fifo} for more than {limit} s"
    return result, seconds


@pytest.mark.parametrize("where", ["shard", "indexed-shard", "config.json"])
def test_fifo_in_a_model_is_refused_at_once(tmp_path, llama, where):
    model = copy_model(llama["ft_dense"], tmp_path / "piped")
    if where == "shard":
        fifo = model / "model.safetensors"
    elif where == "indexed-shard":
        (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
        fifo = model / "model-00002-of-00002.safetensors"
        names = load_file(llama["ft_dense"] / "model.safetensors")
        weight_map = {n: "model-00001-of-00002.safetensors" for n in names} | {"extra.weight": fifo.name}
        (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        fifo = model / "config.json"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    cfg = write(tmp_path / "merge.yaml", ties(llama, model, llama["ft_flip"]))
    before = snapshot(tmp_path)
    for command in (["plan", cfg], ["merge", cfg, tmp_path / "out"]):
        result, seconds = _bounded(fifo, lambda: alloy(*command))
        one_error(result, str(fifo), "named pipe (FIFO)", "not a regular file")
        assert seconds < 5, seconds
    assert snapshot(tmp_path) == before
    result, seconds = _bounded(fifo, lambda: alloy("verify", model))
    assert result.exit_code == 1 and seconds < 5, result.output
    assert f"{fifo}: is a named pipe (FIFO), not a regular file" in " ".join(result.stderr.split())


# --- huge configs and gradients: refused unread above 256 KiB, planned in bounded time below


def test_a_10_mb_gradient_or_comment_is_refused_unread(tmp_path, llama):
    values = ", ".join(["0.5"] * 2_000_000)
    huge = tmp_path / "huge.yaml"
    huge.write_text(f"merge_method: linear\nmodels:\n  - model: {llama['base']}\n    parameters: {{weight: [{values}]}}\n  - model: {llama['ft_dense']}\n    parameters: {{weight: 0.5}}\n")
    comment = tmp_path / "comment.yaml"
    comment.write_text("# " + "x" * 10_000_000 + f"\nmerge_method: linear\nmodels: [{llama['base']}]\n")
    for cfg in (huge, comment):
        start = time.perf_counter()
        result = alloy("plan", cfg)
        seconds = time.perf_counter() - start
        one_error(result, cfg.name, "10.0 MB of config", "more than 256 KiB is refused unread")
        assert seconds < 1.0, seconds  # stat, not parse: measured ~5 ms


def test_a_long_gradient_under_the_limit_is_checked_once_not_per_tensor(tmp_path, llama, monkeypatch):
    import modelalloy.plan.planner as planner

    calls = []
    real = planner.check_setting
    monkeypatch.setattr(planner, "check_setting", lambda value, where: calls.append(where) or real(value, where))
    values = ", ".join(f"{0.2 + 0.6 * i / 34_999:.3f}" for i in range(35_000))
    cfg = tmp_path / "long.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {llama['base']}\n    parameters: {{weight: [{values}]}}\n  - model: {llama['ft_dense']}\n    parameters: {{weight: 0.5}}\n")
    assert cfg.stat().st_size < 256 * 1024
    start = time.perf_counter()
    result = alloy("plan", cfg, "--json")
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tensors"] == 39
    # Structurally bounded: each written setting is checked once per plan (2 here), not once per
    # tensor and model (39 × 2), so the gradient's length is paid once.
    assert len(calls) == 2, calls
    assert seconds < 5, seconds  # measured ~0.3 s on a loaded 2-core machine


# --- two merges into one output: the second is refused, naming the first


def test_a_second_merge_into_the_same_output_is_refused(tmp_path, llama):
    cfg = write(tmp_path / "merge.yaml", ties(llama))
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "modelalloy.cli", "merge", str(cfg), str(out), "-q", "-j", "1", "--max-shard-size", "20KB"],
        env=alloy_env(MODELALLOY_DEBUG_SECONDS_PER_TENSOR="0.25"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = out.with_name("out.partial") / "modelalloy.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = alloy("merge", cfg, out)
        one_error(second, "out.partial", f"another merge (pid {first.pid}) is writing this output now", "choose another output directory")
        planned = alloy("plan", cfg, out)
        one_error(planned, f"pid {first.pid}")
    finally:
        stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr
    assert not (out / "modelalloy.lock").exists()
    verified = alloy("verify", out, "--config", cfg)
    assert verified.exit_code == 0, verified.output


# --- the disk fills while the output is written


def test_disk_full_mid_write_is_one_line_and_the_rerun_resumes(tmp_path, llama, monkeypatch):
    # ENOSPC injected at the write call (the kernel's answer on a full disk); a real full tmpfs is the next test.
    cfg = write(tmp_path / "merge.yaml", ties(llama))
    out = tmp_path / "out"
    real_pwrite, count = os.pwrite, [0]

    def pwrite(fd, data, offset):
        count[0] += 1
        if count[0] > 25:  # a few shards in: some are finished, one is cut short
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    result = alloy("merge", cfg, out, "-j", "1", "--max-shard-size", "20KB", "-q")
    line = one_error(result, "out.partial/model-0000", ".safetensors: the disk is full", "still to write", "free some space and run the same command again to resume")
    assert not out.exists()
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    rerun = alloy("merge", cfg, out, "-j", "1", "--max-shard-size", "20KB")
    assert rerun.exit_code == 0, rerun.output
    assert "resumed:" in rerun.stderr, (line, rerun.stderr)
    assert alloy("verify", out).exit_code == 0


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_disk_full_on_a_real_small_file_system(tmp_path, llama):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "96k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        cfg = write(tmp_path / "merge.yaml", ties(llama))
        # The free-space check before writing would refuse this output outright; let it pass once, so
        # the disk really fills during the write.
        prelude = (
            "import shutil\nreal, calls = shutil.disk_usage, []\n"
            "def fake(path):\n    calls.append(path)\n    return shutil._ntuple_diskusage(10**12, 0, 10**12) if len(calls) == 1 else real(path)\n"
            "shutil.disk_usage = fake\n"
        )
        code = prelude + "import sys\nfrom modelalloy.cli import main\nsys.argv = ['alloy', *sys.argv[1:]]\nmain()\n"
        argv = [sys.executable, "-c", code, "merge", str(cfg), str(disk / "out"), "--max-shard-size", "40KB"]
        result = subprocess.run(argv, capture_output=True, text=True, env=alloy_env(), timeout=180)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "the disk is full" in errors[0] and "more is needed" in errors[0], result.stderr
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
        argv = [sys.executable, "-m", "modelalloy.cli", "merge", str(cfg), str(disk / "out"), "--max-shard-size", "40KB"]
        rerun = subprocess.run(argv, capture_output=True, text=True, env=alloy_env(), timeout=180)
        assert rerun.returncode == 0, rerun.stderr
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- an output directory that cannot be written: found by `alloy plan CONFIG OUT`


def test_an_output_in_a_directory_that_cannot_be_written(tmp_path, llama):
    cfg = write(tmp_path / "merge.yaml", ties(llama))
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: make it immutable instead
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
            pytest.skip("running as root without chattr +i")
        undo = ["chattr", "-i", str(locked)]
    else:
        locked.chmod(0o555)
        undo = ["chmod", "755", str(locked)]
    try:
        before = snapshot(tmp_path)
        for command in (["plan", cfg, locked / "out"], ["merge", cfg, locked / "sub" / "out"]):
            one_error(alloy(*command), "cannot create it in", "locked", "choose a directory you can write to")
        assert snapshot(tmp_path) == before
    finally:
        subprocess.run(undo, check=True)


def test_an_output_on_a_read_only_file_system(tmp_path, llama):
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        cfg = write(tmp_path / "merge.yaml", ties(llama))
        for command in (["plan", cfg, disk / "out"], ["merge", cfg, disk / "out"]):
            one_error(alloy(*command), "a read-only file system", "choose a directory you can write to")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
