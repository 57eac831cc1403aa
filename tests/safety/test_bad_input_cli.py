"""Issue #4's fifteen bad inputs, each through the real `alloy` command in a subprocess.

Each test checks the exit code (2), that the message is one line naming the file/tensor/field,
and that nothing was written anywhere under the test's directory (so no OUT, no OUT.partial).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from alloy_helpers import assert_one_line_error, copy_model, rewrite_weights, run_alloy, snapshot, write_config
from safetensors.torch import load_file, save_file


def ties(base: Path, *models: Path, **params) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5, **params}} for m in models],
    }


def merge_fails(tmp_path: Path, config: dict | Path, *fragments: str, extra: tuple = (), prelude: str = "") -> str:
    """`alloy merge CONFIG OUT` must fail with one error line and leave tmp_path untouched."""
    cfg = config if isinstance(config, Path) else write_config(tmp_path / "merge.yaml", config)
    before = snapshot(tmp_path)
    result = run_alloy("merge", cfg, tmp_path / "out", *extra, cwd=tmp_path, prelude=prelude)
    line = assert_one_line_error(result, *fragments)
    assert snapshot(tmp_path) == before, "a failed merge wrote files"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    return line


# 1. config file missing, not YAML, or a schema error (with line and column)


def test_01_config_missing(tmp_path):
    merge_fails(tmp_path, tmp_path / "nope.yaml", "nope.yaml", "config file not found")


def test_01_config_not_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("merge_method: ties\nmodels: [a, b\n")
    merge_fails(tmp_path, cfg, "bad.yaml", "not valid YAML", "line 3")


def test_01_schema_error_with_line_and_column(tmp_path, llama):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n  - model: {llama['ft_dense']}\n    paramters: {{density: 0.5}}\n")
    merge_fails(tmp_path, cfg, "typo.yaml", "models.0.paramters", "line 5, column 5", "unknown key 'paramters'", "did you mean 'parameters'")


# 2. unknown merge method (closest names) or unknown parameter (did you mean)


def test_02_unknown_method(tmp_path, llama):
    config = ties(llama["base"], llama["ft_dense"]) | {"merge_method": "tie"}
    merge_fails(tmp_path, config, "merge_method", "unknown method 'tie'", "did you mean 'ties'")


def test_02_unknown_parameter(tmp_path, llama):
    config = ties(llama["base"], llama["ft_dense"])
    config["models"][0]["parameters"]["densty"] = 0.3
    merge_fails(tmp_path, config, "unknown parameter 'densty' for ties", "did you mean 'density'", str(llama["ft_dense"]))


# 3. parameter out of range


def test_03_density_out_of_range(tmp_path, llama):
    config = ties(llama["base"], llama["ft_dense"], llama["ft_sparse"])
    config["models"][1]["parameters"]["density"] = 1.5
    merge_fails(tmp_path, config, "density=1.5", "outside (0.0, 1.0]", str(llama["ft_sparse"]))


def test_03_della_density_plus_minus_epsilon_outside_unit_interval(tmp_path, llama):
    config = ties(llama["base"], llama["ft_dense"], llama["ft_sparse"]) | {"merge_method": "della", "parameters": {"epsilon": 0.15}}
    config["models"][1]["parameters"]["density"] = 0.9
    merge_fails(tmp_path, config, "della: density 0.9 ± epsilon 0.15", str(llama["ft_sparse"]), "keep-probabilities must stay inside")


def test_03_linear_weights_sum_to_zero(tmp_path, llama):
    config = {"merge_method": "linear", "models": [{"model": str(llama["ft_dense"]), "parameters": {"weight": 1.0}}, {"model": str(llama["ft_sparse"]), "parameters": {"weight": -1.0}}]}
    merge_fails(tmp_path, config, "sum to 0", "normalize", "set normalize: false")


def test_03_t_outside_unit_interval_warns(tmp_path, llama):
    config = {"merge_method": "slerp", "base_model": str(llama["base"]), "models": [{"model": str(llama["base"])}, {"model": str(llama["ft_dense"])}], "parameters": {"t": 1.5}}
    result = run_alloy("plan", write_config(tmp_path / "m.yaml", config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "t=1.5 is outside [0, 1]" in warnings[0], result.stderr


# 4. model path missing, no weight files, config.json missing or unreadable


def test_04_model_path_missing(tmp_path, llama):
    merge_fails(tmp_path, ties(llama["base"], tmp_path / "no-such-model"), "no-such-model", "not found")


def test_04_no_weight_files(tmp_path, llama):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    shutil.copy(llama["base"] / "config.json", empty / "config.json")
    merge_fails(tmp_path, ties(llama["base"], empty), "empty-model", "no weight files")


def test_04_config_json_missing(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "no-config")
    (model / "config.json").unlink()
    merge_fails(tmp_path, ties(llama["base"], model), "no-config", "config.json missing")


def test_04_config_json_unreadable(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "bad-config")
    (model / "config.json").write_text("{not json")
    merge_fails(tmp_path, ties(llama["base"], model), "bad-config/config.json", "unreadable config.json")


# 5. tensor present in one model and missing in another (both directions)


def test_05_tensor_missing_from_a_model(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "short")
    rewrite_weights(model, lambda s: s.pop("model.layers.2.mlp.up_proj.weight"))
    merge_fails(tmp_path, ties(llama["base"], model), "'model.layers.2.mlp.up_proj.weight'", "missing from", "short")


def test_05_extra_tensor_is_not_dropped_silently(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "extra")
    rewrite_weights(model, lambda s: s.__setitem__("model.layers.1.mlp.extra_proj.weight", torch.zeros(4, 4)))
    merge_fails(tmp_path, ties(llama["base"], model), "'model.layers.1.mlp.extra_proj.weight'", "is in", "extra", "missing from")


# 6. shape mismatch: names the tensor and both shapes; embeddings suggest a tokenizer section


def test_06_shape_mismatch(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "wide")
    rewrite_weights(model, lambda s: s.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(96, 32)))
    line = merge_fails(tmp_path, ties(llama["base"], model), "'model.layers.0.mlp.up_proj.weight'", "[96, 32]", "[64, 32]")
    assert "tokenizer" not in line


def test_06_embedding_rows_suggest_tokenizer(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "more-tokens")
    rewrite_weights(model, lambda s: s.__setitem__("model.embed_tokens.weight", torch.zeros(130, 32)))
    merge_fails(tmp_path, ties(llama["base"], model), "'model.embed_tokens.weight'", "[130, 32]", "[128, 32]", "tokenizer: {source: base}")


# 7. different architectures or layer counts (unless explicitly allowed)


def test_07_different_architectures(tmp_path, llama, families):
    mistral = families("mistral")
    config = {"merge_method": "linear", "models": [{"model": str(llama["base"]), "parameters": {"weight": 1}}, {"model": str(mistral["base"]), "parameters": {"weight": 1}}]}
    merge_fails(tmp_path, config, "different architectures", "LlamaForCausalLM", "MistralForCausalLM", "--allow-crimes")
    allowed = run_alloy("plan", tmp_path / "merge.yaml", "--allow-crimes", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr


def test_07_different_layer_counts(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "two-layers")
    rewrite_weights(model, lambda s: [s.pop(k) for k in list(s) if ".layers.2." in k or ".layers.3." in k])
    config = (model / "config.json").read_text().replace('"num_hidden_layers": 4', '"num_hidden_layers": 2')
    (model / "config.json").write_text(config)
    merge_fails(tmp_path, ties(llama["base"], model), "different layer counts", "two-layers has 2", "has 4", "slices")


# 8. layer_range outside the model, slices whose sources differ in length


def test_08_layer_range_outside_model(tmp_path, llama):
    config = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(llama["base"]), "layer_range": [0, 6]}]}]}
    merge_fails(tmp_path, config, "slices[0].sources[0]", "layer_range [0, 6)", "4 layers")


def test_08_slice_sources_differ_in_length(tmp_path, llama):
    config = {
        "merge_method": "slerp",
        "base_model": str(llama["base"]),
        "slices": [{"sources": [{"model": str(llama["base"]), "layer_range": [0, 4]}, {"model": str(llama["ft_dense"]), "layer_range": [0, 2]}]}],
        "parameters": {"t": 0.5},
    }
    merge_fails(tmp_path, config, "slices.0", "same number of layers", "[0, 4]", "[0, 2]")


# 9. truncated or corrupt safetensors


def _corrupt(tmp_path: Path, llama, edit) -> Path:
    model = copy_model(llama["ft_dense"], tmp_path / "corrupt")
    file = model / "model.safetensors"
    file.write_bytes(edit(file.read_bytes()))
    return model


def _header(data: bytes) -> tuple[int, bytes, bytes]:
    n = int.from_bytes(data[:8], "little")
    return n, data[8 : 8 + n], data[8 + n :]


def test_09_header_longer_than_file(tmp_path, llama):
    model = _corrupt(tmp_path, llama, lambda b: b[:100])
    merge_fails(tmp_path, ties(llama["base"], model), "corrupt/model.safetensors", "header claims", "truncated or corrupt")


def test_09_invalid_header_json(tmp_path, llama):
    def edit(b: bytes) -> bytes:
        n, header, data = _header(b)
        return b[:8] + header.replace(b'"dtype"', b'"dtype"!', 1)[:n] + data

    model = _corrupt(tmp_path, llama, edit)
    merge_fails(tmp_path, ties(llama["base"], model), "corrupt/model.safetensors", "not valid JSON")


def test_09_offsets_outside_data(tmp_path, llama):
    def edit(b: bytes) -> bytes:  # cut the data short: the last tensor now ends past the file
        return b[:-64]

    model = _corrupt(tmp_path, llama, edit)
    merge_fails(tmp_path, ties(llama["base"], model), "corrupt/model.safetensors", "tensor '", "the file is truncated")


def test_09_dtype_shape_do_not_match_bytes(tmp_path, llama):
    def edit(b: bytes) -> bytes:  # claim F16 for an F32 tensor: half the bytes its shape needs
        n, header, data = _header(b)
        key = b'"model.norm.weight":{"dtype":"F32"'
        assert key in header
        return b[:8] + header.replace(key, key.replace(b"F32", b"F16")) + data

    model = _corrupt(tmp_path, llama, edit)
    merge_fails(tmp_path, ties(llama["base"], model), "corrupt/model.safetensors", "'model.norm.weight'", "F16 [32] needs 64 bytes", "gives 128")


# 10. pickle .bin without --allow-pickle


def test_10_pickle_refused_without_opt_in(tmp_path, llama):
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(llama["ft_dense"] / "config.json", model / "config.json")
    torch.save(load_file(llama["ft_dense"] / "model.safetensors"), model / "pytorch_model.bin")
    merge_fails(tmp_path, ties(llama["base"], model), "pickled", "pickle can run arbitrary code", "--allow-pickle")
    allowed = run_alloy("plan", tmp_path / "merge.yaml", "--allow-pickle", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr


# 11. output exists (without --force) or lies inside an input model


def test_11_output_exists(tmp_path, llama):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    cfg = write_config(tmp_path / "merge.yaml", ties(llama["base"], llama["ft_dense"]))
    before = snapshot(tmp_path)
    result = run_alloy("merge", cfg, tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(result, "out: already exists", "--force")
    assert snapshot(tmp_path) == before and (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_11_output_inside_input_model(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "model")
    cfg = write_config(tmp_path / "merge.yaml", ties(llama["base"], model))
    before = snapshot(tmp_path)
    result = run_alloy("merge", cfg, model / "merged", cwd=tmp_path)
    assert_one_line_error(result, "model/merged", "overlaps the input model")
    assert snapshot(tmp_path) == before


# 12. not enough free disk (checked before writing, by plan and merge)

TINY_DISK = "import shutil\nshutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)\n"


def test_12_not_enough_disk(tmp_path, llama):
    line = merge_fails(tmp_path, ties(llama["base"], llama["ft_dense"]), "out: the merge writes 0.00 GB", "0.00 GB is free", prelude=TINY_DISK)
    assert "free some space" in line
    planned = run_alloy("plan", tmp_path / "merge.yaml", tmp_path / "out", cwd=tmp_path, prelude=TINY_DISK)
    assert_one_line_error(planned, "is free there")


# 13. NaN/Inf in an input (warning naming it) and produced by a merge (error naming tensor and method)


def test_13_input_nan_warns_with_tensor_names(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "nan-model")

    def poison(state):
        state["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
        state["model.norm.weight"][3] = float("inf")

    rewrite_weights(model, poison)
    config = {"merge_method": "passthrough", "models": [{"model": str(model)}]}
    result = run_alloy("merge", write_config(tmp_path / "copy.yaml", config), tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "model.layers.1.self_attn.q_proj.weight in" in warnings[0] and "model.norm.weight in" in warnings[0]
    assert "nan-model" in warnings[0]


def test_13_merge_producing_inf_is_an_error(tmp_path, llama):
    # Finite inputs, but two weights of 3e38 overflow float32 where the parameters are near 1 (norms).
    config = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 3e38}} for m in (llama["ft_dense"], llama["ft_sparse"])], "parameters": {"normalize": False}}
    line = merge_fails(tmp_path, config, "linear produced NaN or Inf", extra=("-j", "1"))
    assert re.match(r"error: model\.\S+\.weight: linear produced", line), line


def test_13_nan_input_reaching_the_output_warns_and_fails(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "nan-model")
    rewrite_weights(model, lambda s: s["model.layers.3.mlp.down_proj.weight"].__setitem__((1, 1), float("nan")))
    config = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (model, llama["ft_sparse"])]}
    cfg = write_config(tmp_path / "merge.yaml", config)
    before = snapshot(tmp_path)
    result = run_alloy("merge", cfg, tmp_path / "out", "-j", "1", cwd=tmp_path)
    assert_one_line_error(result, "model.layers.3.mlp.down_proj.weight: linear produced NaN or Inf")
    assert any(line.startswith("warning:") and "model.layers.3.mlp.down_proj.weight in" in line for line in result.stderr.splitlines())
    assert snapshot(tmp_path) == before


# 14. a sharded index naming a missing shard; 15's cousin: a shard name escaping the directory


def _sharded(tmp_path: Path, llama) -> Path:
    model = tmp_path / "sharded"
    model.mkdir()
    shutil.copy(llama["ft_dense"] / "config.json", model / "config.json")
    state = load_file(llama["ft_dense"] / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-0000{i}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, model / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (model / "model.safetensors.index.json").write_text(__import__("json").dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def test_14_index_names_missing_shard(tmp_path, llama):
    model = _sharded(tmp_path, llama)
    (model / "model-00002-of-00002.safetensors").unlink()
    merge_fails(tmp_path, ties(llama["base"], model), "model.safetensors.index.json", "'model-00002-of-00002.safetensors'", "missing")


def test_14_index_cannot_escape_the_model_directory(tmp_path, llama):
    model = _sharded(tmp_path, llama)
    index = model / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"model-00002-of-00002', '"../model-00002-of-00002'))
    shutil.copy(model / "model-00002-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors")
    merge_fails(tmp_path, ties(llama["base"], model), "'../model-00002-of-00002.safetensors'", "outside the model directory")


# 15. an input that is a symlink loop or a directory without permission


def test_15_symlink_loop(tmp_path, llama):
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    merge_fails(tmp_path, ties(llama["base"], tmp_path / "loop-a"), "loop-a", "symbolic links")


def test_15_directory_without_permission(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "locked")
    cfg = write_config(tmp_path / "merge.yaml", ties(llama["base"], model))
    model.chmod(0o000)
    try:
        prefix = []
        if os.geteuid() == 0:  # root reads anything: drop the two capabilities that allow it
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: cannot take permissions away")
            prefix = [setpriv, "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search", "--"]
        before = snapshot(tmp_path)
        result = run_alloy("merge", cfg, tmp_path / "out", cwd=tmp_path, prefix=prefix)
        assert_one_line_error(result, "locked", "ermission denied")
        assert snapshot(tmp_path) == before
    finally:
        model.chmod(0o755)


# `alloy plan` reports the same errors (it is what `merge` runs first)


@pytest.mark.parametrize("case", ["unknown-method", "shape", "missing-shard"])
def test_plan_reports_the_same_errors(tmp_path, llama, case):
    if case == "unknown-method":
        config, fragment = ties(llama["base"], llama["ft_dense"]) | {"merge_method": "dare_tie"}, "did you mean 'dare_ties'"
    elif case == "shape":
        model = copy_model(llama["ft_dense"], tmp_path / "wide")
        rewrite_weights(model, lambda s: s.__setitem__("lm_head.weight", torch.zeros(100, 32)))
        config, fragment = ties(llama["base"], model), "'lm_head.weight': shape [100, 32]"
    else:
        model = _sharded(tmp_path, llama)
        (model / "model-00001-of-00002.safetensors").unlink()
        config, fragment = ties(llama["base"], model), "lists shard 'model-00001-of-00002.safetensors', which is missing"
    cfg = write_config(tmp_path / "merge.yaml", config)
    before = snapshot(tmp_path)
    assert_one_line_error(run_alloy("plan", cfg, cwd=tmp_path), fragment)
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path):
    result = run_alloy("--debug", "plan", tmp_path / "missing.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr
