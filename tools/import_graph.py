"""The package's own import graph: modules, floors (import depth), cycles, and layer rules.

    python tools/import_graph.py            # summary: modules, floors, cycles
    python tools/import_graph.py --edges    # every edge, module -> module it imports
    python tools/import_graph.py --floors   # the modules on each floor
    python tools/import_graph.py --layers   # the same for layers (the package's folders)

Reads the source with ``ast`` (nothing is imported). An edge is any import of another module
of the package, at module level or inside a function (a lazy import is still a dependency),
and under ``if TYPE_CHECKING:`` too (a type is a dependency of the design) unless
``--runtime`` leaves those out. A floor is the length of the longest chain of
imports below a module (a module importing nothing of the package is on floor 0). A cycle is a
strongly connected group of two or more modules. A layer is a folder of the package
(``core``, ``laws``, ...); the modules at the top of the package are the layer ``base``,
and the package's ``__init__`` is the layer ``api``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "concur_langgraph"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, *, types: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if not types and isinstance(node, ast.If) and _is_type_checking(node):
            for other in node.orelse:
                yield from _imports(other, types=types)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node, types=types)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def graph(root: Path = ROOT, *, types: bool = True) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``types``: with ``TYPE_CHECKING`` imports)."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        for node in _imports(tree, types=types):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                # The longest prefix that is a module: `from .x import Y` names module x.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module and target.startswith(PACKAGE):
                    edges[module].add(target)
                    break
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor; the modules of a cycle share one (the cycle counts as a module)."""
    group_of = {m: m for m in edges}
    for group in cycles(edges):
        for m in group:
            group_of[m] = group[0]
    memo: dict[str, int] = {}

    def floor(g: str, seen: frozenset[str]) -> int:
        if g in memo:
            return memo[g]
        below = {
            group_of[t] for m in edges if group_of[m] == g for t in edges[m] if group_of[t] != g
        }
        value = 1 + max((floor(b, seen | {g}) for b in below), default=-1)
        memo[g] = value
        return value

    return {m: floor(group_of[m], frozenset()) for m in edges}


def layer(module: str) -> str:
    """The layer of a module: its folder under the package, ``base`` for the modules at the
    top (errors, checks, vtime), ``api`` for the package itself (``__init__``: the facade that
    re-exports the public names)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return parts[1] if (ROOT / PACKAGE / parts[1]).is_dir() else "base"


def layer_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Layer -> the other layers its modules import."""
    out: dict[str, set[str]] = {layer(m): set() for m in edges}
    for module, targets in edges.items():
        for target in targets:
            if layer(target) != layer(module):
                out[layer(module)].add(layer(target))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print every edge")
    parser.add_argument("--floors", action="store_true", help="print the modules of each floor")
    parser.add_argument(
        "--runtime", action="store_true", help="leave out imports under `if TYPE_CHECKING:`"
    )
    parser.add_argument("--layers", action="store_true", help="layers instead of modules")
    args = parser.parse_args(argv)
    edges = graph(types=not args.runtime)
    if args.layers:
        edges = layer_graph(edges)
    found = cycles(edges)
    levels = floors(edges)
    if args.edges:
        for module in sorted(edges):
            for target in sorted(edges[module]):
                print(f"{module} -> {target}")
    if args.floors:
        for level in range(max(levels.values()) + 1):
            names = sorted(m for m, f in levels.items() if f == level)
            print(f"floor {level}: {', '.join(names)}")
    what = "layers" if args.layers else "modules"
    print(
        f"{len(edges)} {what}, {sum(map(len, edges.values()))} imports, "
        f"{max(levels.values()) + 1} floors, {len(found)} cycles"
    )
    for group in found:
        print("cycle: " + " <-> ".join(group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
