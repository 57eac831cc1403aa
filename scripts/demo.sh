#!/usr/bin/env bash
# The README's first command: set up (Python packages and, where apt-get is available, the Debian
# packages), then `alloy demo`: SmolLM2-135M fine-tuned into specialists on CPU, merged with six
# methods, and the merge-rate table. First run about 12 minutes on two cores; later runs reuse .cache/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/alloy demo "$@"
