"""The package's imports go one way. The README's code map is the declaration: its rows list every module in the order
data flows, and a module imports only from its own row and the rows above it; the import graph has no cycle. Imports
inside functions count as much as those at the top of a module: a cycle that only closes at run time still ties two
modules together.

A new module gets a place in the code map; a failure here names the import that breaks the order.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "edsr_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def code_map_rows() -> list[list[str]]:
    """The code map's rows, top to bottom, as the module names (or ``package.`` prefixes) in their first cell."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Code map\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names = []
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            path = token if token.startswith("edsr_ray/") else f"edsr_ray/{token}"
            if token.endswith("/") and token.startswith("edsr_ray/"):
                names.append(path.rstrip("/").replace("/", ".") + ".")
            elif token.endswith(".py"):
                names.append(path.removesuffix(".py").replace("/", "."))
        if names:
            rows.append(names)
    return rows


def row_of(module: str, rows: list[list[str]]) -> int | None:
    if module == "edsr_ray":
        return -1  # the package itself: its version string, importable by all
    for i, names in enumerate(rows):
        if any(module == n or (n.endswith(".") and (module + ".").startswith(n)) for n in names):
            return i
    return None


def internal_imports(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function (``from edsr_ray import x`` is x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from edsr_ray import storage`` imports a module; ``from edsr_ray.config import X`` a name of one.
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def third_party_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found - {"edsr_ray", "__future__"}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: internal_imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_the_code_map_places_every_module(graph):
    rows = code_map_rows()
    assert [m for m in sorted(graph) if row_of(m, rows) is None] == [], "give each new module a row in the code map"
    named = [n for names in rows for n in names if not n.endswith(".")]
    assert [n for n in named if n not in graph] == [], "the code map names modules that do not exist"


def test_imports_never_point_down_the_code_map(graph):
    rows = code_map_rows()
    later = [
        f"{mod} (row {row_of(mod, rows) + 1}) imports {dep} (row {row_of(dep, rows) + 1})"
        for mod, deps in sorted(graph.items())
        for dep in sorted(deps)
        if row_of(dep, rows) > row_of(mod, rows)
    ]
    assert later == []


def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph[mod] - {"edsr_ray"}):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[mod] = 2
        return None

    for mod in sorted(graph):
        if mod not in state:
            cycle = visit(mod)
            assert cycle is None, " -> ".join(cycle)


def test_networks_need_torch_and_their_config_only():
    path = modules()["edsr_ray.models"]
    assert internal_imports(path, set(modules())) - {"edsr_ray.models"} <= {"edsr_ray.config", "edsr_ray.errors"}
    stdlib = {"dataclasses", "logging", "math", "typing", "collections"}
    assert third_party_imports(path) - stdlib <= {"torch"}


def test_the_foundations_and_the_manifest_do_not_import_ray():
    for name in ("edsr_ray.errors", "edsr_ray.storage", "edsr_ray.home", "edsr_ray.config", "edsr_ray.manifest"):
        assert "ray" not in third_party_imports(modules()[name]), name
