"""The package's import graph has no cycle, and every module imports on its own, in any order.

The graph is read with `ast` from the source: every `import blockem.x` / `from blockem.x import y`
/ `from . import y`, at module level or inside a function (a lazy import is still an edge: it only
hides a cycle until the function runs). `from blockem import x` counts as an import of the
submodule `blockem.x` when x is one.
"""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "blockem"


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, source: str, known, is_package: bool = False) -> list[tuple[str, int]]:
    """(module, line) of every module of `known` that module `name` imports, anywhere in it."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from `name`'s package, one level up per extra dot
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import blockem.x.f`-like names: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.append((target, node.lineno))
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line importing it}."""
    mods = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges = graph.setdefault(name, {})
        for target, line in imports(name, path.read_text(), mods, path.name == "__init__.py"):
            edges.setdefault(target, line)
    return graph


def find_cycle(graph) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


# --- the graph ---------------------------------------------------------------------------------

def test_imports_are_read_at_every_level_and_resolved_to_modules():
    known = {"blockem", "blockem.config", "blockem.io", "blockem.judge", "blockem.judge.llm",
             "blockem.judge.toy"}
    src = ("import json\n"
           "from blockem import config\n"
           "def f():\n"
           "    from blockem.io import write_json\n"
           "    import blockem.judge.llm as llm\n")
    assert imports("blockem.x", src, known) == [
        ("blockem.config", 2), ("blockem.io", 4), ("blockem.judge.llm", 5)]
    assert imports("blockem.judge", "from . import llm\nfrom .toy import f\n", known,
                   is_package=True) == [("blockem.judge.llm", 1), ("blockem.judge.toy", 2)]
    assert imports("blockem.judge.llm", "from .toy import f\nfrom .. import io\n", known) == [
        ("blockem.judge.toy", 1), ("blockem.io", 2)]
    # and on the package itself: a module-level and a function-level edge are both seen
    graph = import_graph()
    assert "blockem.hashing" in graph["blockem.io"]
    assert "blockem.generate" in graph["blockem.steer"]  # inside judge_conditions


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = " -> ".join(f"{a} (line {graph[a][b]}: imports {b})"
                            for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle: {' -> '.join(cycle)}\n  {steps}")


# --- importing, for real -----------------------------------------------------------------------

def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    # cwd = the repository, first on sys.path with -c: this checkout's package is imported
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    failed = {}
    for name in modules():
        run = _python(f"import {name}")
        if run.returncode:
            failed[name] = run.stderr.strip().splitlines()[-1]
    assert not failed, f"modules that fail to import on their own: {failed}"


def test_all_modules_import_in_any_order():
    names = sorted(modules())
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n")
    for seed in range(3):
        order = random.Random(seed).sample(names, len(names))
        for batch in (order, order[::-1]):
            run = _python(code, *batch)
            assert run.returncode == 0, f"import order {batch} fails:\n{run.stderr}"
