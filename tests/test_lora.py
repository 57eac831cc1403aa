"""LoRA apply / combine / extract, checked against PEFT itself and NumPy."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from typer.testing import CliRunner

from modelalloy.cli import app
from modelalloy.config import MergeConfig
from modelalloy.errors import CheckpointError, ConfigError
from modelalloy.io.adapter import open_adapter
from modelalloy.compose.lora import apply_adapter, combine_adapters, extract_adapter

IDS = torch.tensor([[1, 5, 9, 33, 70, 101, 127, 2, 64, 17]])


def logits(path_or_model, ids=IDS) -> torch.Tensor:
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(path_or_model)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def make_adapter(base, out, *, seed: int, **lora_kwargs):
    """A PEFT LoRA with random (non-zero) A and B, saved with save_pretrained; returns the PeftModel."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():  # make the updates large enough to move the logits visibly
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(3.0)
    pm.save_pretrained(out)
    pm.eval()
    return pm


def peft_deltas(pm) -> dict[str, torch.Tensor]:
    """module name -> PEFT's own get_delta_weight, in the base weight's layout."""
    out = {}
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.scaling:
            out[name] = module.get_delta_weight("default").detach().float()
    return out


LLAMA_ADAPTERS = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj", "gate_proj"]),
    "modules_to_save": dict(r=2, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["post_attention_layernorm"]),
}


