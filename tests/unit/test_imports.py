"""The import graph of ``probes/`` and ``analyses/`` (DESIGN §3): one direction of dependence.

No two modules import each other, even lazily: every ``import`` counts, at module level or inside a
function, and so does ``importlib.import_module("name")`` with a literal name. ``probes`` never
imports ``analyses``, and each folder of ``analyses`` imports only the folders below it.

The graph is read from the source with ``ast`` (nothing is imported): relative imports are
resolved against the importing module's package, ``import a.b.c`` is an edge to the module
``a.b.c``, ``from a.b import c`` is an edge to ``a.b.c`` where that is a module and to ``a.b``
otherwise, and importing a package is importing its ``__init__``.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("probes", "analyses")

# The folders of analyses/, lowest first: a module imports only from its own folder or one below
# (probes/ sits below them all; the package's own __init__, its public face, sits above them all).
LAYERS = ("machinery", "tasks", "results", "methods", "models", "stages", "interface")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Every module of ``packages`` under ``root`` by dotted name (a package by its ``__init__``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a module of the graph (None: outside the graph)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _literal_import_module(node: ast.AST) -> str | None:
    """The name in ``importlib.import_module("name")`` / ``import_module("name")`` / ``__import__("name")``."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return node.args[0].value if called in ("import_module", "__import__") and not node.args[0].value.startswith(".") else None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the graph that module ``name`` (its source at ``path``) imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):  # module level, functions, classes, conditionals: every import
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
        elif (literal := _literal_import_module(node)) is not None:
            targets.add(literal)
    found = {_known(t, modules) for t in targets}
    return {t for t in found if t is not None and t != name}


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as one cycle through
    its members, e.g. ``["a", "b", "a"]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:  # iterative: no recursion limit on a deep graph
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(group, graph) for group in sorted(groups)]


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle inside a strongly connected group, from its first member back to it (shortest
    path there and back, found breadth first)."""
    members = set(group)
    start = group[0]
    previous = {start: None}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in previous:
                    previous[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"{group} is not strongly connected")


def _show(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in cycles)


# ------------------------------------------------------------------------------------------------
# the tree


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_walker_reads_the_tree(graph):
    # not vacuous: it sees both packages, module-level and lazy (function-level) imports
    assert "probes.store" in graph and "analyses.stages.patch" in graph
    assert "analyses.machinery.protocol" in graph["analyses.stages.patch"]  # at module level
    assert "probes.models" in graph["analyses.stages.patch"]  # inside patch's compute
    assert "analyses.models.organism.training" in graph["analyses.models.organism"]  # importlib.import_module
    assert sum(len(v) for v in graph.values()) > 200


def test_no_two_modules_import_each_other(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (DESIGN §3: no two modules import each other, even lazily):\n" + _show(cycles)


def test_probes_never_imports_analyses(graph):
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() if a.split(".")[0] == "probes" for b in targets if b.split(".")[0] == "analyses")
    assert not upward, "probes/ imports analyses/:\n" + "\n".join(upward)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "analyses":
        return -1  # probes: below every folder
    if len(parts) == 1:
        return len(LAYERS)  # analyses/__init__.py: the public face, above every folder
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def test_every_module_of_analyses_sits_in_a_folder_of_its_role(graph):
    loose = sorted(m for m in graph if m.startswith("analyses") and _layer(m) is None)
    assert not loose, f"modules outside the folders {LAYERS}: {loose} (add the folder to LAYERS, in its place)"


def test_each_folder_imports_only_the_folders_below_it(graph):
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() if a.startswith("analyses") for b in targets if (_layer(a) or 0) < (_layer(b) or 0))
    assert not upward, f"imports upward (folders lowest first: {LAYERS}):\n" + "\n".join(upward)


# ------------------------------------------------------------------------------------------------
# the walker finds what it is meant to find


def test_a_cycle_in_a_synthetic_graph_is_reported():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}, "f": {"g"}, "g": {"f"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["f", "g", "f"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


PLANTED = {
    "lazy_relative": {
        "planted/__init__.py": "",
        "planted/a.py": """
            def f():
                from .b import g  # lazy and relative
                return g()
            """,
        "planted/b.py": "import planted.a\n",
    },
    "through_a_package_init": {
        "planted/__init__.py": "",
        "planted/sub/__init__.py": "from planted.c import thing\n",
        "planted/c.py": """
            thing = 1

            def f():
                from planted.sub import other  # a name of the package: its __init__
            """,
    },
    "from_package_import_module": {
        "planted/__init__.py": "",
        "planted/x.py": "from planted import y\n",
        "planted/y.py": "from . import x\n",
    },
    "importlib_literal": {
        "planted/__init__.py": "",
        "planted/p.py": """
            import importlib

            def load():
                return importlib.import_module("planted.q")
            """,
        "planted/q.py": "from planted.p import load\n",
    },
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_a_planted_cycle_is_reported(tmp_path, kind):
    root = _package(tmp_path, PLANTED[kind])
    cycles = find_cycles(import_graph(root, ("planted",)))
    expected = {"lazy_relative": {"planted.a", "planted.b"}, "through_a_package_init": {"planted.sub", "planted.c"}, "from_package_import_module": {"planted.x", "planted.y"}, "importlib_literal": {"planted.p", "planted.q"}}[kind]
    assert [set(c) for c in cycles] == [expected], _show(cycles)


def test_a_package_without_a_cycle_passes(tmp_path):
    root = _package(tmp_path, {"planted/__init__.py": "from planted.a import f\n", "planted/a.py": "from planted.b import g\n\ndef f():\n    import planted.c\n", "planted/b.py": "g = 1\n", "planted/c.py": "from . import b\n"})
    graph = import_graph(root, ("planted",))
    assert graph == {"planted": {"planted.a"}, "planted.a": {"planted.b", "planted.c"}, "planted.b": set(), "planted.c": {"planted.b"}}
    assert find_cycles(graph) == []
