"""The package's structure holds: layers import only downwards, no cycles, one import style.

The graph is the one ``python tools/import_graph.py`` prints (read from the source with
``ast``, lazy and ``TYPE_CHECKING`` imports included). A layer is a folder of the package;
``base`` is the modules at its top (errors, checks, vtime), ``api`` its ``__init__``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402

ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "core": {"base"},
    "laws": {"base", "core"},
    "distributed": {"base", "core"},
    "session": {"base", "core", "laws", "distributed"},
    "integrations": {"base", "core", "laws", "session"},
    "api": {"base", "core", "laws", "distributed", "session", "integrations"},
    "sim": {"base"},
    "testing": {"base", "sim"},
    "bench": {"base", "core", "laws", "session", "integrations", "sim"},
    "cli": {"base", "core", "laws", "session", "integrations", "bench", "sim"},
}
"""Layer -> the layers it may import. Nothing imports ``api`` or ``cli``; ``core`` imports
only ``base``: the window, gate, signals and controller work without LangChain."""

EDGES = import_graph.graph(ROOT)


def _package_files() -> dict[str, Path]:
    files = sorted((ROOT / "concur_langgraph").rglob("*.py"))
    return {import_graph.module_name(f, ROOT): f for f in files}


def test_every_layer_is_known() -> None:
    assert {import_graph.layer(m) for m in EDGES} == set(ALLOWED)


def test_no_module_imports_a_layer_above_its_own() -> None:
    wrong = [
        f"{module} -> {target}"
        for module, targets in sorted(EDGES.items())
        for target in sorted(targets)
        if import_graph.layer(target) != import_graph.layer(module)
        and import_graph.layer(target) not in ALLOWED[import_graph.layer(module)]
    ]
    assert wrong == []


def test_no_import_cycles() -> None:
    assert import_graph.cycles(EDGES) == []
    assert import_graph.cycles(import_graph.layer_graph(EDGES)) == []


@pytest.mark.parametrize("layer", ["base", "core"])
def test_the_core_imports_no_langchain(layer: str) -> None:
    found = []
    for module, path in _package_files().items():
        if import_graph.layer(module) != layer:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [f"{module}: {n}" for n in names if n.startswith(("langchain", "langgraph"))]
    assert found == []


def test_one_import_style_and_no_private_names_across_modules() -> None:
    relative, private = [], []
    for module, path in _package_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                relative.append(f"{module}: from {'.' * node.level}{node.module or ''}")
            source = node.module or ""
            if source.startswith("concur_langgraph") and source != module:
                private += [
                    f"{module}: {a.name} from {source}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert relative == []
    assert private == []


def test_optional_parts_are_not_imported_with_the_package() -> None:
    """The gate needs none of these: they load when their part is used (docs/usage.md)."""
    import subprocess

    probe = (
        "import sys, concur_langgraph\n"
        "from concur_langgraph import cli\n"
        "cli.build_parser()\n"
        "heavy = ['starlette', 'uvicorn', 'redis', 'matplotlib', 'langchain.agents',"
        " 'aiosqlite', 'langchain_openai', 'concur_langgraph.distributed.redis_window',"
        " 'concur_langgraph.sim._server']\n"
        "print(' '.join(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.split() == []


def test_posix_only_modules_are_imported_only_where_used() -> None:
    """``fcntl`` does not exist on Windows: no module of the package imports it at its top
    (``concur run`` imports it when it locks; the vLLM test server is Linux-only anyway)."""
    found = [
        module
        for module, path in _package_files().items()
        if import_graph.layer(module) != "testing"
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Import) and any(a.name == "fcntl" for a in node.names)
    ]
    assert found == []
