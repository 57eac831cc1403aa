"""Checks that need a library hook rather than a subprocess: DELLA's density ±
epsilon range, overflow in the cast to the output dtype, a dangling symlink, duplicate header keys."""

from __future__ import annotations

import os
import warnings

import pytest
from alloy_helpers import copy_model, rewrite_weights, write_config

import modelalloy
from modelalloy.api import plan_merge
from modelalloy.errors import CheckpointError, ConfigError, MergeError
from modelalloy.io.opener import open_checkpoint
from modelalloy.io.safetensors_format import read_header
from modelalloy.methods import REGISTRY


@pytest.fixture()
def della():
    """The real DELLA method: only its parameters matter to the planner here."""
    return REGISTRY.get("della")


def della_config(llama, density: float, epsilon: float) -> dict:
    return {
        "merge_method": "della",
        "base_model": str(llama["base"]),
        "models": [{"model": str(llama["ft_dense"]), "parameters": {"density": 0.5}}, {"model": str(llama["ft_sparse"]), "parameters": {"density": density}}],
        "parameters": {"epsilon": epsilon},
    }


@pytest.mark.parametrize(("density", "epsilon", "limit"), [(0.9, 0.15, "0.1"), (0.1, 0.2, "0.1")])
def test_della_density_plus_minus_epsilon_outside_unit_interval(tmp_path, llama, della, density, epsilon, limit):
    cfg = write_config(tmp_path / "m.yaml", della_config(llama, density, epsilon))
    with pytest.raises(ConfigError, match=rf"density {density:g} ± epsilon {epsilon:g} for .* leaves \(0, 1\).*use epsilon < {limit}"):
        plan_merge(cfg)


def test_della_density_plus_minus_epsilon_inside_is_fine(tmp_path, llama, della):
    plan, _ = plan_merge(write_config(tmp_path / "m.yaml", della_config(llama, 0.8, 0.15)))
    assert plan.recipes[0].params["epsilon"] == (0.15, 0.15)  # per model


def test_overflow_in_the_cast_to_the_output_dtype(tmp_path, llama):
    # 5e4 · (1 + 1) on the norm weights (≈ 1) is 1e5: finite in float32, Inf in float16 (max 65504).
    config = {
        "merge_method": "linear",
        "models": [{"model": str(llama[m]), "parameters": {"weight": 5e4}} for m in ("ft_dense", "ft_sparse")],
        "parameters": {"normalize": False},
        "out_dtype": "float16",
    }
    cfg = write_config(tmp_path / "m.yaml", config)
    with pytest.raises(MergeError, match=r"^model\.layers\.0\.\S+: the linear result overflows float16 \(Inf after the cast\)"):
        modelalloy.merge(cfg, tmp_path / "out", threads=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_dangling_symlink_is_named(tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(CheckpointError, match=r"link: is a symlink to .*gone, which does not exist"):
        open_checkpoint(str(tmp_path / "link"))


def test_duplicate_tensor_names_in_a_header(tmp_path):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = ('{"w":' + entry + ',"w":' + entry + "}").encode()
    (tmp_path / "dup.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match="names 'w' twice"):
        read_header(str(tmp_path / "dup.safetensors"))


def test_input_inf_warns_and_the_inf_it_produces_is_an_error(tmp_path, llama):
    model = copy_model(llama["ft_dense"], tmp_path / "inf")
    rewrite_weights(model, lambda s: s["model.layers.2.mlp.gate_proj.weight"].__setitem__((0, 0), float("inf")))
    config = {"merge_method": "ties", "base_model": str(llama["base"]), "models": [{"model": str(model), "parameters": {"density": 0.3, "weight": 1.0}}, {"model": str(llama["ft_sparse"]), "parameters": {"density": 0.3, "weight": 1.0}}]}
    cfg = write_config(tmp_path / "m.yaml", config)
    # |Inf| is the largest magnitude, so TIES keeps it and the result is not finite.
    with pytest.warns(UserWarning, match=r"input tensors hold NaN or Inf: model\.layers\.2\.mlp\.gate_proj\.weight in .*inf; check those models"):
        with pytest.raises(MergeError, match=r"^model\.layers\.2\.mlp\.gate_proj\.weight: ties produced NaN or Inf"):
            modelalloy.merge(cfg, tmp_path / "out", threads=1)


def _task_vector_config(method: str, *models) -> dict:
    parameters = {"weight": 1.0} | ({} if method == "task_arithmetic" else {"density": 0.3})
    return {"merge_method": method, "base_model": str(models[0]), "models": [{"model": str(m), "parameters": parameters} for m in models[1:]]}


@pytest.mark.parametrize(("method", "poisoned", "value"), [("ties", "base", float("nan")), ("dare_ties", "ft_dense", float("inf"))])
def test_nonfinite_inputs_are_named_when_the_first_pass_finds_them(tmp_path, llama, method, poisoned, value):
    # TIES sees them in its radix select's histograms, DARE-TIES in its ‖δ‖₁ pass: the engine's own
    # check then runs in the second pass, on that tensor only, and names the model.
    models = {m: llama[m] for m in ("base", "ft_dense", "ft_sparse")}
    models[poisoned] = copy_model(llama[poisoned], tmp_path / "poisoned")
    rewrite_weights(models[poisoned], lambda s: s["model.layers.1.self_attn.o_proj.weight"].__setitem__((3, 5), value))
    cfg = write_config(tmp_path / "m.yaml", _task_vector_config(method, *models.values()))
    with pytest.warns(UserWarning, match=r"input tensors hold NaN or Inf: model\.layers\.1\.self_attn\.o_proj\.weight in .*poisoned; check those models"):
        with pytest.raises(MergeError, match=rf"^model\.layers\.1\.self_attn\.o_proj\.weight: {method} produced NaN or Inf"):
            modelalloy.merge(cfg, tmp_path / "out", threads=1)


def test_finite_inputs_whose_difference_overflows_are_not_called_nonfinite(tmp_path, llama):
    # 3e38 − (−3e38) is Inf in float32: the histograms see it, the check of the inputs finds nothing.
    base, tuned = copy_model(llama["base"], tmp_path / "base"), copy_model(llama["ft_dense"], tmp_path / "tuned")
    rewrite_weights(base, lambda s: s["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), 3e38))
    rewrite_weights(tuned, lambda s: s["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), -3e38))
    cfg = write_config(tmp_path / "m.yaml", _task_vector_config("ties", base, tuned))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MergeError, match=r"^model\.layers\.1\.mlp\.up_proj\.weight: ties produced NaN or Inf"):
            modelalloy.merge(cfg, tmp_path / "out", threads=1)
    assert not [w for w in caught if "input tensors hold" in str(w.message)]


def test_finite_inputs_are_not_checked_again_when_the_first_pass_vouches_for_them(tmp_path, llama, monkeypatch):
    from modelalloy.engine.inputs import NonFiniteInputs

    checked: list[str] = []
    real_check = NonFiniteInputs.check
    monkeypatch.setattr(NonFiniteInputs, "check", lambda self, model, tensor, x: checked.append(tensor) or real_check(self, model, tensor, x))
    for method in ("ties", "dare_ties", "task_arithmetic"):
        checked.clear()
        cfg = write_config(tmp_path / f"{method}.yaml", _task_vector_config(method, llama["base"], llama["ft_dense"], llama["ft_sparse"]))
        modelalloy.merge(cfg, tmp_path / method, threads=1)
        # Task arithmetic has no statistics pass: its inputs are checked block by block.
        assert (len(checked) > 0) == (method == "task_arithmetic"), (method, len(checked))
