"""Helpers for running the real `alloy` command in a subprocess and for damaging tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

SRC = Path(__file__).resolve().parents[2] / "src"


def alloy_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(SRC), COLUMNS="200")
    env.update(extra)
    return env


def run_alloy(*args, cwd: Path | None = None, env: dict[str, str] | None = None, prelude: str = "", prefix: list[str] = ()) -> subprocess.CompletedProcess:
    """`python -m modelalloy.cli ARGS` in a fresh process; `prelude` is Python run before it (to
    fake the disk size), `prefix` a command that wraps it (to drop privileges)."""
    argv = [str(a) for a in args]
    if prelude:
        code = prelude + "\nimport sys\nfrom modelalloy.cli import main\nsys.argv = ['alloy', *sys.argv[1:]]\nmain()\n"
        cmd = [sys.executable, "-c", code, *argv]
    else:
        cmd = [sys.executable, "-m", "modelalloy.cli", *argv]
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=180, cwd=cwd, env=env or alloy_env())


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: to show that a failed command wrote nothing."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one `error:` line holding every fragment; returns it."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    # besides the error: warnings, and the progress bar when the error comes mid-merge (NaN produced)
    others = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("error:", "warning:", "merging "))]
    assert not others, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(model_dir: Path, change) -> None:
    """Load model.safetensors, let `change(state)` edit the dict, save it back (metadata kept)."""
    file = model_dir / "model.safetensors"
    state = load_file(file)
    change(state)
    save_file(state, file, metadata={"format": "pt"})


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# In-process runs of the real command (typer's runner): faster than a subprocess, same code path.


def invoke(*args):
    """`alloy ARGS` in this process; the result has exit_code, stdout, stderr."""
    from typer.testing import CliRunner

    from modelalloy.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(result, *fragments: str, code: int = 2) -> str:
    """An in-process result: exit `code`, no traceback, exactly one `error:` line holding every
    fragment; returns that line."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def warning_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def ties_config(llama, *models) -> dict:
    """TIES over the tiny llama family: ft_dense and ft_flip unless `models` are given."""
    return {
        "merge_method": "ties",
        "base_model": str(llama["base"]),
        "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}} for m in models or (llama["ft_dense"], llama["ft_flip"])],
    }
