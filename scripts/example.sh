#!/usr/bin/env bash
# The README's first command: set up, make a small base and two fine-tunes, plan and run a TIES
# merge, then load the result with transformers and generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1
[ -f .cache/example/writer/config.json ] || .venv/bin/python examples/make_models.py .cache/example
.venv/bin/alloy plan examples/ties.yaml
.venv/bin/alloy merge examples/ties.yaml .cache/example/merged --force
.venv/bin/python - <<'PY'
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(".cache/example/merged")
out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False)
print("merged model loads and generates:", out.tolist())
PY
