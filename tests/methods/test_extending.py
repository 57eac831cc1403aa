"""Third-party methods through the `modelalloy.methods` entry-point group, and `alloy methods`.

The plugin is a real distribution on sys.path (a package plus a .dist-info with entry_points.txt),
found by importlib.metadata exactly as an installed one would be; nothing is installed.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import modelalloy
import modelalloy.methods as methods_pkg
from modelalloy.cli import app
from modelalloy.config import MergeConfig
from modelalloy.errors import ConfigError
from modelalloy.methods import REGISTRY, Param, Registry, build_registry, merge_method

PLUGIN_SOURCE = '''
from modelalloy.methods import Param, merge_method


@merge_method(
    "{name}",
    params=[Param("shift", default=0.0, doc="added to every entry")],
    base="required",
    min_models=1,
    max_models=1,
    reference="https://example.org/midpoint",
    vs_mergekit="not in mergekit",
)
def midpoint(tensors, *, base, shift):
    """Halfway between the base and the model, shifted."""
    return (base + tensors[0]) / 2 + shift


not_a_method = 42
'''


def _install_plugin(tmp_path, monkeypatch, *, method_name: str, entry: str = "midpoint") -> None:
    """A distribution 'alloy-demo-plugin' on sys.path whose entry point names the plugin's object."""
    site = tmp_path / "site"
    (site / "alloy_demo_plugin").mkdir(parents=True)
    (site / "alloy_demo_plugin" / "__init__.py").write_text(PLUGIN_SOURCE.format(name=method_name))
    info = site / "alloy_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: alloy-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[modelalloy.methods]\n{method_name} = alloy_demo_plugin:{entry}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(__import__("sys").modules, "alloy_demo_plugin", raising=False)
    importlib.invalidate_caches()


def test_a_plugin_method_is_registered_and_merges(tmp_path, monkeypatch, families):
    _install_plugin(tmp_path, monkeypatch, method_name="demo_midpoint")
    registry = build_registry()
    assert "demo_midpoint" in registry and "ties" in registry
    monkeypatch.setattr(methods_pkg, "REGISTRY", registry)  # what importing with the plugin installed gives

    paths = families("llama")
    config = MergeConfig.model_validate(
        {
            "merge_method": "demo_midpoint",
            "base_model": str(paths["base"]),
            "models": [{"model": str(paths["ft_dense"])}],
            "parameters": {"shift": 0.25},
            "dtype": "float32",
        }
    )
    out = tmp_path / "merged"
    modelalloy.merge(config, out, threads=1)
    name = "model.layers.0.self_attn.q_proj.weight"
    base = load_file(str(paths["base"] / "model.safetensors"))[name]
    other = load_file(str(paths["ft_dense"] / "model.safetensors"))[name]
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))[name], (base + other) / 2 + 0.25, rtol=0, atol=0)

    # and it is listed like any other method
    result = CliRunner().invoke(app, ["methods", "demo_midpoint"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Halfway between the base and the model, shifted." in result.output
    assert "https://example.org/midpoint" in result.output


def test_a_plugin_reusing_a_name_is_an_error(tmp_path, monkeypatch):
    _install_plugin(tmp_path, monkeypatch, method_name="ties")
    with pytest.raises(ConfigError, match=r"entry point 'ties' \(alloy_demo_plugin:midpoint\) registers merge method 'ties', which already exists"):
        build_registry()


def test_a_plugin_entry_that_is_not_a_method_is_an_error(tmp_path, monkeypatch):
    _install_plugin(tmp_path, monkeypatch, method_name="demo_bad", entry="not_a_method")
    with pytest.raises(ConfigError, match=r"'demo_bad' \(alloy_demo_plugin:not_a_method\) .* is not a MergeMethod; decorate it"):
        build_registry()


def test_registry_refuses_duplicates_and_bad_declarations():
    registry = Registry()
    registry.add(REGISTRY.get("linear"))
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(REGISTRY.get("linear"))
    with pytest.raises(ConfigError, match=r"density=2\.0 is outside"):  # a default outside its own range
        merge_method("bad", params=[Param("density", default=2.0, check=REGISTRY.get("ties").param("density").check)])
    with pytest.raises(ValueError, match="declares a parameter twice"):
        merge_method("bad", params=[Param("t"), Param("t")])


runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich fixes the console width when it is created; a wide one keeps table rows on one line."""
    from rich.console import Console

    from modelalloy.cli import common

    monkeypatch.setattr(common, "out", Console(width=400))


def test_alloy_methods_lists_every_method_with_parameters_defaults_base_rule_and_reference():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip().rstrip(" †"): line for line in result.output.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()}
    assert set(REGISTRY.names()) <= set(rows)
    for method in REGISTRY:
        row = rows[method.name]
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells[1] == method.base
        for p in method.params:
            assert (f"{p.name}*" if p.required else f"{p.name}={p.default!r}") in cells[3]
        assert cells[5] == method.reference
        assert row.split("│")[1].strip().endswith("†") == bool(method.vs_mergekit)
    assert "gamma=0.01" in rows["breadcrumbs"] and "epsilon=0.15" in rows["della"] and "t*" in rows["nearswap"]


@pytest.mark.parametrize("name", ["breadcrumbs", "karcher", "arcee_fusion", "della"])
def test_alloy_methods_name_shows_the_mergekit_difference(name):
    method = REGISTRY.get(name)
    result = runner.invoke(app, ["methods", name], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"reference: {method.reference}" in text
    assert f"base model: {method.base}" in text
    assert "differs from mergekit: " + " ".join(method.vs_mergekit.split()) in text
    for p in method.params:
        line = next(line for line in result.output.splitlines() if line.startswith(f"│ {p.name} "))
        assert ("per-model" if p.per_model else "global") in line and ("required" if p.required else repr(p.default)) in line


def test_alloy_methods_unknown_name_is_one_line_with_a_suggestion():
    result = runner.invoke(app, ["methods", "dela"])
    assert result.exit_code == 2
    assert "unknown method 'dela' (did you mean 'della'" in " ".join(result.output.split())
