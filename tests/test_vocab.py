"""Vocabulary alignment: embedding/head rows follow their token, checked row by row against the inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from vocab_models import (
    TEXT,
    bert_config,
    bpe_tokenizer,
    llama_config,
    save_model,
    unigram_tokenizer,
    with_added,
    with_renamed,
    wordpiece_tokenizer,
)

from modelalloy import api
from modelalloy.config import MergeConfig, parse_config
from modelalloy.errors import CheckpointError, ConfigError, PlanError

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """base (BPE), ft_chat (+2 chat markers), ft_tool (+1 token), ft_eot (</s> renamed), ft_pad (rows padded to 320)."""
    root = tmp_path_factory.mktemp("bpe")
    base_tok = bpe_tokenizer()
    n = len(base_tok)
    toks = {
        "base": base_tok,
        "ft_chat": with_added(base_tok, ["<|im_start|>", "<|im_end|>"]),
        "ft_tool": with_added(base_tok, ["<tool>"], special=False),
        "ft_eot": with_renamed(base_tok, "</s>", "<|eot|>"),
        "ft_pad": base_tok,
    }
    rows = {"base": n, "ft_chat": n + 2, "ft_tool": n + 1, "ft_eot": n, "ft_pad": 320}
    models = {"n": n, "tok": toks}
    base_state = save_model(root / "base", llama_config(n), base_tok, seed=0)
    models["base"] = (root / "base", base_state)
    for i, name in enumerate(["ft_chat", "ft_tool", "ft_eot", "ft_pad"], start=1):
        state = save_model(root / name, llama_config(rows[name]), toks[name], seed=i, like=base_state)
        models[name] = (root / name, state)
    return models


def _merge(tmp_path, data: dict) -> tuple[dict[str, torch.Tensor], transformers.PreTrainedTokenizerBase, dict]:
    out = tmp_path / "out"
    api.merge(MergeConfig.model_validate(data), out, threads=2, hash_inputs=False)
    tensors = load_file(out / "model.safetensors")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    return tensors, tok, config


def _row(model, token: str, name: str = EMBED) -> torch.Tensor:
    path, state = model
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return state[name][tok.convert_tokens_to_ids(token)]


def _roundtrip(tok, text: str) -> None:
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_union_of_added_tokens_keeps_every_row_exact(bpe, tmp_path):
    chat, tool = bpe["ft_chat"], bpe["ft_tool"]
    tensors, tok, config = _merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": str(chat[0]), "parameters": {"weight": 0.5}}, {"model": str(tool[0]), "parameters": {"weight": 0.5}}],
            "tokenizer_source": "union",
            "dtype": "float32",
        },
    )
    n = bpe["n"]
    assert tensors[EMBED].shape == (n + 3, 16) and tensors[HEAD].shape == (n + 3, 16)
    assert config["vocab_size"] == n + 3 and len(tok) == n + 3
    for token, source in [("<|im_start|>", chat), ("<|im_end|>", chat), ("<tool>", tool)]:
        row = tok.convert_tokens_to_ids(token)
        for name in (EMBED, HEAD):  # only one model has it, so the other takes that row: 0.5x + 0.5x = x
            assert torch.equal(tensors[name][row], _row(source, token, name)), (token, name)
    # Tokens both have stay at their ids and are averaged.
    common = np.arange(n)
    expected = 0.5 * chat[1][EMBED].numpy()[common] + 0.5 * tool[1][EMBED].numpy()[common]
    np.testing.assert_allclose(tensors[EMBED].numpy()[common], expected, rtol=1e-6, atol=1e-7)
    text = TEXT + "<|im_start|>user hello<|im_end|> <tool>"
    _roundtrip(tok, text)
    assert tok.convert_tokens_to_ids("<|im_start|>") in tok(text).input_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    logits = model(torch.tensor([tok(text).input_ids])).logits
    assert logits.shape[-1] == n + 3 and torch.isfinite(logits).all()
    report = json.loads((tmp_path / "out" / "vocab_report.json").read_text())
    assert report["added"] == ["<tool>"]  # beyond the first model, the base when none is named
    assert report["models"][str(tool[0])]["filled"]["<|im_start|>"] == f"from base {chat[0]}"


def test_task_vectors_from_the_base_leave_a_new_token_as_its_only_owner_wrote_it(bpe, tmp_path):
    base, chat, tool = bpe["base"], bpe["ft_chat"], bpe["ft_tool"]
    tensors, tok, _ = _merge(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base[0]),
            "models": [{"model": str(chat[0]), "parameters": {"weight": 0.7}}, {"model": str(tool[0]), "parameters": {"weight": 0.4}}],
            "tokenizer": {"source": "union"},
            "dtype": "float32",
        },
    )
    # base and ft_tool take ft_chat's row for <|im_start|>, so both task vectors are 0 there.
    assert torch.equal(tensors[EMBED][tok.convert_tokens_to_ids("<|im_start|>")], _row(chat, "<|im_start|>"))
    assert torch.equal(tensors[HEAD][tok.convert_tokens_to_ids("<tool>")], _row(tool, "<tool>", HEAD))
    n = bpe["n"]
    b = base[1][EMBED].numpy()
    expected = b + 0.7 * (chat[1][EMBED].numpy()[:n] - b) + 0.4 * (tool[1][EMBED].numpy()[:n] - b)
    np.testing.assert_allclose(tensors[EMBED].numpy()[:n], expected, rtol=1e-5, atol=1e-6)


def test_padding_rows_get_the_mean_embedding_and_are_kept(bpe, tmp_path):
    base, pad = bpe["base"], bpe["ft_pad"]
    n = bpe["n"]
    tensors, tok, config = _merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": str(base[0]), "parameters": {"weight": 0.25}}, {"model": str(pad[0]), "parameters": {"weight": 0.75}}],
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64},
            "dtype": "float32",
        },
    )
    assert tensors[EMBED].shape[0] == 320 and config["vocab_size"] == 320 and len(tok) == n
    mean = 0.25 * base[1][EMBED][:n].mean(0) + 0.75 * pad[1][EMBED][:n].mean(0)  # over real tokens only
    for row in (n, 319):
        torch.testing.assert_close(tensors[EMBED][row], mean, rtol=1e-5, atol=1e-7)
    _roundtrip(tok, TEXT)


def test_a_padded_tokenizer_source_is_not_truncated(bpe, tmp_path):
    base, pad = bpe["base"], bpe["ft_pad"]
    tensors, tok, config = _merge(
        tmp_path,
        {"merge_method": "linear", "models": [{"model": str(base[0]), "parameters": {"weight": 1.0}}, {"model": str(pad[0]), "parameters": {"weight": 1.0}}], "tokenizer_source": str(pad[0])},
    )
    assert config["vocab_size"] == 320 and tensors[EMBED].shape[0] == 320 and tensors[HEAD].shape[0] == 320
    assert max(tok.get_vocab().values()) < 320


def test_a_renamed_special_token_is_added_and_both_rows_survive(bpe, tmp_path):
    base, eot = bpe["base"], bpe["ft_eot"]
    n = bpe["n"]
    tensors, tok, _ = _merge(
        tmp_path,
        {"merge_method": "linear", "models": [{"model": str(base[0]), "parameters": {"weight": 0.5}}, {"model": str(eot[0]), "parameters": {"weight": 0.5}}], "tokenizer_source": "union", "dtype": "float32"},
    )
    assert tok.convert_tokens_to_ids("</s>") == 1 and tok.convert_tokens_to_ids("<|eot|>") == n
    assert torch.equal(tensors[EMBED][1], base[1][EMBED][1])  # ft_eot lacks </s>: it takes the base's row
    assert torch.equal(tensors[EMBED][n], eot[1][EMBED][1])  # <|eot|> was row 1 of ft_eot; now row n
    assert torch.equal(tensors[HEAD][n], eot[1][HEAD][1])
    _roundtrip(tok, "hello<|eot|>")
    report = json.loads((tmp_path / "out" / "vocab_report.json").read_text())
    assert report["models"][str(eot[0])]["remapped_examples"] == {"<|eot|>": [1, n]}
    assert report["models"][str(eot[0])]["filled"] == {"</s>": f"from base {base[0]}"}


def test_configured_token_sources(bpe, tmp_path):
    chat, tool = bpe["ft_chat"], bpe["ft_tool"]
    tensors, tok, _ = _merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": str(chat[0]), "parameters": {"weight": 0.5}}, {"model": str(tool[0]), "parameters": {"weight": 0.5}}],
            "tokenizer": {
                "source": "union",
                "tokens": {
                    "<|im_start|>": {"source": {"kind": "zero"}, "force": True},
                    "<|im_end|>": {"source": str(chat[0]), "force": True},
                    "<tool>": {"source": {"kind": "model_token", "model": str(chat[0]), "token": "</s>"}},
                    "<extra>": {"source": {"kind": "model_token", "model": str(tool[0]), "token_id": 5}},
                },
            },
            "dtype": "float32",
        },
    )
    row = tok.convert_tokens_to_ids
    assert torch.equal(tensors[EMBED][row("<|im_start|>")], torch.zeros(16))
    assert torch.equal(tensors[EMBED][row("<|im_end|>")], _row(chat, "<|im_end|>"))
    expected = 0.5 * chat[1][EMBED][1] + 0.5 * _row(tool, "<tool>")  # ft_chat lacks <tool>: its </s> row
    torch.testing.assert_close(tensors[EMBED][row("<tool>")], expected, rtol=0, atol=0)
    assert row("<extra>") == bpe["n"] + 3  # a configured token neither model has is added
    torch.testing.assert_close(tensors[EMBED][row("<extra>")], tool[1][EMBED][5], rtol=0, atol=0)


def test_same_tokenizers_need_no_alignment(bpe, tmp_path):
    import shutil

    base = bpe["base"][0]
    shutil.copytree(base, tmp_path / "copy")
    models = [{"model": str(base), "parameters": {"weight": 1.0}}, {"model": str(tmp_path / "copy"), "parameters": {"weight": 1.0}}]
    plan, opened = api.plan_merge(MergeConfig.model_validate({"merge_method": "linear", "models": models, "tokenizer_source": "base"}))
    assert plan.vocab is not None and not any(r.aligned for r in plan.recipes)
    for m in opened.values():
        m.close()


@pytest.mark.parametrize("kind", ["unigram", "wordpiece"])
def test_sentencepiece_unigram_and_wordpiece_tokenizers(kind, tmp_path):
    if kind == "unigram":
        base_tok, config_of, embed, marker = unigram_tokenizer(), llama_config, EMBED, "<|user|>"
        heads = [HEAD]
    else:
        base_tok, config_of, embed, marker = wordpiece_tokenizer(), bert_config, "bert.embeddings.word_embeddings.weight", "[TOOL]"
        heads = ["cls.predictions.bias"]  # one entry per token: a 1-D vocabulary tensor
    n = len(base_tok)
    ft_tok = with_added(base_tok, [marker])
    base = save_model(tmp_path / "base", config_of(n), base_tok, seed=0)
    save_model(tmp_path / "ft", config_of(n + 1), ft_tok, seed=1, like=base)
    stored = load_file(tmp_path / "ft" / "model.safetensors")
    heads = [h for h in heads if h in stored]
    tensors, tok, config = _merge(
        tmp_path,
        {"merge_method": "linear", "models": [{"model": str(tmp_path / "base"), "parameters": {"weight": 0.5}}, {"model": str(tmp_path / "ft"), "parameters": {"weight": 0.5}}], "tokenizer_source": "union", "dtype": "float32"},
    )
    assert config["vocab_size"] == n + 1 == len(tok)
    for name in [embed, *heads]:
        assert torch.equal(tensors[name][n], stored[name][n]), name
        np.testing.assert_allclose(tensors[name][:n].numpy(), 0.5 * base[name][:n].numpy() + 0.5 * stored[name][:n].numpy(), rtol=1e-6, atol=1e-7)
    text = "the lazy fox" + marker + "hello world"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.convert_tokens_to_ids(marker) in ids
    assert tok.decode(ids).replace(" ", "") == text.replace(" ", "")
    assert ft_tok(text).input_ids == ids or ft_tok(text, add_special_tokens=False).input_ids == ids


def test_different_vocabularies_without_a_tokenizer_section_are_an_error(bpe):
    chat, tool = bpe["ft_chat"], bpe["ft_tool"]
    config = MergeConfig.model_validate({"merge_method": "linear", "models": [{"model": str(chat[0]), "parameters": {"weight": 1.0}}, {"model": str(tool[0]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(PlanError, match="tokenizer"):
        api.plan_merge(config)


@pytest.mark.parametrize(
    "tokenizer, message",
    [
        ({"source": "nope"}, "'nope' is not one of the models"),
        ({"tokens": {"<tool>": {"source": {"kind": "model_token", "model": "CHAT", "token": "<nope>"}}}}, "has no token '<nope>'"),
        ({"tokens": {"<tool>": {"source": "CHAT"}}}, "has no token '<tool>'"),
        ({"tokens": {"<tool>": {"source": "union"}}}, r"tokens\['<tool>'\].source: 'union' is not one of the models"),
    ],
)
def test_bad_token_sources_name_the_field(bpe, tokenizer, message):
    chat, tool = bpe["ft_chat"], bpe["ft_tool"]
    text = json.dumps(tokenizer).replace("CHAT", str(chat[0]))
    config = MergeConfig.model_validate(
        {"merge_method": "linear", "models": [{"model": str(chat[0]), "parameters": {"weight": 1.0}}, {"model": str(tool[0]), "parameters": {"weight": 1.0}}], "tokenizer": json.loads(text)}
    )
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        api.plan_merge(config)


def test_tokenizer_schema_errors():
    base = "merge_method: linear\nmodels: [{model: a}, {model: b}]\n"
    with pytest.raises(ConfigError, match=r"tokenizer.tokens.*token or token_id"):
        parse_config(base + "tokenizer: {tokens: {'<x>': {source: {kind: model_token, model: a}}}}")
    with pytest.raises(ConfigError, match="unknown key 'pad_to_multiple'"):
        parse_config(base + "tokenizer: {pad_to_multiple: 64}")
    with pytest.raises(ConfigError, match="chat_template 'chatm'.*did you mean 'chatml'"):
        parse_config(base + "chat_template: chatm")
    with pytest.raises(ConfigError, match="not both"):
        parse_config(base + "tokenizer_source: base\ntokenizer: {source: base}")
    cfg = parse_config(base + "tokenizer: {source: base, tokens: {'<x>': a, '<y>': {source: {kind: zero}, force: true}}}")
    assert cfg.tokenizer.tokens["<x>"].source == "a" and cfg.tokenizer.tokens["<y>"].force


def test_a_model_without_a_tokenizer_is_named(tmp_path, bpe):
    save_model(tmp_path / "bare", llama_config(bpe["n"]), bpe["tok"]["base"], seed=3)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bare" / f).unlink()
    config = MergeConfig.model_validate({"merge_method": "linear", "models": [{"model": str(bpe["base"][0]), "parameters": {"weight": 1.0}}, {"model": str(tmp_path / "bare"), "parameters": {"weight": 1.0}}], "tokenizer_source": "union"})
    with pytest.raises(CheckpointError, match="bare: cannot load its tokenizer"):
        api.plan_merge(config)


@pytest.mark.parametrize("setting", ["chatml", "auto"])
def test_chat_template_is_written(bpe, tmp_path, setting):
    chat, tool = bpe["ft_chat"], bpe["ft_tool"]
    _, tok, _ = _merge(
        tmp_path,
        {"merge_method": "linear", "models": [{"model": str(chat[0]), "parameters": {"weight": 1.0}}, {"model": str(tool[0]), "parameters": {"weight": 1.0}}], "tokenizer_source": "union", "chat_template": setting},
    )
    if setting == "auto":
        assert tok.chat_template is None  # neither input has one
        return
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tied_embeddings_stay_tied(tmp_path):
    base_tok = bpe_tokenizer()
    n = len(base_tok)
    chat_tok = with_added(base_tok, ["<|im_start|>"])
    base = save_model(tmp_path / "base", llama_config(n, tied=True), base_tok, seed=0)
    save_model(tmp_path / "chat", llama_config(n + 1, tied=True), chat_tok, seed=1, like=base)
    tensors, tok, config = _merge(
        tmp_path,
        {"merge_method": "linear", "models": [{"model": str(tmp_path / "base"), "parameters": {"weight": 0.5}}, {"model": str(tmp_path / "chat"), "parameters": {"weight": 0.5}}], "tokenizer_source": "union"},
    )
    assert HEAD not in tensors and config["tie_word_embeddings"] is True and config["vocab_size"] == n + 1
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight[n], tensors[EMBED][n])


class _Headers:
    """Just enough of a Checkpoint for build_vocab: a name and tensor headers."""

    def __init__(self, ref: str, rows: int, width: int):
        from modelalloy.io.safetensors_format import TensorLocation

        self.ref = ref
        self.tensors = {EMBED: TensorLocation(EMBED, ref, torch.float32, (rows, width), 0, rows * width * 4)}


def test_a_shuffled_50k_vocabulary_is_aligned_with_index_tensors():
    """Every one of 50k tokens moved to another id in model B: each output row is B's row for that token."""
    import time

    from tokenizers import Tokenizer, models

    from modelalloy.plan.vocab import build_vocab

    n, width = 50_000, 8
    words = [f"w{i}" for i in range(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # B's id of word i is perm[i]
    tok_a = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0")))
    vocab_b = {words[i]: int(perm[i]) for i in range(n)}
    tok_b = with_added(transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab_b, unk_token="w0"))), ["<new>"])
    weights = {"a": torch.randn(n, width), "b": torch.randn(n + 1, width)}
    headers = {"a": _Headers("a", n, width), "b": _Headers("b", n + 1, width)}
    config = MergeConfig.model_validate({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "tokenizer_source": "union"})
    start = time.perf_counter()
    plan = build_vocab(config, headers, base="a", models=["a", "b"], load=lambda c: {"a": tok_a, "b": tok_b}[c.ref])
    read = lambda model, tensor: weights[model]  # noqa: E731
    aligned_b = plan.align("b", EMBED, read)
    aligned_a = plan.align("a", EMBED, read)
    seconds = time.perf_counter() - start
    assert plan.rows == n + 1
    assert torch.equal(aligned_b[:n], weights["b"][perm])  # row i <- B's row perm[i]
    assert torch.equal(aligned_b[n], weights["b"][n]) and torch.equal(aligned_a[n], weights["b"][n])  # <new>: only B has it
    assert torch.equal(aligned_a[:n], weights["a"])
    assert plan.report["models"]["b"]["remapped"] == int((perm != torch.arange(n)).sum())
    assert seconds < 10, seconds  # index tensors, not a Python loop over 50k tokens (about 1 s here)


