"""No import cycles inside chatd/, and the leaves stay leaves.

A cycle works until someone moves an import, then fails at start-up with a
half-initialised module; and it means two modules are one job. So any import
counts, at the top of a module or inside a function, and the test names each
cycle it finds. Importing ``a.b.c`` runs ``a`` and ``a.b`` first: those count
too, except a module's own packages, which are running already when it runs
(``chatd/plugins/manager.py`` taking ``hookspecs`` from ``chatd.plugins``).
A name taken from a module's own package is a real dependency and counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules_under(top: Path) -> dict[str, Path]:
    """Every module of the package at ``top``, by dotted name."""
    found = {}
    for path in sorted(top.rglob("*.py")):
        parts = path.relative_to(top.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that importing ``name`` runs, directly."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    own = set(_ancestors(name))
    wanted: set[str] = set()  # modules imported for themselves or for a name in them
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            wanted.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                wanted.add(submodule if submodule in modules else base)
    runs = set(wanted)
    for target in wanted:
        runs.update(parent for parent in _ancestors(target) if parent not in own)
    return {target for target in runs if target in modules and target != name}


def import_graph(top: Path) -> dict[str, set[str]]:
    modules = modules_under(top)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each group of modules that import each other."""
    found: list[list[str]] = []
    covered: set[str] = set()
    for start in sorted(graph):
        if start in covered:
            continue
        way_back = _shortest_path(graph, start, start)
        if way_back is not None:
            found.append(way_back)
            covered.update(_group(graph, start))
    return found


def _shortest_path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for there in sorted(graph[here]):
            if there == goal:
                path = [here]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), goal]
            if there not in came_from:
                came_from[there] = here
                queue.append(there)
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for there in graph[todo.pop()]:
            if there not in seen:
                seen.add(there)
                todo.append(there)
    return seen


def _group(graph: dict[str, set[str]], start: str) -> set[str]:
    return {m for m in _reachable(graph, start) if start in _reachable(graph, m)}


# -- chatd itself ----------------------------------------------------------------------------


def test_chatd_has_no_import_cycle():
    graph = import_graph(ROOT / "chatd")
    found = cycles(graph)
    assert not found, "import cycles in chatd/:\n" + "\n".join(
        f"{' -> '.join(cycle)} (all that import each other: "
        f"{', '.join(sorted(_group(graph, cycle[0])))})" for cycle in found)


def test_settings_import_nothing_of_chatd():
    graph = import_graph(ROOT / "chatd")
    assert graph["chatd.settings"] == set()


def _loaded_by(statement: str) -> set[str]:
    """The chatd modules a fresh interpreter has loaded after ``statement``."""
    code = f"{statement}\nimport sys\nprint(*(m for m in sys.modules if m.startswith('chatd')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, cwd=ROOT).stdout
    return set(out.split())


def test_settings_load_alone():
    assert _loaded_by("import chatd.settings") == {"chatd", "chatd.settings"}


def test_config_loads_no_plugin_and_the_plugins_no_manager():
    assert not {m for m in _loaded_by("import chatd.config") if m.startswith("chatd.plugins")}
    assert "chatd.plugins.manager" not in _loaded_by("from chatd.plugins import hookimpl")
    assert "chatd.plugins.manager" in _loaded_by("from chatd.plugins import PluginManager")


# -- the checker finds what it should --------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    top = tmp_path / "pkg"
    for name, text in files.items():
        path = top / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return top


def test_a_cycle_through_a_function_local_import_is_found(tmp_path):
    top = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import thing\n",
        "b.py": "import os\n\ndef thing():\n    from pkg import a\n    return a\n",
        "c.py": "from pkg import a\n",
    })
    assert cycles(import_graph(top)) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    # importing pkg.sub.x runs pkg/sub/__init__.py, which imports pkg.y, which imports pkg.sub.x
    top = _package(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "from pkg.y import Y\n",
        "sub/x.py": "X = 1\n",
        "y.py": "from .sub.x import X\nY = X\n",
    })
    assert cycles(import_graph(top)) == [["pkg.sub", "pkg.y", "pkg.sub"]]


def test_a_package_importing_its_submodules_is_no_cycle(tmp_path):
    top = _package(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "from pkg.sub.x import X\nfrom pkg.sub import y\n",
        "sub/x.py": "from pkg.sub import y\nX = 1\n",
        "sub/y.py": "from . import z\n",
        "sub/z.py": "",
    })
    assert cycles(import_graph(top)) == []
    # ... unless a submodule takes a name from the package that imports it
    (top / "sub" / "z.py").write_text("from pkg.sub import X\n")
    assert cycles(import_graph(top)) == [["pkg.sub", "pkg.sub.y", "pkg.sub.z", "pkg.sub"]]
