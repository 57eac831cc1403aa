"""Mixtures of experts from dense models: loads in transformers, routes, equals the dense model."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from modelalloy.cli import app
from modelalloy.errors import ConfigError, PlanError
from modelalloy.compose.moe import build_moe
from modelalloy.compose.moe_config import parse_moe_config

IDS = torch.tensor([[1, 5, 9, 33, 70, 101, 127, 2]])

# Three kinds of text with disjoint characters; the last entries of each are held out.
KINDS = {
    "digits": ["12 + 34 = 46", "7 * 8 = 56", "100 - 1 = 99", "3.14159 2.71828", "45 / 9 = 5", "6 + 6 = 12", "81 - 80 = 1"],
    "lower": ["the cat sat on the mat", "hello world again", "quiet river stone", "a small bird sings", "green fields and trees"],
    "upper": ["THE CAT SAT ON THE MAT", "HELLO WORLD AGAIN", "QUIET RIVER STONE", "A SMALL BIRD SINGS", "GREEN FIELDS AND TREES"],
}
TRAIN = {"digits": 4, "lower": 3, "upper": 3}


def add_char_tokenizer(model_dir) -> None:
    """A character-level tokenizer (ids < 128) so prompts can run through the tiny models."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(model_dir)


@pytest.fixture(scope="module")
def llama_tok(families, tmp_path_factory):
    fam = dict(families("llama"))
    base = tmp_path_factory.mktemp("tok") / "llama-base"
    shutil.copytree(fam["base"], base)
    add_char_tokenizer(base)
    fam["base"] = base
    return fam


def logits(path, ids=IDS, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    with torch.no_grad():
        return model(ids, **kw), model


def routing_agreement(moe_dir, tokenizer_dir) -> float:
    """Fraction of (token, layer) pairs of held-out prompts whose top-1 expert is their kind's expert."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_dir)
    model.eval()
    right = total = 0
    for expert, kind in enumerate(KINDS):
        for prompt in KINDS[kind][TRAIN[kind] :]:
            with torch.no_grad():
                out = model(tok(prompt, return_tensors="pt")["input_ids"], output_router_logits=True)
            for layer_logits in out.router_logits:  # [tokens, experts] per layer
                top = layer_logits.argmax(-1)
                right += int((top == expert).sum())
                total += top.numel()
    return right / total


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_router_routes_held_out_prompts_to_their_expert(llama_tok, tmp_path, gate_mode):
    cfg = parse_moe_config(
        {
            "base_model": str(llama_tok["base"]),
            "gate_mode": gate_mode,
            "experts_per_token": 2,
            "experts": [
                {"source_model": str(llama_tok[m]), "positive_prompts": KINDS[k][: TRAIN[k]]}
                for m, k in zip(["ft_dense", "ft_sparse", "ft_flip"], KINDS)
            ],
        }
    )
    with pytest.warns(UserWarning, match="not a power of two"):
        result = build_moe(cfg, tmp_path / "moe")
    assert result.architecture == "mixtral" and result.layout == "fused"
    agreement = routing_agreement(tmp_path / "moe", llama_tok["base"])
    print(f"routing agreement ({gate_mode}): {agreement:.3f} (chance 0.333)")
    assert agreement > 0.5
    # each expert's MLP sits at its index, as [gate; up] and down
    moe = load_file(tmp_path / "moe" / "model.safetensors")
    for e, m in enumerate(["ft_dense", "ft_sparse", "ft_flip"]):
        dense = load_file(llama_tok[m] / "model.safetensors")
        for layer in (0, 3):
            p = f"model.layers.{layer}.mlp."
            torch.testing.assert_close(moe[p + "experts.gate_up_proj"][e], torch.cat([dense[p + "gate_proj.weight"], dense[p + "up_proj.weight"]]), rtol=0, atol=0)
            torch.testing.assert_close(moe[p + "experts.down_proj"][e], dense[p + "down_proj.weight"], rtol=0, atol=0)
    # the router rows are unit vectors
    torch.testing.assert_close(moe["model.layers.2.mlp.gate.weight"].norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize(
    "family,architecture,layout",
    [("llama", "mixtral", "fused"), ("mistral", "mixtral", "per_expert"), ("llama", "qwen2_moe", "fused"), ("qwen2", "qwen2_moe", "per_expert")],
)
def test_moe_of_identical_experts_top1_equals_the_dense_model(families, tmp_path, family, architecture, layout):
    fam = families(family)
    spec = {
        "base_model": str(fam["base"]),
        "gate_mode": "random",
        "experts_per_token": 1,
        "architecture": architecture,
        "experts": [{"source_model": str(fam["base"])}] * 2,
    }
    if architecture == "qwen2_moe":
        spec["shared_experts"] = [{"source_model": str(fam["base"])}]
    with pytest.raises(ConfigError, match="every expert is the same model"):
        build_moe(parse_moe_config(spec), tmp_path / "refused")
    build_moe(parse_moe_config(spec), tmp_path / "moe", allow_same_experts=True, layout=layout)
    dense, _ = logits(fam["base"])
    got, model = logits(tmp_path / "moe")
    assert type(model).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[architecture]
    torch.testing.assert_close(got.logits, dense.logits, atol=1e-5, rtol=1e-5)


def test_degenerate_and_bad_configs_are_refused(llama_tok, families, tmp_path):
    experts = [{"source_model": str(llama_tok[m]), "positive_prompts": ["same prompt"]} for m in ("ft_dense", "ft_sparse")]
    with pytest.raises(ConfigError, match="same prompts"):
        build_moe(parse_moe_config({"base_model": str(llama_tok["base"]), "experts": experts}), tmp_path / "a")
    with pytest.raises(ConfigError, match="needs positive_prompts"):
        build_moe(parse_moe_config({"base_model": str(llama_tok["base"]), "experts": [{"source_model": str(llama_tok[m])} for m in ("ft_dense", "ft_flip")]}), tmp_path / "b")
    with pytest.raises(ConfigError, match="exactly one shared expert"):
        build_moe(parse_moe_config({"base_model": str(llama_tok["base"]), "architecture": "qwen2_moe", "gate_mode": "random", "experts": experts}), tmp_path / "c")
    with pytest.raises(ConfigError, match="did you mean 'positive_prompts'"):
        parse_moe_config({"base_model": "x", "experts": [{"source_model": "y", "positive_prompt": ["a"]}]})
    with pytest.raises(PlanError, match="gpt2 model"):
        build_moe(parse_moe_config({"base_model": str(families("gpt2")["base"]), "gate_mode": "random", "experts": experts}), tmp_path / "d")
    assert not any(p.name in ("a", "b", "c", "d") for p in tmp_path.iterdir())


def test_cli_moe(llama_tok, tmp_path):
    config = {
        "base_model": str(llama_tok["base"]),
        "gate_mode": "cheap_embed",
        "experts_per_token": 1,
        "experts": [{"source_model": str(llama_tok[m]), "positive_prompts": KINDS[k][:2]} for m, k in zip(["ft_dense", "ft_sparse"], KINDS)],
    }
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    res = runner.invoke(app, ["moe", str(tmp_path / "moe.yaml"), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    same = {**config, "experts": [config["experts"][0]] * 2}
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(same))
    res = runner.invoke(app, ["moe", str(tmp_path / "same.yaml"), str(tmp_path / "out2")])
    assert res.exit_code == 2 and "same model" in res.output and "Traceback" not in res.output
