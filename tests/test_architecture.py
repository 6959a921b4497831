"""The layout rules of docs/architecture.md, checked on the source: small units, no import cycle, imports only go
down the layers, and every event is fired on its own line in the loop package."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

from conftest import ROOT
from super_trainer.callbacks.base import EVENTS

PACKAGE = ROOT / "super_trainer"

#: (importer prefix, modules it must never import): docs/architecture.md "Import rules".
NEVER = [
    ("super_trainer.loop", ("super_trainer.trainer", "super_trainer.building", "super_trainer.recipes",
                            "super_trainer.cli")),
    ("super_trainer.recipes", ("super_trainer.trainer",)),
    ("super_trainer.callbacks", ("super_trainer.loop", "super_trainer.trainer", "super_trainer.building")),
    ("super_trainer.checkpoint", ("super_trainer.loop", "super_trainer.callbacks")),
    ("super_trainer.rng", ("super_trainer.loop", "super_trainer.callbacks")),
    ("super_trainer.context", ("super_trainer",)),
] + [(library, ("super_trainer.loop", "super_trainer.callbacks", "super_trainer.building", "super_trainer.trainer",
                "super_trainer.recipes", "super_trainer.cli"))
     for library in ("super_trainer.metrics", "super_trainer.registry", "super_trainer.fsdp", "super_trainer.sharding")]


def _modules() -> Dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for candidate in [target] + [f"{target}.{alias.name}" for alias in node.names]:
                if candidate in modules and candidate != name:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
    # a package's __init__ importing its own children is not a dependency of the children on the package
    return {dep for dep in found if not dep.startswith(name + ".") and not name.startswith(dep + ".")}


def test_modules_classes_and_functions_stay_small():
    too_big: List[str] = []
    for name, path in _modules().items():
        source = path.read_text()
        if len(source.splitlines()) > 450:
            too_big.append(f"module {name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > 250:
                too_big.append(f"class {name}.{node.name}: {size} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                too_big.append(f"function {name}.{node.name}: {size} lines")
    assert not too_big, too_big


def test_the_import_graph_has_no_cycle_and_follows_the_layers():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
    broken = [f"{name} imports {dep}" for name, deps in graph.items() for prefix, banned in NEVER
              if name == prefix or name.startswith(prefix + ".") or name.startswith(prefix + "_")
              for dep in deps if any(dep == b or dep.startswith(b + ".") for b in banned)]
    assert not broken, broken


def test_every_event_is_fired_on_its_own_line_in_the_loop_package():
    fired = {}
    for path in (PACKAGE / "loop").glob("*.py"):
        for line in path.read_text().splitlines():
            for event in re.findall(r"fire\.(on_[a-z_]+)", line):
                fired.setdefault(event, []).append(path.name)
    assert set(EVENTS) <= set(fired), sorted(set(EVENTS) - set(fired))
    train_pass = [e for e in EVENTS if e.startswith("on_train")]
    assert all(set(fired[e]) == {"fit.py"} for e in train_pass), {e: fired[e] for e in train_pass}
