"""The package shows its architecture: every import points down the list of layers, and no module
imports itself back through others. Type-only imports (`if TYPE_CHECKING:`) do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "shrink"

# Lowest first. A module may import its own package and any package of a lower layer.
LAYERS: list[set[str]] = [
    {"errors", "config", "registry", "modeling_shrink", "modeling_shrink_attention"},
    {"linalg", "hardware", "data"},
    {"models"},
    {"quantization", "sparsity"},
    {"planning"},
    {"blocks"},
    {"methods", "heal"},
    {"checkpoints"},
    {"evaluation"},
    {"run"},
    {"api", "__init__", "__main__"},
]
TOP_LEVEL_FILES = {
    "errors",
    "config",
    "registry",
    "modeling_shrink",
    "modeling_shrink_attention",
    "api",
    "__init__",
    "__main__",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The shrink modules `name` imports at run time (at module level or inside functions)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                target = f"{source}.{alias.name}"
                found.add(target if target in known else source)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if part in names)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_every_import_points_down_the_layers():
    upward = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
        or (
            layer_of(target) == layer_of(module)
            and target.split(".")[:2] != module.split(".")[:2]
            and layer_of(module) > 0
        )
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    circles: list[str] = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(
                    " -> ".join(trail[trail.index(nxt) :] + [node, nxt])
                    if nxt in trail
                    else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                walk(nxt, trail + [node])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            walk(start, [])
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_top_level_holds_no_loose_concern(path: Path):
    assert path.stem in TOP_LEVEL_FILES, f"{path.name} belongs in one of the subpackages"


def test_the_architecture_page_names_every_module():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py" and path.name not in page
    ]
    packages = [
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and f"{p.name}/" not in page
    ]
    assert not missing and not packages, f"docs/architecture.md does not name {missing + packages}"


def test_the_readme_is_an_entry_page():
    assert len((PACKAGE.parent / "README.md").read_text().splitlines()) <= 250
