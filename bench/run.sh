#!/usr/bin/env bash
# The benchmark, one command: set up (the project's venv with the `bench` extra; mergekit in a
# venv of its own under .cache/bench), generate the synthetic models once, run, print the table.
# Arguments go to bench/run.py (e.g. --size tiny while developing; --help for all).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pip install -q -e ".[bench]"
exec .venv/bin/python bench/run.py "$@"
