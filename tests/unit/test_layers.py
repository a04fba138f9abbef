"""The package's layers (README "Layout"): every import, lazy ones inside functions included, points
to a lower layer or stays inside its own component."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "plumage_ds"

LAYERS = [
    {"kernels"},
    {"estimators"},
    {"schema"},
    {"config", "io", "targets"},
    {"distributed"},
    {"optim"},
    {"integrations"},
    {"train"},
    {"cli", "testing"},
    {"__main__", "__init__"},
]
"""Components from the bottom up: a module may import from the components of lower layers and from
its own component, nothing else (README "Layout")."""

MAX_LINES = 650


def _component(module: str) -> str:
    """``plumage_ds.optim.base`` → ``optim``; ``plumage_ds`` → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(component: str) -> int:
    for i, layer in enumerate(LAYERS):
        if component in layer:
            return i
    raise AssertionError(f"component {component!r} is in no layer of LAYERS: add it to the README's list and here")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every package import in ``path`` (anywhere in the file)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "plumage_ds"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "plumage_ds":
                out.append((node.lineno, target))
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path: Path) -> None:
    mine = _component(_module_name(path))
    bad = []
    for line, target in _imports(path):
        theirs = _component(target)
        if theirs != mine and _layer(theirs) >= _layer(mine):
            bad.append(f"line {line}: {target} (layer {_layer(theirs)}) from {mine} (layer {_layer(mine)})")
    assert not bad, "imports against the layer list:\n" + "\n".join(bad)


def test_the_layer_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker resolves relative imports and finds the ones inside functions."""
    fake = PACKAGE / "optim" / "base.py"
    found = dict((t, n) for n, t in _imports(fake))
    assert "plumage_ds.distributed.layouts" in found  # a relative import, resolved
    assert _component("plumage_ds.distributed.layouts") == "distributed" and _layer("distributed") < _layer("optim")
    lazy = [t for _, t in _imports(PACKAGE / "optim" / "composite.py")]
    assert "plumage_ds.optim.factory" in lazy  # imported inside __init__


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_the_size_limit(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (> {MAX_LINES}): split it by concern"
