"""Stacking (compiled to passthrough slices) and grafting, checked tensor by tensor and on logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from modelalloy.cli import app
from modelalloy.errors import ConfigError, PlanError
from modelalloy.compose.stack import compile_stack, graft, parse_stack_config, stack, stack_layers

IDS = torch.tensor([[1, 5, 9, 33, 70, 101, 127, 2, 64]])


def logits(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def test_shortcuts_compile_to_the_worked_slices():
    solar = parse_stack_config({"model": "m", "depth_upscale": {"overlap": 8}, "repeated_scale": 0.5})
    assert stack_layers(solar, 32) == list(range(0, 24)) + list(range(8, 32))
    compiled = compile_stack(solar, 32).model_dump(exclude_defaults=True)
    scale = [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}, {"filter": "c_proj", "value": 0.5}]
    # the first copy of layers 8..23 is left alone; only the second is scaled
    assert [s["sources"][0]["layer_range"] for s in compiled["slices"]] == [(0, 24), (8, 24), (24, 32)]
    assert [s["sources"][0].get("parameters", {}).get("scale") for s in compiled["slices"]] == [None, scale, None]
    assert compiled["merge_method"] == "passthrough"
    assert stack_layers(parse_stack_config({"model": "m", "interleave": {"copies": 2}}), 3) == [0, 0, 1, 1, 2, 2]
    assert stack_layers(parse_stack_config({"stack": {"model": "m", "progressive": {"copies": 3}}}), 2) == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_stack_config({"model": "m", "progressive": {"copies": 2}, "interleave": {"copies": 2}})
    with pytest.raises(ConfigError, match="overlap 4: must be between 1 and 3"):
        stack_layers(parse_stack_config({"model": "m", "depth_upscale": {"overlap": 4}}), 4)
    with pytest.raises(ConfigError, match="did you mean 'repeated_scale'"):
        parse_stack_config({"model": "m", "progressive": {"copies": 2}, "repeat_scale": 0})


def test_depth_upscale_writes_the_mapped_layers(llama, tmp_path):
    result = stack(parse_stack_config({"model": str(llama["ft_dense"]), "depth_upscale": {"overlap": 1}, "repeated_scale": 0.5}), tmp_path / "out", threads=1)
    out = load_file(tmp_path / "out" / "model.safetensors")
    src = load_file(llama["ft_dense"] / "model.safetensors")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    for out_layer, (src_layer, repeated) in enumerate([(0, False), (1, False), (2, False), (1, True), (2, True), (3, False)]):
        for part, scaled in (("self_attn.q_proj", False), ("self_attn.o_proj", True), ("mlp.down_proj", True), ("mlp.up_proj", False), ("input_layernorm", False)):
            factor = 0.5 if (scaled and repeated) else 1.0
            torch.testing.assert_close(out[f"model.layers.{out_layer}.{part}.weight"], src[f"model.layers.{src_layer}.{part}.weight"] * factor, rtol=0, atol=0)
    assert result.tensors == len(out)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_scaled_repeats_compute_the_original_model(families, tmp_path, family):
    fam = families(family)
    stack(parse_stack_config({"model": str(fam["ft_dense"]), "progressive": {"copies": 2}, "repeated_scale": 0.0}), tmp_path / "out", threads=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 8
    torch.testing.assert_close(logits(tmp_path / "out"), logits(fam["ft_dense"]), atol=1e-5, rtol=1e-5)


def test_graft_takes_selected_modules_from_the_donor(llama, tmp_path):
    graft(str(llama["base"]), str(llama["ft_dense"]), tmp_path / "out", modules=["mlp"], layers=(1, 3), threads=1)
    out = load_file(tmp_path / "out" / "model.safetensors")
    base, donor = load_file(llama["base"] / "model.safetensors"), load_file(llama["ft_dense"] / "model.safetensors")
    grafted = [n for n in out if ".mlp." in n and n.split(".")[2] in ("1", "2")]
    assert len(grafted) == 6
    for name, t in out.items():
        expected = donor[name] if name in grafted else base[name]
        assert torch.equal(t, expected), name


def test_graft_refuses_mismatched_shapes_and_empty_selections(llama, tmp_path):
    wide = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=4, vocab_size=128, num_key_value_heads=2)
    transformers.LlamaForCausalLM(wide).save_pretrained(tmp_path / "wide")
    with pytest.raises(PlanError, match=r"'model.layers.0.mlp.down_proj.weight': shape \[32, 48\] in the donor .* but \[32, 64\] in the recipient"):
        graft(str(llama["base"]), str(tmp_path / "wide"), tmp_path / "out", modules=["mlp"])
    with pytest.raises(PlanError, match="no tensor .* matches --module crossattn"):
        graft(str(llama["base"]), str(llama["ft_dense"]), tmp_path / "out", modules=["crossattn"])
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["graft", str(llama["base"]), str(tmp_path / "wide"), str(tmp_path / "out"), "-m", "mlp", "--layers", "0-2"])
    assert res.exit_code == 2 and "down_proj" in res.output and "Traceback" not in res.output


def test_cli_stack_show_and_run(llama, tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"stack": {"model": str(llama["base"]), "layer_ranges": [[0, 3], [2, 4]]}}))
    runner = CliRunner()
    res = runner.invoke(app, ["stack", str(tmp_path / "s.yaml"), "--show"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.stdout)
    assert [s["sources"][0]["layer_range"] for s in shown["slices"]] == [[0, 3], [2, 4]]
    res = runner.invoke(app, ["stack", str(tmp_path / "s.yaml"), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == 5
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": str(llama["base"]), "layer_ranges": [[0, 9]]}))
    res = runner.invoke(app, ["stack", str(tmp_path / "bad.yaml"), str(tmp_path / "out2")])
    assert res.exit_code == 2 and "layer_ranges[0]" in res.output
