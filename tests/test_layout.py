"""The package's own import graph, read from the source: every import points downward.

Module-level and function-level imports (and ``TYPE_CHECKING`` ones) all count. The rules:
no import cycle between modules; no module imports another module's ``_private`` names;
the product's path (io, stages, realtime) never imports the twin; the stages import
neither the real-time side nor the offline side; no module is over 700 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sorting"
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """``edges[m]``: the package modules ``m`` imports; ``private``: (importer, module, name)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    private = []
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [(src, a.name) for a in node.names]
            else:
                continue
            for src, name in targets:
                if not (src == "sorting" or src.startswith("sorting.")):
                    continue
                full = f"{src}.{name}" if name else src
                target = full if full in files else src
                if target in files and target != mod:
                    edges[mod].add(target)
                if name and name.startswith("_") and not name.startswith("__") and full not in files:
                    private.append((mod, src, name))
                if name and name.startswith("_") and full in files:
                    private.append((mod, src, name))
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    # the checker itself must be able to fail: a -> b -> c -> a, d alone
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges, _ = _graph()
    assert len(edges) > 40  # the walk found the package
    assert _cycles(edges) == []


def test_no_private_names_across_modules():
    _, private = _graph()
    assert private == []


def _reaches(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("layer, forbidden", [
    ("sorting.io", ("sorting.twin", "sorting.stages", "sorting.realtime", "sorting.offline", "sorting.cli")),
    ("sorting.physics", ("sorting.twin", "sorting.stages", "sorting.realtime", "sorting.offline", "sorting.cli")),
    ("sorting.stages", ("sorting.twin", "sorting.realtime", "sorting.offline", "sorting.cli")),
    ("sorting.realtime", ("sorting.twin", "sorting.offline", "sorting.cli")),
    ("sorting.offline", ("sorting.twin", "sorting.realtime", "sorting.cli")),
    ("sorting.twin", ("sorting.realtime", "sorting.offline", "sorting.cli")),
])
def test_imports_point_downward(layer, forbidden):
    """Everything a layer's modules reach, directly or through others, stays below it."""
    edges, _ = _graph()
    members = [m for m in edges if m == layer or m.startswith(layer + ".")]
    assert members
    bad = sorted((m, r) for m in members for r in _reaches(edges, m)
                 if any(r == f or r.startswith(f + ".") for f in forbidden))
    assert bad == []


def test_layers_exist_and_modules_stay_short():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert {"io", "stages", "realtime", "offline", "twin", "cli"} <= packages
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
