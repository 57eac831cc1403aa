"""Issue #21, part two: inputs that were accepted silently and failed later or elsewhere. What
`alloy verify` rejects in an input, `plan` and `merge` warn about, naming the file; a tokenizer
that would be copied broken, a layer count of "four", weights of .nan or 1e300 are one-line
errors of `alloy plan`; `verify` says when it had no digests to check the bytes against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from alloy_helpers import copy_model, invoke as alloy, one_error, snapshot, ties_config as ties, warning_lines as warnings_of, write_config as write
from safetensors.torch import load_file, save_file


def _header(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _encode(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


def with_gap(file: Path, gap: int = 16) -> None:
    """Shift every tensor `gap` bytes into the data buffer: a valid header, bytes no tensor covers."""
    header, body = _header(file.read_bytes())
    for name, info in header.items():
        if name != "__metadata__":
            info["data_offsets"] = [o + gap for o in info["data_offsets"]]
    file.write_bytes(_encode(header, b"\0" * gap + body))


# --- what verify rejects, plan and merge warn about


def test_a_gap_before_tensor_data_warns_in_plan_and_merge(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "gappy")
    with_gap(model / "model.safetensors")
    cfg = write(tmp_path / "merge.yaml", ties(llama, model, llama["ft_flip"]))
    for command in (["plan", cfg], ["merge", cfg, tmp_path / "out"]):
        result = alloy(*command)
        assert result.exit_code == 0, result.output
        found = [w for w in warnings_of(result) if "unaccounted bytes before tensor" in w]
        assert len(found) == 1 and str(model / "model.safetensors") in found[0] and "the safetensors library refuses to load this file" in found[0], result.stderr
    checked = alloy("verify", model)
    assert checked.exit_code == 1 and "16 unaccounted bytes before tensor" in " ".join(checked.stderr.split())


def test_an_index_that_puts_a_tensor_in_the_wrong_shard_warns(tmp_path, llama):
    model = tmp_path / "sharded"
    model.mkdir()
    shutil.copy(llama["ft_dense"] / "config.json", model / "config.json")
    state = load_file(llama["ft_dense"] / "model.safetensors")
    names = sorted(state)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for file, part in zip(files, (names[:20], names[20:])):
        save_file({k: state[k] for k in part}, model / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    weight_map[names[0]] = files[1]  # the index lies about one tensor
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = write(tmp_path / "merge.yaml", ties(llama, model, llama["ft_flip"]))
    for command in (["plan", cfg], ["merge", cfg, tmp_path / "out"]):
        result = alloy(*command)
        assert result.exit_code == 0, result.output
        found = [w for w in warnings_of(result) if "does not match the shards" in w]
        assert len(found) == 1, result.stderr
        text = found[0]
        assert "model.safetensors.index.json" in text and f"{names[0]!r} is in {files[0]}, not in {files[1]}" in text and "fix the index" in text
    assert alloy("verify", model).exit_code == 1


# --- the tokenizer files that would be copied must load


@pytest.mark.parametrize(("content", "says"), [("{not json", "is not valid JSON"), ("{}", "the tokenizers library cannot load it")])
def test_a_corrupt_tokenizer_json_is_refused_by_plan(tmp_path, llama, content, says):
    base = copy_model(llama["base"], tmp_path / "base")
    (base / "tokenizer.json").write_text(content)
    config = ties(llama) | {"base_model": str(base)}
    cfg = write(tmp_path / "merge.yaml", config)
    before = snapshot(tmp_path)
    for command in (["plan", cfg], ["merge", cfg, tmp_path / "out"]):
        one_error(alloy(*command), str(base / "tokenizer.json"), "would be copied into the output", says, "--no-copy-tokenizer")
    assert snapshot(tmp_path) == before
    assert alloy("plan", cfg, "--no-copy-tokenizer").exit_code == 0
    merged = alloy("merge", cfg, tmp_path / "out", "--no-copy-tokenizer", "-q")
    assert merged.exit_code == 0 and not (tmp_path / "out" / "tokenizer.json").exists(), merged.output


def test_a_valid_tokenizer_json_is_copied(tmp_path, llama):
    tokenizers = pytest.importorskip("tokenizers")
    base = copy_model(llama["base"], tmp_path / "base")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.save(str(base / "tokenizer.json"))
    cfg = write(tmp_path / "merge.yaml", ties(llama) | {"base_model": str(base)})
    assert alloy("merge", cfg, tmp_path / "out", "-q").exit_code == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


# --- config.json values that would be misread


@pytest.mark.parametrize(("key", "value", "says"), [("num_hidden_layers", "four", "num_hidden_layers is 'four', not a whole number"), ("num_hidden_layers", 4.0, "is 4.0, not a whole number"), ("tie_word_embeddings", "false", "tie_word_embeddings is 'false', not true or false")])
def test_config_json_values_of_the_wrong_type_are_refused(tmp_path, llama, key, value, says):
    model = copy_model(llama["ft_dense"], tmp_path / "odd")
    config = json.loads((model / "config.json").read_text())
    config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    cfg = write(tmp_path / "merge.yaml", ties(llama, model, llama["ft_flip"]))
    one_error(alloy("plan", cfg), str(model / "config.json"), says, "fix config.json")


# --- parameter values plan must refuse: .nan, .inf, and 1e300 (a string to YAML)


@pytest.mark.parametrize(("written", "says"), [(".nan", "weight=nan is not a finite float32 number"), (".inf", "weight=inf"), ("-.inf", "weight=-inf"), ("1.0e+39", "weight=1e+39 is not a finite float32 number"), ("[0.5, .nan]", "weight=nan")])
def test_non_finite_weights_are_refused_by_plan(tmp_path, llama, written, says):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {llama['ft_dense']}\n    parameters: {{weight: {written}}}\n  - model: {llama['ft_flip']}\n    parameters: {{weight: 0.5}}\n")
    one_error(alloy("plan", cfg), "weight", says, "give a finite value")


def test_1e300_is_a_string_to_yaml_and_the_message_says_so(tmp_path, llama):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {llama['ft_dense']}\n    parameters: {{weight: 1e300}}\n  - model: {llama['ft_flip']}\n    parameters: {{weight: 0.5}}\n")
    assert yaml.safe_load(cfg.read_text())["models"][0]["parameters"]["weight"] == "1e300"
    one_error(alloy("plan", cfg), "weight is the string '1e300'", "YAML reads a number in exponent form only with a dot and a signed exponent", "write 1.0e+300")


# --- verify: "ok" without a manifest says what it could not check


def test_verify_without_a_manifest_says_the_bytes_were_not_checked(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "plain")
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x04  # one flipped bit inside a tensor: still finite, so nothing else can see it
    shard.write_bytes(bytes(data))
    result = alloy("verify", model)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert text.startswith("ok: ") and "note: no modelalloy_manifest.json here, so the tensor bytes were not checked against recorded digests" in text
    summary = json.loads(alloy("verify", model, "--json").stdout)
    assert summary["content_checked"] is False and summary["notes"]