def test_report_renders_as_text_and_html(bpe):
    from modelalloy.plan.vocab_report import format_report, report_html

    chat, tool = bpe["ft_chat"], bpe["ft_tool"]
    plan, opened = api.plan_merge(MergeConfig.model_validate({"merge_method": "linear", "models": [{"model": str(chat[0]), "parameters": {"weight": 1.0}}, {"model": str(tool[0]), "parameters": {"weight": 1.0}}], "tokenizer_source": "union"}))
    for m in opened.values():
        m.close()
    text = format_report(plan.vocab.report)
    assert f"vocabulary: {bpe['n'] + 3} tokens in {bpe['n'] + 3} rows, source union" in text
    assert f"filled from base {chat[0]}: '<|im_start|>', '<|im_end|>'" in text and "1 remapped" in text
    page = report_html(plan.vocab.report)
    assert page.startswith('<section class="vocabulary">') and "<code>&lt;tool&gt;</code>" in page


def test_alloy_plan_and_merge_print_the_vocabulary_report(bpe, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from modelalloy.cli import app

    chat, tool = bpe["ft_chat"], bpe["ft_tool"]
    cfg = {"merge_method": "linear", "models": [{"model": str(chat[0]), "parameters": {"weight": 1.0}}, {"model": str(tool[0]), "parameters": {"weight": 1.0}}], "tokenizer": {"source": "union", "pad_to_multiple_of": 64}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    rows = (bpe["n"] + 3 + 63) // 64 * 64
    planned = CliRunner().invoke(app, ["plan", str(tmp_path / "m.yaml"), "--json"])
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["vocabulary"]["rows"] == rows
    merged = CliRunner().invoke(app, ["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out")])
    assert merged.exit_code == 0, merged.output
    assert f"vocabulary: {bpe['n'] + 3} tokens in {rows} rows ({rows - bpe['n'] - 3} padding), source union" in merged.output


def test_slices_with_a_union_vocabulary(bpe, tmp_path):
    """A frankenmerge: embeddings from ft_chat's slice, head from ft_tool's; both aligned to the union."""
    chat, tool = bpe["ft_chat"], bpe["ft_tool"]
    tensors, tok, config = _merge(
        tmp_path,
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(chat[0]), "layer_range": [0, 2]}]}, {"sources": [{"model": str(tool[0]), "layer_range": [1, 2]}]}],
            "tokenizer_source": "union",
        },
    )
    n = bpe["n"]
    assert config["num_hidden_layers"] == 3 and config["vocab_size"] == n + 3
    assert torch.equal(tensors[EMBED][: n + 2], chat[1][EMBED])  # ft_chat's own rows, in place
    assert torch.equal(tensors[EMBED][n + 2], _row(tool, "<tool>"))  # ft_chat lacks <tool>: the only owner's row
    assert torch.equal(tensors[HEAD][tok.convert_tokens_to_ids("<tool>")], _row(tool, "<tool>", HEAD))
    assert torch.equal(tensors[HEAD][n], _row(chat, "<|im_start|>", HEAD))  # ft_tool lacks it: ft_chat's (the base's) row


