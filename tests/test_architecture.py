"""The package's shape (ARCHITECTURE.md): layers that import only downward, no import cycle, no
module reaching into another's `_private` names, no module too long to read. Drawn from the
imports themselves (every `import`, including those inside functions), so it cannot drift."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modelalloy"
MAX_LINES = 450

# Bottom to top; a module may import its own layer and the layers below. "" is the package's
# front door (`modelalloy/__init__.py`), which re-exports the library entry points.
LAYERS = [
    ("version", "errors"),
    ("arch", "config", "io", "methods"),
    ("plan",),
    ("engine",),
    ("api", "inmemory", ""),
    ("compose", "evaluate", "analyze", "search", "report", "stats", "verify", "study"),
    ("apps",),
    ("cli",),
]


def _modules() -> dict[str, Path]:
    modules = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = file
    return modules


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ours that an imported dotted name lives in (a package's `__init__` for a name it defines)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of ours in `module`."""
    file = MODULES[module]
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found += [(owner, None, node.lineno) for a in node.names if (owner := _owner(a.name)) and a.name.startswith("modelalloy")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("modelalloy"):
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                owner = full if full in MODULES else _owner(base)
                found.append((owner, None if full in MODULES else a.name, node.lineno))
    return [(owner, name, line) for owner, name, line in found if owner and owner != module]


def _where(module: str) -> str:
    file = MODULES[module]
    return str(file.relative_to(PACKAGE.parent)) if file.is_relative_to(PACKAGE.parent) else file.name


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_architecture.py; add its package there (and to ARCHITECTURE.md)")


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)


def test_every_import_of_ours_names_a_module_that_exists():
    """A lazy import of a module that moved fails only when its command runs: find it here."""
    dangling = []
    for m, file in MODULES.items():
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            dangling += [f"{_where(m)}:{node.lineno} imports {n}" for n in names if n.startswith("modelalloy") and n not in MODULES]
    assert not dangling, "\n".join(dangling)


def test_imports_point_down_the_layers():
    upward = [
        f"{_where(m)}:{line} imports {target} (layer {_layer(target)} above {_layer(m)})"
        for m in MODULES
        for target, _, line in _imports(m)
        if _layer(target) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in _imports(m)} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{_where(m)}:{line} imports {name} from {target}"
        for m in MODULES
        for target, name, line in _imports(m)
        if name is not None and name.startswith("_") and not name.startswith("__")
    ]
    assert not private, "\n".join(private)


def test_no_module_is_too_long_to_read():
    long = {str(f.relative_to(PACKAGE.parent)): n for f in MODULES.values() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_checks_see_a_planted_violation(tmp_path, monkeypatch):
    """The graph is real: a made-up upward import, cycle and private import are all found."""
    fake = {"modelalloy.io.fake": tmp_path / "fake.py", "modelalloy.cli.fake": tmp_path / "clifake.py"}
    fake["modelalloy.io.fake"].write_text("from modelalloy.cli.fake import _helper\n")
    fake["modelalloy.cli.fake"].write_text("import modelalloy.io.fake\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {**MODULES, **fake})
    assert _imports("modelalloy.io.fake") == [("modelalloy.cli.fake", "_helper", 1)]
    with pytest.raises(AssertionError, match="fake.py:1 imports modelalloy.cli.fake"):
        test_imports_point_down_the_layers()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="imports _helper"):
        test_no_module_imports_another_modules_private_names()
