"""Every catalogue method through `modelalloy.merge` on the tiny real models: the output loads
with transformers and runs, and a merged tensor equals the method applied to the input tensors
read straight from the files (so the planner resolved every parameter as configured). Plus the
plan-time checks: bad parameter combinations fail before anything is written, in one line."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

import modelalloy
from modelalloy.config import MergeConfig
from modelalloy.errors import ConfigError
from modelalloy.methods import get_method
from modelalloy.plan import seed_for

CHECKED = "model.layers.1.mlp.down_proj.weight"
# Per family, a 2-D weight to compare and a 1-D one (GPT-2: Conv1D weights stored transposed, biases).
CHECKED_BY_FAMILY = {"llama": (CHECKED, "model.layers.2.input_layernorm.weight"), "gpt2": ("transformer.h.1.mlp.c_proj.weight", "transformer.h.2.ln_1.bias")}

# method -> (non-base models, base used?, top-level parameters, per-model parameters)
CASES = {
    "multislerp": (["ft_dense", "ft_sparse", "ft_flip"], True, {}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
    "karcher": (["ft_dense", "ft_sparse", "ft_flip"], False, {"max_iter": 20}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}]),
    "nearswap": (["ft_dense"], True, {"t": 0.01}, [{}]),
    "breadcrumbs": (["ft_dense", "ft_sparse", "ft_flip"], True, {"gamma": 0.05}, [{"weight": 0.5, "density": 0.7}, {"weight": 0.3, "density": 0.5}, {"weight": 0.2, "density": 0.9}]),
    "breadcrumbs_ties": (["ft_dense", "ft_sparse", "ft_flip"], True, {"normalize": True}, [{"weight": 0.5, "density": 0.7, "gamma": 0.02}, {"weight": 0.3, "density": 0.5}, {"weight": 0.2, "density": 0.9}]),
    "della": (["ft_dense", "ft_sparse", "ft_flip"], True, {"epsilon": 0.1, "lambda": 0.9}, [{"weight": 0.5, "density": 0.7}, {"weight": 0.3, "density": 0.5}, {"weight": 0.2, "density": 0.6}]),
    "della_linear": (["ft_dense", "ft_sparse"], True, {"rescale": "inverse_p"}, [{"weight": 0.5, "density": 0.6, "epsilon": 0.2}, {"weight": 0.5, "density": 0.5}]),
    "model_stock": (["ft_dense", "ft_sparse", "ft_flip"], True, {"filter_wise": True}, [{}, {}, {}]),
    "sce": (["ft_dense", "ft_sparse", "ft_flip"], True, {"select_topk": 0.3}, [{}, {}, {}]),
    "arcee_fusion": (["ft_dense"], True, {}, [{}]),
    "ram": (["ft_dense", "ft_sparse", "ft_flip"], True, {}, [{}, {}, {}]),
    "ramplus_tl": (["ft_dense", "ft_sparse", "ft_flip"], True, {"r": 0.2, "alpha": 0.5}, [{}, {}, {}]),
}


def _config(paths, method: str, models: list[str], with_base: bool, top: dict, per_model: list[dict]) -> MergeConfig:
    doc = {
        "merge_method": method,
        "models": [{"model": str(paths[m]), "parameters": p} for m, p in zip(models, per_model)],
        "parameters": top,
        "dtype": "float32",
        "random_seed": 3,
    }
    if with_base:
        doc["base_model"] = str(paths["base"])
    return MergeConfig.model_validate(doc)


def _expected(paths, method_name: str, models: list[str], with_base: bool, config: MergeConfig, tensor: str = CHECKED) -> torch.Tensor:
    """The method on tensors read with safetensors itself, parameters as the config says."""
    method = get_method(method_name)
    read = {name: load_file(str(paths[name] / "model.safetensors"))[tensor] for name in ["base", *models]}
    params = {}
    for p in method.params:
        if p.per_model:
            params[p.name] = [m.parameters.get(p.name, config.parameters.get(p.name, p.default)) for m in config.models]
        else:
            params[p.name] = config.parameters.get(p.name, p.default)
    return method([read[m] for m in models], base=read["base"] if with_base else None, seed=seed_for(3, tensor, method_name), **params)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(CASES))
def test_method_merges_real_models_that_load_and_run(method, family, families, tmp_path):
    paths = families(family)
    models, with_base, top, per_model = CASES[method]
    config = _config(paths, method, models, with_base, top, per_model)
    out = tmp_path / "merged"
    modelalloy.merge(config, out, threads=1, hash_inputs=False)

    merged = load_file(str(out / "model.safetensors"))
    matrix, vector = CHECKED_BY_FAMILY[family]
    for tensor in (matrix, vector):
        expected = _expected(paths, method, models, with_base, config, tensor)
        torch.testing.assert_close(merged[tensor], expected, rtol=0, atol=0)
    inputs = [load_file(str(paths[m] / "model.safetensors"))[matrix] for m in ["base", *models]]
    assert not any(torch.equal(merged[matrix], x) for x in inputs)  # it really merged

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 17, 33]])).logits
    assert logits.shape == (1, 5, 128) and torch.isfinite(logits).all()


def _plan(paths, method, models, top, per_model, with_base=True):
    return modelalloy.plan_merge(_config(paths, method, models, with_base, top, per_model))


@pytest.mark.parametrize(
    "method, top, per_model, message",
    [
        ("della", {"epsilon": 0.3}, [{"weight": 1.0, "density": 0.2}, {"weight": 1.0, "density": 0.5}], r"density 0\.2 ± epsilon 0\.3 for .*ft_dense leaves \(0, 1\).*epsilon < 0\.2"),
        ("della_linear", {}, [{"weight": 1.0, "density": 0.9}, {"weight": 1.0}], r"density 0\.9 ± epsilon 0\.15 .* use epsilon < 0\.1"),
        ("nearswap", {"t": 0.0}, [{}], r"t=0\.0 must be > 0"),
        ("karcher", {}, [{"weight": 1.0}, {}], r"weight is set for some models but not for .*ft_sparse"),
        ("multislerp", {}, [{"weight": 1.0}, {"weight": -1.0}], r"sum to 0 and normalize_weights is on"),
        ("breadcrumbs", {"gamma": 1.0}, [{"weight": 1.0}, {"weight": 1.0}], r"gamma=1\.0 is outside \[0\.0, 1\.0\)"),
        ("sce", {"select_topk": 0.0}, [{}, {}], r"select_topk=0\.0 is outside \(0\.0, 1\.0\]"),
        ("model_stock", {}, [{}], r"model_stock takes at least 2 model\(s\) besides the base, got 1"),
        ("arcee_fusion", {}, [{}, {}], r"arcee_fusion takes exactly 1 model\(s\) besides the base, got 2"),
        ("ramplus_tl", {"r": -0.1}, [{}], r"r=-0\.1 must be ≥ 0"),
    ],
)
def test_bad_parameters_fail_while_planning(families, method, top, per_model, message):
    paths = families("llama")
    models = ["ft_dense", "ft_sparse", "ft_flip"][: len(per_model)]
    with pytest.raises(ConfigError, match=message) as err:
        _plan(paths, method, models, top, per_model, with_base=method != "karcher")
    assert "\n" not in str(err.value)


def test_della_density_one_needs_no_epsilon_room(families):
    # density 1 prunes nothing, so density + epsilon ≥ 1 is fine there (mergekit agrees).
    paths = families("llama")
    plan, _ = _plan(paths, "della", ["ft_dense", "ft_sparse"], {"epsilon": 0.4}, [{"weight": 1.0}, {"weight": 1.0, "density": 0.5}])
    assert plan.recipes[0].params["density"] == (1.0, 0.5)


def test_sce_accepts_mergekit_configs_normalize_true_only(families):
    # Published mergekit configs for sce often carry `normalize: true`, which mergekit ignores.
    paths = families("llama")
    plan, _ = _plan(paths, "sce", ["ft_dense", "ft_sparse"], {"normalize": True, "select_topk": 0.5}, [{}, {}])
    assert plan.recipes[0].params["normalize"] is True
    with pytest.raises(ConfigError, match="normalize=False cannot be turned off"):
        _plan(paths, "sce", ["ft_dense", "ft_sparse"], {"normalize": False}, [{}, {}])


def test_a_refused_tensor_is_named(families, tmp_path):
    """multislerp cannot average exactly opposite task vectors of 3 models: one line naming the tensor."""
    import shutil

    from safetensors.torch import save_file

    from modelalloy.errors import MergeError

    paths = families("llama")
    base = load_file(str(paths["base"] / "model.safetensors"))
    dense = load_file(str(paths["ft_dense"] / "model.safetensors"))
    made = {}
    for name, sign in (("plus", 1.0), ("minus", -1.0)):
        made[name] = tmp_path / name
        shutil.copytree(paths["base"], made[name])
        tensors = {k: v if k != CHECKED else base[k] + sign * (dense[k] - base[k]) for k, v in base.items()}
        save_file(tensors, str(made[name] / "model.safetensors"), metadata={"format": "pt"})
    config = MergeConfig.model_validate(
        {
            "merge_method": "multislerp",
            "base_model": str(paths["base"]),
            "models": [{"model": str(made["plus"]), "parameters": {"weight": 1.0}}, {"model": str(made["minus"]), "parameters": {"weight": 1.0}}, {"model": str(paths["ft_dense"]), "parameters": {"weight": 0.0}}],
        }
    )
    # ft_dense's own direction has weight 0, so on CHECKED the two others cancel exactly.
    with pytest.raises(MergeError, match=rf"^{CHECKED}: multislerp: the weighted directions of the 3 models cancel out") as err:
        modelalloy.merge(config, tmp_path / "out", threads=1, hash_inputs=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
