"""Issue #21, part three: configs copied from published model cards, which mergekit runs. A
parameter another method takes is a warning (an error with --strict), `revision:` is accepted,
`modules:` is refused with what to write instead, and `compute_dtype: float16` reproduces
mergekit's float16 arithmetic bit for bit (TIES, Breadcrumbs, task arithmetic)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from alloy_helpers import alloy_env, invoke as alloy, one_error, warning_lines, write_config
from safetensors.torch import load_file

# --- parameters that mergekit ignores: a warning naming them, an error with --strict


def _published(llama, method: str) -> tuple[dict, str]:
    base, a, b = (str(llama[k]) for k in ("base", "ft_dense", "ft_flip"))
    if method == "della_linear":  # int8_mask is a TIES/DELLA option; della_linear has no sign election
        return {"merge_method": "della_linear", "base_model": base, "models": [{"model": m, "parameters": {"density": 0.5, "epsilon": 0.1, "weight": 0.5}} for m in (a, b)], "parameters": {"int8_mask": True, "normalize": True}}, "int8_mask"
    if method == "sce":  # lambda belongs to the task-vector family
        return {"merge_method": "sce", "base_model": base, "models": [{"model": a}, {"model": b}], "parameters": {"select_topk": 0.8, "lambda": 1.0}}, "lambda"
    # model_stock weighs nothing: a per-model weight is copied from linear configs
    return {"merge_method": "model_stock", "base_model": base, "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (a, b)]}, "weight"


@pytest.mark.parametrize("method", ["della_linear", "sce", "model_stock"])
def test_a_parameter_of_another_method_is_a_warning(tmp_path, llama, method):
    config, name = _published(llama, method)
    cfg = write_config(tmp_path / "published.yaml", config)
    planned = alloy("plan", cfg)
    assert planned.exit_code == 0, planned.output
    found = [w for w in warning_lines(planned) if f"{name!r} is not a parameter of {method}" in w]
    assert len(found) == 1 and "ignored, as mergekit ignores it" in found[0] and "--strict" in found[0], planned.stderr
    merged = alloy("merge", cfg, tmp_path / "out", "-q")
    assert merged.exit_code == 0, merged.output
    for command in (["plan", cfg, "--strict"], ["merge", cfg, tmp_path / "strict-out", "--strict"]):
        one_error(alloy(*command), f"unknown parameter {name!r} for {method}", "a parameter of other methods", "drop --strict")
    assert not (tmp_path / "strict-out").exists()


def test_a_misspelled_parameter_is_still_an_error(tmp_path, llama):
    config, _ = _published(llama, "della_linear")
    config["parameters"] = {"int8_msk": True}
    cfg = write_config(tmp_path / "typo.yaml", config)
    one_error(alloy("plan", cfg), "unknown parameter 'int8_msk' for della_linear")
    config["parameters"] = {"normalise": True}
    one_error(alloy("plan", write_config(tmp_path / "typo.yaml", config)), "unknown parameter 'normalise'", "did you mean 'normalize'")


# --- revision: on a model reference


@pytest.mark.parametrize(
    "entry",
    [
        lambda m: {"model": f"{m}@main"},
        lambda m: {"model": {"model": {"path": str(m), "revision": "main"}}},
        lambda m: {"model": {"path": str(m), "revision": "main"}},
        lambda m: {"model": str(m), "revision": "main"},
    ],
    ids=["at-string", "model-path-dict", "path-dict", "revision-key"],
)
def test_revision_on_a_local_model_is_accepted_and_ignored(tmp_path, llama, entry):
    config = {"merge_method": "linear", "models": [{"model": str(llama["base"]), "parameters": {"weight": 0.5}}, {**entry(llama["ft_dense"]), "parameters": {"weight": 0.5}}]}
    result = alloy("plan", write_config(tmp_path / "rev.yaml", config))
    assert result.exit_code == 0, result.output
    assert any(f"{llama['ft_dense']} is a local directory; its revision 'main' is ignored" in w for w in warning_lines(result)), result.stderr


def test_revision_of_a_cached_hub_model_resolves_offline(tmp_path, llama):
    """An id in the local Hugging Face cache at a branch: that snapshot, never a download."""
    repo = tmp_path / "hub" / "models--org--tiny"
    commits = {"main": "1" * 40, "v2": "2" * 40}
    (repo / "refs").mkdir(parents=True)
    for branch, source in (("main", "ft_dense"), ("v2", "ft_flip")):
        shutil.copytree(llama[source], repo / "snapshots" / commits[branch])
        (repo / "refs" / branch).write_text(commits[branch])
    config = {"merge_method": "linear", "models": [{"model": str(llama["base"]), "parameters": {"weight": 0.5}}, {"model": {"model": {"path": "org/tiny", "revision": "v2"}}, "parameters": {"weight": 0.5}}]}
    cfg = write_config(tmp_path / "rev.yaml", config)
    env = alloy_env(HF_HUB_CACHE=str(tmp_path / "hub"))
    run = subprocess.run([sys.executable, "-m", "modelalloy.cli", "merge", str(cfg), str(tmp_path / "out"), "-q"], capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`org/tiny@v2`" in card and commits["v2"] in card
    config["models"][1]["model"]["model"]["revision"] = "v3"
    run = subprocess.run([sys.executable, "-m", "modelalloy.cli", "plan", str(write_config(cfg, config))], capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 2 and "not in the local Hugging Face cache at revision 'v3'" in run.stderr and "--revision v3" in run.stderr, run.stderr


# --- modules: refused, saying what to write instead


def test_modules_is_refused_with_what_to_write_instead(tmp_path, llama):
    config = {
        "merge_method": "linear",
        "modules": {
            "text_decoder": {"models": [{"model": str(llama["ft_dense"]), "parameters": {"weight": 0.5}}, {"model": str(llama["ft_flip"]), "parameters": {"weight": 0.5}}]},
            "vision_tower": {"models": [{"model": str(llama["ft_dense"]), "parameters": {"weight": 1.0}}]},
        },
    }
    one_error(alloy("plan", write_config(tmp_path / "vlm.yaml", config)), "modules", "is not supported", "write one top-level models list", "filter lists", "docs/config.md")


# --- compute_dtype: mergekit's float16 arithmetic, bit for bit


def mergekit_float16(method: str, base: torch.Tensor, thetas: list[torch.Tensor], weights: list[float], densities: list[float], gamma: float = 0.01) -> torch.Tensor:
    """What mergekit computes for a float16 config (METHODS.md's formulas in its operation order,
    every tensor in float16): δ = θ − θ₀, the magnitude or outlier cut (ties at the cut taken in
    index order, where mergekit's argsort leaves the order unspecified), weights as a float16
    tensor, sums over the stacked models, the divisor's zeros set to 1."""
    base = base.half()
    kept = []
    for theta, density in zip(thetas, densities):
        delta = theta.half() - base
        n = delta.numel()
        order = torch.sort(delta.abs().reshape(-1).float(), descending=True, stable=True).indices
        first = int(gamma * n) if method.startswith("breadcrumbs") else 0
        mask = torch.zeros(n, dtype=torch.float16)
        mask[order[first : first + int(density * n)] if method != "task_arithmetic" else order] = 1
        kept.append(delta * mask.reshape(delta.shape))
    deltas = torch.stack(kept)
    w = torch.tensor(weights, dtype=torch.float16).reshape(-1, *[1] * base.dim())
    weighted = deltas * w
    if method in ("ties", "breadcrumbs_ties"):
        majority = (weighted.sum(dim=0) >= 0).to(torch.float16) * 2 - 1
        agree = weighted.sign() == majority
        mixed, divisor = (weighted * agree).sum(dim=0), (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        if method == "ties":  # normalize defaults on for ties, off for breadcrumbs_ties
            mixed = mixed / divisor
    else:
        mixed = weighted.sum(dim=0)
    return base + mixed


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic"])
def test_compute_dtype_float16_is_mergekits_arithmetic(tmp_path, llama, method):
    models = [llama["ft_dense"], llama["ft_sparse"], llama["ft_flip"]]
    weights, densities = [0.3, 0.7, 0.45], [0.5, 0.4, 0.6]
    config = {
        "merge_method": method,
        "base_model": str(llama["base"]),
        "dtype": "float16",
        "models": [{"model": str(m), "parameters": {"weight": w} | ({"density": d} if method != "task_arithmetic" else {})} for m, w, d in zip(models, weights, densities)],
    }
    outputs = {}
    for compute in ("float16", None):
        cfg = write_config(tmp_path / f"{compute}.yaml", config | ({"compute_dtype": compute} if compute else {}))
        result = alloy("merge", cfg, tmp_path / str(compute), "-q")
        assert result.exit_code == 0, result.output
        outputs[compute] = load_file(tmp_path / str(compute) / "model.safetensors")
    base = load_file(llama["base"] / "model.safetensors")
    inputs = [load_file(m / "model.safetensors") for m in models]
    differ = total = 0
    largest = 0.0
    for name, exact in outputs["float16"].items():
        expected = mergekit_float16(method, base[name], [x[name] for x in inputs], weights, densities)
        assert torch.equal(exact, expected), name  # bit for bit
        moved = outputs[None][name] != exact
        differ, total = differ + int(moved.sum()), total + moved.numel()
        largest = max(largest, float((outputs[None][name].float() - exact.float()).abs().max()))
    # The default computes in float32 and rounds once: some entries move (here, with tiny random
    # deltas, far more than the ~0.2 % of real checkpoints), a few pruning cuts fall elsewhere.
    assert 0 < differ < total and largest < 0.1, (differ, total, largest)


def test_compute_dtype_float16_is_refused_for_a_method_that_needs_float32(tmp_path, llama):
    config = {"merge_method": "tsv", "base_model": str(llama["base"]), "models": [{"model": str(llama["ft_dense"])}, {"model": str(llama["ft_flip"])}], "compute_dtype": "float16"}
    one_error(alloy("plan", write_config(tmp_path / "tsv.yaml", config)), "compute_dtype", "tsv cannot compute in float16", "remove compute_dtype")
    config["compute_dtype"] = "int64"
    one_error(alloy("plan", write_config(tmp_path / "tsv.yaml", config)), "compute_dtype 'int64' is not one of")
