"""The package's layout, read from its imports (those inside functions too): no import circle, and
a lower layer never imports a higher one (docs/architecture.md draws the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "evit_deploy"
# Lowest first. A module may import its own layer and those below it.
LAYERS = (
    ("version", "errors", "interrupt", "stats", "install", "precisions", "fileio"),
    ("model", "data"),
    ("preprocess", "metadata"),
    ("export",),
    ("engines",),
    ("runtime",),
    ("bench", "analysis", "serve", "client", "doctor"),
    ("cli", "__main__"),
)
FACADE = "evit_deploy"  # the package's __init__: hands out Predictor lazily, part of no layer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every evit_deploy module `path` imports, anywhere in it (ImportFrom names resolved to
    submodules where they are modules)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("evit_deploy"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, *([base] if base else [])])
            if not base.startswith("evit_deploy"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if module_path(candidate) else base)
    return found


def module_path(name: str) -> Path | None:
    relative = Path(*name.split("."))
    for path in (PACKAGE.parent / relative.with_suffix(".py"), PACKAGE.parent / relative / "__init__.py"):
        if path.is_file():
            return path
    return None


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path, name) if m in modules and m != name} for name, path in modules.items()}


def layer_of(name: str) -> int | None:
    top = name.split(".")[1] if "." in name else None
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    return None


def test_every_module_has_a_layer():
    assert [name for name in graph() if name != FACADE and layer_of(name) is None] == []


def test_no_lower_layer_imports_a_higher_one():
    upward = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name, targets in graph().items() if name != FACADE
        for target in targets if target != FACADE and layer_of(target) > layer_of(name)
    ]
    assert upward == []


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


@pytest.mark.parametrize("folder", ["cli"])
def test_no_file_of_the_cli_is_over_500_lines(folder):
    long = {p.name: n for p in (PACKAGE / folder).glob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
