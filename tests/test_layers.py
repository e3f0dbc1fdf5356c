"""Arrows only point down, and no import cycles (issue 11, items 1 and 6).

Layers, top to bottom (docs/DESIGN.md, "Data flow"): cli -> compiler ->
passes -> passes/kernels -> frontends (models included) -> quantization
formats (passes/quant/: the format objects the models, kernels and compiler
share) -> runtime -> tvm_compat -> errors. A module may
import its own layer and those below; the runtime imports only itself,
tvm_compat and errors (it loads where only the TVM runtime exists).

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


def import_graph(root: Path, package: str, under: str | list[Path]) -> dict[str, set[str]]:
    """module -> the modules it imports, for every .py file below root/under, or
    for the files listed (package `package` lives at root)."""
    paths = sorted((root / under).rglob("*.py")) if isinstance(under, str) else sorted(under)
    files = {_module_name(p, root, package): p for p in paths}
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


# (module prefix, layer): the longest matching prefix decides; higher imports lower
LAYERS = [
    ("kiln.cli", 8),
    ("kiln.compiler", 7),
    ("kiln.passes", 6),
    ("kiln.passes.kernels", 5),
    ("kiln.frontends", 4),
    ("kiln.passes.quant", 3),
    ("kiln.runtime", 2),
    ("kiln.tvm_compat", 1),
    ("kiln.errors", 0),
    ("kiln", 0),  # the package itself: its version only
]
SHIPPED = ("frontends", "passes", "compiler", "runtime")  # plus the top-level modules


def layer(module: str) -> int:
    return max(((len(p), lv) for p, lv in LAYERS if module == p or module.startswith(p + ".")), default=(0, -1))[1]


def kiln_graph() -> dict[str, set[str]]:
    files = [p for d in SHIPPED for p in (ROOT / d).rglob("*.py")] + [p for p in ROOT.glob("*.py")]
    return import_graph(ROOT, "kiln", files)


def test_every_module_has_a_layer():
    assert all(layer(m) >= 0 for m in kiln_graph())
    assert layer("kiln.passes.kernels.gemv_cuda") == 5 and layer("kiln.passes.cpu_rules") == 6 and layer("kiln.runtime.session") == 2


def test_arrows_only_point_down():
    graph = kiln_graph()
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if layer(t) > layer(m))
    assert not upward, "imports that point up a layer:\n  " + "\n  ".join(upward)


def test_runtime_imports_only_itself_tvm_compat_and_errors():
    graph = kiln_graph()
    allowed = ("kiln.runtime", "kiln.tvm_compat", "kiln.errors")
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("kiln.runtime")
                 for t in ts if not t.startswith(allowed) and t != "kiln")
    assert not bad, bad


def test_no_import_cycles():
    graph = kiln_graph()
    cycles = find_cycles(graph, skip={m for m in graph if ROOT.joinpath(*m.split(".")[1:], "__init__.py").is_file()})
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_checker_sees_an_upward_import(tmp_path):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "session.py").write_text("def f():\n    from ..compiler import build\n")
    (tmp_path / "compiler").mkdir()
    (tmp_path / "compiler" / "__init__.py").write_text("")
    (tmp_path / "compiler" / "build.py").write_text("")
    graph = import_graph(tmp_path, "kiln", [*tmp_path.rglob("*.py")])
    assert graph["kiln.runtime.session"] == {"kiln.compiler.build"} and layer("kiln.compiler.build") > layer("kiln.runtime.session")


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


def test_every_package_is_listed_in_pyproject():
    """A package missing from pyproject's list works in the editable checkout and
    is absent from a real install (pip install ., the wheel)."""
    import pytest  # noqa: PLC0415

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"kiln"} | _packages(ROOT, "kiln", "frontends") | _packages(ROOT, "kiln", "passes") | \
        _packages(ROOT, "kiln", "compiler") | _packages(ROOT, "kiln", "runtime")
    assert found <= listed, sorted(found - listed)


# Modules that must load without TVM (issue 11 item 2): the CLI's parser and its
# early checks, the options, the quantization formats, the readers and the
# HF-name mapping. What stays TVM-at-import, and why: nn.Module subclasses
# (frontends/models/layers.py, decoder.py, the families), PagedKVCache
# subclasses and TVMScript kernels (passes/kernels/) need TVM when their classes
# and functions are defined; they are imported only by the compiler, after
# `compiler()` has loaded the full TVM (cli.cmd_compile does so explicitly).
NO_TVM_AT_IMPORT = ("kiln.cli", "kiln.compiler.options", "kiln.compiler.artifact", "kiln.passes.quant",
                    "kiln.frontends.readers", "kiln.frontends.models.hf_names", "kiln.frontends.config", "kiln.tvm_compat")


def test_light_modules_import_without_tvm():
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = ("import sys\n" + "".join(f"import {m}\n" for m in NO_TVM_AT_IMPORT)
            + "bad = sorted(m for m in sys.modules if m == 'tvm' or m.startswith(('tvm.', 'tvm_ffi')))\n"
            + "assert not bad, bad[:5]\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
