"""The project's import graph: no module imports itself back through others, and the layers of
docs/engine.md hold (`io` is bytes only; `merge_engine` imports none of the packages above it).

Every `import` statement counts, wherever it is written (module level, inside a function, under
TYPE_CHECKING): a lazy import only postpones a circle, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("merge_engine", "evolve", "evaluators", "search_spaces")


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            parts = list(file.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = file
    return out


def imports_of(name: str, file: Path, modules: set[str]) -> set[str]:
    """Project modules that `name` imports (relative imports resolved; `from pkg import mod`
    counts as an import of the module `pkg.mod` when there is one)."""
    is_package = file.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` of a project module, or the nearest project package above a name
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, file, set(files)) for name, file in files.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_is_read_from_the_sources():
    """The parser finds relative, absolute, `from . import mod` and function-level imports."""
    graph = import_graph()
    assert "merge_engine.config" in graph["merge_engine.sources"]  # module level, relative
    assert "merge_engine.lora" in graph["merge_engine.sources"]  # inside a function
    assert "merge_engine.methods.fused" in graph["merge_engine.methods.task_arithmetic"]  # from . import fused
    assert "merge_engine.resident" in graph["evaluators.worker"]  # absolute, inside a method
    assert "merge_engine.cli" in graph["merge_engine.moe"]  # a package's __init__, `..` relative


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# What each low layer may import from the project: `io` reads and writes bytes (it raises the
# project's ModelError, nothing more); `errors` is the bottom; `sources` resolves references and
# opens checkpoints, so it may use io, config (ModelReference) and lora (to merge an adapter),
# but nothing that plans or merges.
ALLOWED = {
    "merge_engine.errors": set(),
    "merge_engine.io": {"merge_engine.errors"},
    "merge_engine.lora": {"merge_engine.config", "merge_engine.errors", "merge_engine.io"},
    "merge_engine.sources": {"merge_engine.config", "merge_engine.errors", "merge_engine.io", "merge_engine.lora"},
}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_low_layers_import_only_below_them(module):
    graph = import_graph()
    extra = graph[module] - ALLOWED[module]
    assert not extra, f"{module} imports {sorted(extra)}"


# DESIGN's direction: evolve -> evaluators, search_spaces -> merge_engine
PACKAGE_RANK = {"merge_engine": 0, "search_spaces": 1, "evaluators": 1, "evolve": 2}


def test_packages_import_only_downwards():
    graph = import_graph()
    wrong = sorted(
        (name, target)
        for name, targets in graph.items()
        for target in targets
        if name.split(".")[0] != target.split(".")[0]
        and PACKAGE_RANK[target.split(".")[0]] >= PACKAGE_RANK[name.split(".")[0]]
    )
    assert not wrong, f"imports against the package order: {wrong}"
