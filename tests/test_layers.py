"""The core's subpackages are stacked in the order data flows; each imports only those
below it, and nothing in the core imports Ray, jobs/ or benchmarks/."""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "t2v_core"
STACK = ["storage", "lease", "zoo", "embedding", "matrix", "recommend", "review"]
FORBIDDEN = ("ray", "jobs", "benchmarks")


def _layer(path: Path) -> str:
    rel = path.relative_to(CORE)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "root"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "t2v_core":
                names.update(f"t2v_core.{alias.name}" for alias in node.names)
    return names


MODULES = sorted(p for p in CORE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(CORE)))
def test_each_module_imports_only_layers_below_its_own(path):
    layer = _layer(path)
    if layer == "root":
        return
    own = STACK.index(layer)
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{path.name} imports {name}"
        if top != "t2v_core" or name == "t2v_core":
            continue
        target = name.split(".")[1]
        if target == "__version__":
            continue
        assert target in STACK, f"{path.name} imports {name}, which is in no layer"
        assert STACK.index(target) <= own, (
            f"{path.relative_to(CORE)} ({layer}) imports {name}, a layer above it"
        )


def test_every_core_module_sits_in_a_layer():
    assert {_layer(p) for p in MODULES} <= set(STACK) | {"root"}
