"""``GRAPH_SPEC`` of ``concur run``: the compiled graph a ``module:attribute`` or
``path/to/file.py:attribute`` names.

The attribute may be dotted; it names a compiled graph, or a factory taking no arguments (sync
or async) that returns one. A module is imported with the current directory importable (as for
``uvicorn``); a file with its own folder importable, so it can import its siblings. Every
failure is a :class:`ConfigError` naming ``GRAPH_SPEC`` and what is wrong (the file and line of
an exception raised while importing).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from concur_langgraph.errors import ConfigError

__all__ = ["resolve_graph"]


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"GRAPH_SPEC {spec!r}: no such file {str(path)!r}")
    stem = path.stem
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = stem if stem.isidentifier() and stem not in sys.modules else f"_concur_graph_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"GRAPH_SPEC {spec!r}: {str(path)!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    # Like `python path/to/file.py`: the file's folder is importable, so its siblings are.
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(
            f"GRAPH_SPEC {spec!r}: importing {str(path)!r} raised "
            f"{type(exc).__name__}: {exc}{_where(exc)}"
        ) from exc
    return module


def _import_module(name: str, spec: str) -> Any:
    # Like uvicorn: the current directory is importable, so `concur run mygraph:graph` works
    # from the folder holding mygraph.py even though console scripts do not add it.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == name or name.startswith(missing + "."):
            raise ConfigError(
                f"GRAPH_SPEC {spec!r}: module {name!r} is not importable (no module named "
                f"{missing!r}; is it installed, or is the current directory the one holding it?)"
            ) from exc
        raise ConfigError(
            f"GRAPH_SPEC {spec!r}: importing {name!r} failed: it imports {missing!r}, which is "
            f"not installed{_where(exc)}"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"GRAPH_SPEC {spec!r}: importing {name!r} raised {type(exc).__name__}: {exc}"
            f"{_where(exc)}"
        ) from exc


def _is_graph(obj: Any) -> bool:
    from langgraph.pregel import Pregel

    return isinstance(obj, Pregel)


async def resolve_graph(spec: str) -> Any:
    """The compiled graph ``spec`` names (calling a factory, awaiting an async one).

    Raises :class:`ConfigError` naming ``GRAPH_SPEC`` and what is wrong.
    """
    where, _, attribute = spec.rpartition(":")
    if not where or not attribute:
        raise ConfigError(
            f"GRAPH_SPEC: expected module:attribute or path/to/file.py:attribute, got {spec!r}"
        )
    if where.endswith(".py") or "/" in where or os.sep in where:
        module = _import_file(Path(where), spec)
    else:
        module = _import_module(where, spec)
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            graphs = sorted(n for n, v in vars(module).items() if _is_graph(v))
            hint = f"; graphs it defines: {', '.join(graphs)}" if graphs else ""
            raise ConfigError(
                f"GRAPH_SPEC {spec!r}: {where!r} has no attribute {attribute!r}{hint}"
            ) from None
    if _is_graph(obj):
        return obj
    if not callable(obj):
        raise ConfigError(
            f"GRAPH_SPEC {spec!r}: {attribute!r} is a {type(obj).__name__}, not a compiled "
            "LangGraph graph (builder.compile()) or a factory returning one"
        )
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        required = [
            p.name
            for p in signature.parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if required:
            raise ConfigError(
                f"GRAPH_SPEC {spec!r}: {attribute!r} needs arguments ({', '.join(required)}); "
                "name a compiled graph or a factory that takes no arguments"
            )
    try:
        made = obj()
        if inspect.isawaitable(made):
            made = await made
    except Exception as exc:
        raise ConfigError(
            f"GRAPH_SPEC {spec!r}: calling {attribute}() raised {type(exc).__name__}: {exc}"
            f"{_where(exc)}"
        ) from exc
    if not _is_graph(made):
        raise ConfigError(
            f"GRAPH_SPEC {spec!r}: {attribute}() returned a {type(made).__name__}, not a "
            "compiled LangGraph graph (builder.compile())"
        )
    return made
