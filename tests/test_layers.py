"""Imports run downward only: no module imports from a layer above its own (function-level
imports included), and call_delegate does not import the lowered module it calls."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nativert"

# Bottom up. A module may import from its own layer and those below it.
LAYERS = [
    (
        "nativert.errors",
        "nativert._version",
        "nativert._program",
        "nativert.models",
        "nativert._quiet",
        "nativert.quantize",  # torchao's PT2E flow: torch and torchao only
    ),
    ("nativert.delegate",),
    ("nativert.settings",),
    ("nativert.call_delegate", "nativert._dynamo_hop", "nativert.lowered"),
    ("nativert.passes",),
    ("nativert.partitioner",),
    ("nativert.backend",),
    ("nativert.serve",),
    ("nativert.cli", "nativert.__main__"),
]


def layer_of(module: str) -> int:
    if module == "nativert":  # the package root re-exports every layer: only the top uses it
        return len(LAYERS) - 1
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "nativert":  # the package root re-exports everything
            found.append((name, path))
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "nativert" or n.startswith("nativert.")}


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_only_run_downward(module, path):
    rank = layer_of(module)
    for imported in imports(path):
        assert layer_of(imported) <= rank, (
            f"{module} (layer {rank}) imports {imported} (layer {layer_of(imported)})"
        )


def test_call_delegate_does_not_import_the_lowered_module():
    assert "nativert.lowered" not in imports(PACKAGE / "call_delegate.py")
