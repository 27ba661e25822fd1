"""The package's shape: no import cycles between coopnets modules, and the registry is a leaf.

Edges are every ``import``/``from ... import`` of a coopnets module anywhere in a file
(function-level imports and ``if TYPE_CHECKING:`` blocks included), resolved to the
module file they load: ``from ..models import create_model`` is an edge to
``coopnets.models`` (its ``__init__``), ``from ..models import plans`` one to
``coopnets.models.plans``.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import coopnets

ROOT = Path(coopnets.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str) -> Set[str]:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("coopnets"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("coopnets"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in MODULES else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES and m != name}


def import_cycles() -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {m: imports_of(m) for m in MODULES}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def test_no_import_cycles():
    assert import_cycles() == []


def test_cycle_finder_sees_function_level_and_type_checking_imports():
    assert "coopnets.hub.load" in imports_of("coopnets.models._builder")  # module level
    assert "coopnets.models.depth_adaptive" in imports_of("coopnets.inference.budget")  # under TYPE_CHECKING
    assert "coopnets.train.sweep" in imports_of("coopnets.train.run")


def test_model_side_never_imports_inference_hub_train_or_cli():
    model_side = ("coopnets.models.depth_adaptive", "coopnets.models.plans", "coopnets.models.plans.base",
                  "coopnets.models.plans.exits", "coopnets.models.plans.blocks", "coopnets.models.plans.exit_points",
                  "coopnets.models.runners", "coopnets.models.runners.base", "coopnets.models.runners.layout",
                  "coopnets.models.runners.segments", "coopnets.models.runners.intermediates",
                  "coopnets.models.layouts", "coopnets.models.exit_head", "coopnets.models._registry")
    for name in model_side:
        assert not any(m.startswith(("coopnets.inference", "coopnets.hub", "coopnets.train", "coopnets.cli"))
                       for m in imports_of(name)), name


def test_registry_is_a_leaf():
    assert imports_of("coopnets.models._registry") == set()


def test_runners_never_import_plans_or_the_model():
    """Runners are below the plans: a plan chooses its runner, never the other way round."""
    for name in ("coopnets.models.runners.base", "coopnets.models.runners.layout",
                 "coopnets.models.runners.segments", "coopnets.models.runners.intermediates"):
        assert not any(m.startswith(("coopnets.models.plans", "coopnets.models.depth_adaptive")) for m in imports_of(name)), name


def test_no_module_outside_the_plans_tests_a_plan_type_or_option():
    """One home for a plan's choices: nothing outside ``models/plans/`` branches on a plan class or option string."""
    import re
    from pathlib import Path

    root = Path(coopnets.__file__).parent
    pattern = re.compile(r"isinstance\([^)]*(ExitsPlan|BlocksPlan|DepthPlan)|exit_points\s*==|\.plan\s*==|getattr\(self\.depth_plan")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "plans" not in p.parts and pattern.search(p.read_text())]
    assert offenders == []
