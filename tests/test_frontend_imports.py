"""No import cycles among the frontends' modules (issue 11, item 6).

Imports are read with `ast`, those inside functions included: a lazy import
hides a cycle from Python, not from a reader of the code. Package `__init__`
files are left out of the graph: a family file importing its package's
`register` decorator, which the package then imports to fill its registry, is
how a registry works, not a tangle between plain modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kiln

ROOT = Path(kiln.__file__).resolve().parent  # the repo root is the package `kiln`


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def import_graph(root: Path, package: str, under: str) -> dict[str, set[str]]:
    """module -> the modules it imports, for every .py file below root/under (package `package` lives at root)."""
    files = {_module_name(p, root, package): p for p in sorted((root / under).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start from
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here.rsplit(".", node.level - 1)[0] if node.level else ""
                mod = ".".join(x for x in (base, node.module) if x)
                # `from pkg import x` imports the module pkg.x when there is one, else a name in pkg
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]], skip: set[str] = frozenset()) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module."""
    nodes = [n for n in graph if n not in skip]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v] - skip):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(nodes):
        if v not in index:
            visit(v)

    cycles = []
    for scc in sccs:  # a path through the component back to its first module
        members, path = set(scc), [scc[0]]
        while True:
            nxt = sorted((graph[path[-1]] & members) - skip)
            step = next((w for w in nxt if w == scc[0] or w not in path), nxt[0])
            path.append(step)
            if step in path[:-1]:
                cycles.append(path[path.index(step) :])
                break
    return cycles


def _packages(root: Path, package: str, under: str) -> set[str]:
    return {_module_name(p, root, package) for p in (root / under).rglob("__init__.py")}


def test_no_import_cycles_in_frontends():
    graph = import_graph(ROOT, "kiln", "frontends")
    assert "kiln.frontends.readers" in graph and graph["kiln.frontends.checkpoint"] == set()
    cycles = find_cycles(graph, skip=_packages(ROOT, "kiln", "frontends"))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_checker_sees_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "frontends"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "types.py").write_text("def open_any(p):\n    from .reader import open_it\n    return open_it(p)\n")
    (pkg / "reader.py").write_text("from .types import open_any\n")
    (pkg / "other.py").write_text("from . import types\n")
    graph = import_graph(tmp_path, "pkg", "frontends")
    assert graph["pkg.frontends.other"] == {"pkg.frontends.types"}
    assert find_cycles(graph) == [["pkg.frontends.reader", "pkg.frontends.types", "pkg.frontends.reader"]]