def test_a_token_two_models_have_is_filled_with_their_mean(bpe, tmp_path):
    chat, tool = bpe["ft_chat"], bpe["ft_tool"]
    chat2 = (tmp_path / "chat2", save_model(tmp_path / "chat2", llama_config(bpe["n"] + 2), bpe["tok"]["ft_chat"], seed=7, like=bpe["base"][1]))
    models = [{"model": str(m[0]), "parameters": {"weight": w}} for m, w in [(tool, 0.2), (chat, 0.3), (chat2, 0.5)]]
    tensors, tok, _ = _merge(tmp_path, {"merge_method": "linear", "models": models, "tokenizer_source": "union", "dtype": "float32"})
    row = tok.convert_tokens_to_ids("<|im_start|>")
    a, b = _row(chat, "<|im_start|>"), _row(chat2, "<|im_start|>")
    # ft_tool (the base here) lacks it and two models have it: ft_tool's row is their mean.
    expected = 0.2 * (a.double() + b.double()) / 2 + 0.3 * a.double() + 0.5 * b.double()
    torch.testing.assert_close(tensors[EMBED][row].double(), expected, rtol=1e-6, atol=1e-7)
    report = json.loads((tmp_path / "out" / "vocab_report.json").read_text())
    assert report["models"][str(tool[0])]["filled"]["<|im_start|>"] == "mean of the 2 models that have it"


def test_a_base_with_more_tokens_than_a_fine_tune(bpe, tmp_path):
    """The output has the template's row count, yet the other model's rows still differ: aligned, not refused."""
    chat, base = bpe["ft_chat"], bpe["base"]
    tensors, tok, config = _merge(
        tmp_path,
        {"merge_method": "linear", "models": [{"model": str(chat[0]), "parameters": {"weight": 0.5}}, {"model": str(base[0]), "parameters": {"weight": 0.5}}], "tokenizer_source": "base", "dtype": "float32"},
    )
    n = bpe["n"]
    assert tensors[EMBED].shape[0] == n + 2 == config["vocab_size"]
    assert torch.equal(tensors[EMBED][n], _row(chat, "<|im_start|>"))
