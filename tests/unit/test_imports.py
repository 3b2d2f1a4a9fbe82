"""The product's modules import each other without cycles (imports inside
functions count: they run, later, all the same), and none is over 700 lines
(shm_protocol/layout.py, the protocol's spec, excepted). The import graph is
read from the source with ``ast``: nothing is imported to build it."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shm_protocol", "sidecar", "web", "retrieval", "compat")
MAX_LINES = 700
LONG_ALLOWED = {"shm_protocol/layout.py"}


def product_files() -> dict[str, Path]:
    """Module name -> file, for every module of the product's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def extension_modules() -> set[str]:
    """Compiled modules (their C source is in the tree; the built file may not be yet): imported, importing nothing
    of the product. Without them ``from . import _hotpath`` would read as an import of the package."""
    found = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*"):
            if path.suffix in (".c", ".so", ".pyx"):
                parts = path.relative_to(REPO).parts
                found.add(".".join([*parts[:-1], path.name.split(".")[0]]))
    return found


def _known(name: str, modules: dict) -> str | None:
    """``name`` if it is a product module, else its longest prefix that is one (None: not the product's)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict) -> set[str]:
    """The product modules ``module`` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            # "from pkg import name": the submodule pkg.name when there is one, else pkg itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            known = _known(target, modules)
            if known is not None and known != module:
                found.add(known)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports (parsed once per test run; not to be modified)."""
    files = product_files()
    modules = {**dict.fromkeys(extension_modules()), **files}
    graph = {name: imports_of(name, path, modules) for name, path in files.items()}
    return {**{name: set() for name in modules}, **graph}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected
    component of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, by breadth-first search."""
    start = min(component)
    previous = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle found in {sorted(component)}")


def test_the_graph_sees_imports_inside_functions_relative_and_of_submodules():
    graph = import_graph()
    # inside a function, relative: the factory imports each store's module only when asked for it
    assert {"retrieval.collections.postgres_db", "retrieval.collections.sqlite_db"} <= graph[
        "retrieval.collections.factory"]
    # "from . import index": the submodule, not the package
    assert "compat.index" in graph["compat.original"] and "compat" not in graph["compat.original"]
    # "from ..errors import ...": two levels up
    assert "retrieval.errors" in graph["retrieval.websearch.fetch"]
    # a compiled submodule is a module, not its package
    assert "shm_protocol._hotpath" in graph["shm_protocol.hotpath"] and "shm_protocol" not in graph[
        "shm_protocol.hotpath"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_of_the_product_imports_itself_through_others():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_no_module_of_the_product_is_over_700_lines():
    long = {}
    for path in product_files().values():
        name = path.relative_to(REPO).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and name not in LONG_ALLOWED:
            long[name] = lines
    assert not long, f"modules over {MAX_LINES} lines: {long}"
