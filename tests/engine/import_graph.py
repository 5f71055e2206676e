"""The project's imports read from its source (AST, nothing executed): every `import` and `from ... import`, at
module level or inside a function, between modules of the packages given. Used by test_imports.py and
test_layering.py."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

COMPILED = {"kernels._C"}  # extension modules built by setup.py (no .py source); importing one is importing a module


@dataclass(frozen=True)
class Arrow:
    """`source` imports `target` (both module names) at `line` of source's file; `name` is the imported name
    when the statement is `from target import name` and name is not itself a module."""
    source: str
    target: str
    line: int
    name: str | None = None


def modules(root: Path, packages: list[str]) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under root/<package> (a package's __init__ is the package)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a `from <level dots><name> import` in `module` refers to."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _owner(name: str, known) -> str | None:
    """The longest prefix of dotted `name` that is a known module (`a.b.c` imported: module a.b if c is a name)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def arrows(root: Path, packages: list[str]) -> list[Arrow]:
    """Every import between modules of `packages` under `root`."""
    mods = modules(root, packages)
    known = set(mods) | COMPILED
    out = []
    for module, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _owner(alias.name, known)
                    if target and target != module:
                        out.append(Arrow(module, target, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.level, node.module)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in known:  # `from package import submodule`
                        out.append(Arrow(module, full, node.lineno))
                        continue
                    target = _owner(base, known)
                    if target and target != module:
                        out.append(Arrow(module, target, node.lineno, alias.name))
    return out


def cycles(edges: list[Arrow]) -> list[list[str]]:
    """The import circles: each strongly connected group of two or more modules, as one cycle through it
    (a -> b -> ... -> a), sorted; [] when the imports run one way."""
    graph: dict[str, set[str]] = {}
    for a in edges:
        graph.setdefault(a.source, set()).add(a.target)
        graph.setdefault(a.target, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm; the project's graphs are a few hundred nodes deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_one_cycle(graph, g) for g in groups)


def _one_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    previous, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]  # path runs v -> ... -> start
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def private_attributes(root: Path, packages: list[str]) -> list[str]:
    """`alias._name` where alias is a module of `packages` imported under that name (`from ..x import y as
    alias`, `import a.b as alias`): a private name of another module reached through its attribute."""
    mods = modules(root, packages)
    found = []
    for module, path in mods.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.level, node.module)
                for alias in node.names:
                    if f"{base}.{alias.name}" in mods:
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in mods:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                found.append(f"{module} (line {node.lineno}) uses {aliases[node.value.id]}.{node.attr}")
    return sorted(found)