@pytest.mark.parametrize("kind", sorted(LLAMA_ADAPTERS))
def test_apply_matches_peft_unmerged_forward(llama, tmp_path, kind):
    pm = make_adapter(llama["base"], tmp_path / "adapter", seed=1, **LLAMA_ADAPTERS[kind])
    if kind == "modules_to_save":
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.5)
        pm.save_pretrained(tmp_path / "adapter")
    expected = logits(pm)
    before = logits(llama["base"])
    apply_adapter(str(llama["base"]), str(tmp_path / "adapter"), tmp_path / "out", threads=1)
    got = logits(tmp_path / "out")
    assert (expected - before).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_apply_gpt2_fan_in_fan_out(families, tmp_path):
    gpt2 = families("gpt2")
    pm = make_adapter(gpt2["base"], tmp_path / "adapter", seed=2, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    apply_adapter(str(gpt2["base"]), str(tmp_path / "adapter"), tmp_path / "out", threads=1)
    torch.testing.assert_close(logits(tmp_path / "out"), logits(pm), atol=2e-5, rtol=1e-5)


def test_base_plus_adapter_in_a_merge_config_is_applied_on_the_fly(llama, tmp_path):
    from modelalloy.api import merge
    from safetensors.torch import load_file

    pm = make_adapter(llama["base"], tmp_path / "adapter", seed=3, r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    deltas = peft_deltas(pm)
    ref = f"{llama['base']}+{tmp_path / 'adapter'}"
    cfg = MergeConfig(merge_method="linear", models=[{"model": ref, "parameters": {"weight": 0.25}}, {"model": str(llama["ft_dense"]), "parameters": {"weight": 0.75}}])
    merge(cfg, tmp_path / "out", threads=2)
    out = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(llama["base"] / "model.safetensors")
    ft = load_file(llama["ft_dense"] / "model.safetensors")
    for name in ("model.layers.2.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        module = name.removesuffix(".weight")
        adapted = base[name].double() + (deltas[module].double() if module in deltas else 0)
        expected = 0.25 * adapted + 0.75 * ft[name].double()
        np.testing.assert_allclose(out[name].double().numpy(), expected.numpy(), atol=1e-6)
    assert not any(p.name.endswith("+") or "lora" in p.name for p in tmp_path.iterdir() if p.name not in ("adapter",))


def _numpy_delta(adapter_dir, module) -> np.ndarray:
    """ΔW = s·B·A from the saved files and config, by hand (PEFT's formula, rank/alpha patterns)."""
    from safetensors.numpy import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(adapter_dir / "adapter_model.safetensors")
    a = t[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
    b = t[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    import re

    for k, v in cfg.get("rank_pattern", {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            r = v
            break
    for k, v in cfg.get("alpha_pattern", {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            alpha = v
            break
    return (alpha / r) * (b @ a)


@pytest.fixture(scope="module")
def two_adapters(families, tmp_path_factory):
    """Two adapters of one base with different ranks, scalings and (partly) different modules."""
    base, root = families("llama")["base"], tmp_path_factory.mktemp("adapters")
    a1 = make_adapter(base, root / "a1", seed=4, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    a2 = make_adapter(base, root / "a2", seed=5, r=2, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "v_proj"])
    return (root / "a1", peft_deltas(a1)), (root / "a2", peft_deltas(a2))


def _combined_deltas(llama, adapter_dir) -> dict[str, torch.Tensor]:
    """Load the combined adapter with PEFT and ask PEFT for its ΔW (independent of our reader)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(llama["base"])
    return peft_deltas(peft.PeftModel.from_pretrained(model, adapter_dir))


def test_combine_cat_is_exact_with_negative_weights(llama, two_adapters, tmp_path):
    (p1, d1), (p2, d2) = two_adapters
    w = [0.7, -1.3]
    result = combine_adapters([str(p1), str(p2)], tmp_path / "cat", method="cat", weights=w)
    got = _combined_deltas(llama, tmp_path / "cat")
    assert set(got) == set(d1) | set(d2)
    for module, delta in got.items():
        expected = w[0] * d1.get(module, 0) + w[1] * d2.get(module, 0)
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    ranks = {r.module: r.rank for r in result.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 6 and ranks["model.layers.0.self_attn.v_proj"] == 2


def test_combine_svd_is_the_best_rank_r_approximation(llama, two_adapters, tmp_path):
    (p1, d1), (p2, d2) = two_adapters
    w = [1.0, 0.5]
    result = combine_adapters([str(p1), str(p2)], tmp_path / "svd", method="svd", weights=w, rank=3)
    got = _combined_deltas(llama, tmp_path / "svd")
    reports = {r.module: r for r in result.modules}
    module = "model.layers.1.self_attn.q_proj"
    target = (w[0] * d1[module] + w[1] * d2[module]).double().numpy()  # rank 6
    u, s, vh = np.linalg.svd(target)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    np.testing.assert_allclose(got[module].double().numpy(), best, atol=1e-5)
    err = np.linalg.norm(target - got[module].double().numpy())
    np.testing.assert_allclose(err, np.sqrt((s[3:] ** 2).sum()), rtol=1e-4)
    np.testing.assert_allclose(reports[module].relative_error, err / np.linalg.norm(target), rtol=1e-4)
    # down_proj exists only in the first adapter at rank 4 > 3: truncated too
    assert reports["model.layers.0.mlp.down_proj"].rank == 3 and reports["model.layers.0.mlp.down_proj"].energy_kept < 1


def test_combine_linear_negative_weight_scales_the_product(llama, two_adapters, tmp_path):
    (p1, d1), _ = two_adapters
    combine_adapters([str(p1)], tmp_path / "lin", method="linear", weights=[-0.5])
    got = _combined_deltas(llama, tmp_path / "lin")
    for module, delta in got.items():
        torch.testing.assert_close(delta, -0.5 * d1[module], atol=1e-6, rtol=1e-5)


def test_combine_ties_at_full_rank_matches_numpy(llama, two_adapters, tmp_path):
    (p1, d1), (p2, d2) = two_adapters
    w = [1.0, 0.6]
    combine_adapters([str(p1), str(p2)], tmp_path / "ties", method="ties", weights=w, rank=6)
    got = _combined_deltas(llama, tmp_path / "ties")
    module = "model.layers.3.self_attn.q_proj"
    deltas = [d1[module].double().numpy(), d2[module].double().numpy()]
    weighted = [wi * d for wi, d in zip(w, deltas)]
    sign = np.where(sum(weighted) >= 0, 1.0, -1.0)
    masks = [(np.sign(x) == sign) for x in weighted]
    expected = sum(m * x for m, x in zip(masks, weighted)) / np.maximum(sum(m * wi for m, wi in zip(masks, w)), 1e-300)
    expected = np.where(sum(m * wi for m, wi in zip(masks, w)) == 0, 0, expected)
    # TIES at density 1 can raise the rank (elementwise masks), so compare with its rank-6 truncation
    u, s, vh = np.linalg.svd(expected)
    np.testing.assert_allclose(got[module].double().numpy(), (u[:, :6] * s[:6]) @ vh[:6], atol=1e-5)


def test_combine_refuses_bad_input(two_adapters, tmp_path):
    (p1, _), (p2, _) = two_adapters
    with pytest.raises(ConfigError, match="2 weights for 1 adapters"):
        combine_adapters([str(p1)], tmp_path / "x", weights=[1, 2])
    with pytest.raises(ConfigError, match="did you mean 'svd'"):
        combine_adapters([str(p1), str(p2)], tmp_path / "x", method="svdd")
    with pytest.raises(ConfigError, match="equal ranks"):
        combine_adapters([str(p1), str(p2)], tmp_path / "x", method="linear")


def test_extract_full_rank_reproduces_the_finetune(llama, tmp_path):
    result = extract_adapter(str(llama["base"]), str(llama["ft_dense"]), tmp_path / "ex", rank=64)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama["base"])
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "ex")
    torch.testing.assert_close(logits(pm), logits(llama["ft_dense"]), atol=5e-5, rtol=1e-5)
    assert all(r.energy_kept == pytest.approx(1.0) for r in result.modules)
    assert "model.norm" in result.saved_modules and "model.embed_tokens" in result.saved_modules


def test_extract_energy_picks_the_smallest_rank_and_reports_it(llama, tmp_path):
    from safetensors.numpy import load_file

    res = CliRunner().invoke(app, ["lora", "extract", str(llama["base"]), str(llama["ft_dense"]), str(tmp_path / "ex"), "--energy", "0.9", "--no-save-modules", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)

    base, ft = load_file(llama["base"] / "model.safetensors"), load_file(llama["ft_dense"] / "model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(llama["base"])
    got = peft_deltas(peft.PeftModel.from_pretrained(model, tmp_path / "ex"))
    assert len(report["modules"]) == 4 * 7 and report["notes"]  # norms etc. differ and are named as not saved
    for module in report["modules"]:
        delta = ft[module["module"] + ".weight"].astype(np.float64) - base[module["module"] + ".weight"]
        s = np.linalg.svd(delta, compute_uv=False)
        energy = np.cumsum(s**2) / (s**2).sum()
        assert module["rank"] == int(np.argmax(energy >= 0.9)) + 1
        assert module["energy_kept"] == pytest.approx(energy[module["rank"] - 1], rel=1e-5)
        actual = np.linalg.norm(delta - got[module["module"]].double().numpy()) / np.linalg.norm(delta)
        assert module["relative_error"] == pytest.approx(actual, rel=1e-4)


def test_extract_gpt2_conv1d(families, tmp_path):
    gpt2 = families("gpt2")
    # A fine-tune of the Conv1D weights only (a LoRA cannot carry the biases of its own modules).
    ft = transformers.AutoModelForCausalLM.from_pretrained(gpt2["base"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.ndim == 2 and ".h." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ft.save_pretrained(tmp_path / "ft")
    result = extract_adapter(str(gpt2["base"]), str(tmp_path / "ft"), tmp_path / "ex", rank=128)
    assert len(result.modules) == 16 and not result.saved_modules
    cfg = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2["base"])
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "ex")
    torch.testing.assert_close(logits(pm), logits(tmp_path / "ft"), atol=5e-5, rtol=1e-5)


def test_bad_adapters_are_one_line_errors(llama, families, tmp_path):
    make_adapter(families("qwen2")["base"], tmp_path / "q", seed=6, r=2, lora_alpha=2, target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    # DoRA is refused with its name
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((tmp_path / "q" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="DoRA"):
        open_adapter(str(dora))
    runner = CliRunner()
    res = runner.invoke(app, ["lora", "apply", str(llama["base"]), str(dora), str(tmp_path / "out")])
    assert res.exit_code == 2 and "DoRA" in res.output and "Traceback" not in res.output
    # an adapter trained for another width: the module and both shapes are named
    make_adapter(families("gpt2")["base"], tmp_path / "g", seed=7, r=2, lora_alpha=2, target_modules=["c_fc"], fan_in_fan_out=True)
    res = runner.invoke(app, ["lora", "apply", str(llama["base"]), str(tmp_path / "g"), str(tmp_path / "out")])
    assert res.exit_code == 2 and "c_fc" in res.output
