"""The package's imports go one way: every module has a layer, imports point at the same layer or below, and the
import graph has no cycle. Imports inside functions count as much as those at the top of a module: a cycle that
only closes at run time still ties two modules together.

A new module gets a line in :data:`LAYERS`; a test failure here names the import that breaks the order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "edsr_ray"

# Bottom to top: what each layer may build on is everything at its own layer or below.
LAYERS: dict[str, int] = {
    # Foundations: exceptions, locations and bytes, the project home, typed configs.
    "edsr_ray": 0,
    "edsr_ray.errors": 0,
    "edsr_ray.storage": 1,
    "edsr_ray.home": 1,
    "edsr_ray.config": 2,
    # Infrastructure: the Ray connection, server processes, the commands' helper. Knows nothing of images or models.
    "edsr_ray.infra": 3,
    "edsr_ray.infra.processes": 3,
    "edsr_ray.infra.ray": 3,
    "edsr_ray.cli": 3,
    "edsr_ray.samples": 3,
    "edsr_ray.infra.objectstore": 4,
    "edsr_ray.infra.localcluster": 4,
    "edsr_ray.infra.launcher": 4,
    # Pixels, networks, numbers, records.
    "edsr_ray.codecs": 5,
    "edsr_ray.imaging": 5,
    "edsr_ray.metrics": 5,
    "edsr_ray.models": 6,
    "edsr_ray.tracking": 6,
    "edsr_ray.manifest": 6,
    "edsr_ray.weights": 7,
    "edsr_ray.inference": 8,
    # The product: ingest, training, batch upscaling, evaluation, serving.
    "edsr_ray.ingest": 9,
    "edsr_ray.batch": 9,
    "edsr_ray.batch.inputs": 9,
    "edsr_ray.batch.stages": 9,
    "edsr_ray.batch.reports": 9,
    "edsr_ray.batch.job": 9,
    "edsr_ray.evaluation": 9,
    "edsr_ray.evaluation.sets": 9,
    "edsr_ray.evaluation.report": 9,
    "edsr_ray.evaluation.scoring": 9,
    "edsr_ray.evaluation.run": 9,
    "edsr_ray.serving": 9,
    "edsr_ray.training": 9,
    "edsr_ray.training.patches": 9,
    "edsr_ray.training.batches": 9,
    "edsr_ray.training.update": 9,
    "edsr_ray.training.checkpoints": 9,
    "edsr_ray.training.loop": 9,
    "edsr_ray.training.run": 9,
    "edsr_ray.quickstart": 10,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


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


def test_every_module_has_a_layer(graph):
    assert sorted(set(graph) - set(LAYERS)) == [], "give each new module a layer in LAYERS"
    assert sorted(set(LAYERS) - set(graph)) == [], "LAYERS names modules that do not exist"


def test_imports_never_point_up(graph):
    upward = [
        f"{mod} (layer {LAYERS[mod]}) imports {dep} (layer {LAYERS[dep]})"
        for mod, deps in sorted(graph.items())
        for dep in sorted(deps)
        if dep != "edsr_ray" and LAYERS[dep] > LAYERS[mod]
    ]
    assert upward == []


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


def test_the_foundations_do_not_import_ray():
    for name in ("edsr_ray.errors", "edsr_ray.storage", "edsr_ray.home", "edsr_ray.config"):
        assert "ray" not in third_party_imports(modules()[name]), name
