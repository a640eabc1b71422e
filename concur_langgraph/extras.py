"""Optional parts and the extras that install them.

A plain ``pip install concur-langgraph`` brings what the gate needs (LangGraph, httpx, the
Prometheus parser). The rest is optional and imported only when used; a missing part is an
``ImportError`` that says exactly what to run:

==============  =============================================  ==================================
extra           installs                                       for
==============  =============================================  ==================================
``sim``         starlette, uvicorn, langchain-openai           the simulator's server, benchmarks
``cli``         rich                                           progress line, ``concur watch``
``plot``        matplotlib                                     ``gate.plot()``, benchmark plots
``redis``       redis                                          a window shared across processes
``sqlite``      langgraph-checkpoint-sqlite                    ``concur run`` checkpoints
``agents``      langchain                                      ``ConcurMiddleware``
``ray``         ray                                            ``examples/ray_workers.py`` (the
                                                               gate itself needs only ``redis``)
``all``         all of the above
==============  =============================================  ==================================
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Final

__all__ = ["EXTRAS", "require"]

EXTRAS: Final = {
    "starlette": "sim",
    "uvicorn": "sim",
    "langchain_openai": "sim",
    "rich": "cli",
    "matplotlib": "plot",
    "redis": "redis",
    "langgraph.checkpoint.sqlite": "sqlite",
    "aiosqlite": "sqlite",
    "langchain.agents": "agents",
    "ray": "ray",
}
"""Top-level module -> the extra that installs it."""


def require(module: str, *, what: str) -> ModuleType:
    """Import ``module`` (one of :data:`EXTRAS`, or a submodule of one); if it is missing, an
    ImportError naming ``what`` needs it and the exact ``pip install`` that brings it."""
    extra = EXTRAS.get(module) or EXTRAS[module.partition(".")[0]]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"{what} needs {module.partition('.')[0]}: pip install 'concur-langgraph[{extra}]'"
        ) from exc
