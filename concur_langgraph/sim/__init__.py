"""A vLLM V1 simulator: engine, presets, tokenizer and an OpenAI-compatible server.

``SimServer("cpu-tiny")`` gives an in-process server (``http_client()``, ``chat_model()``);
``SimCluster("cpu-tiny", replicas=4)`` several independent replicas behind one transport;
``concur sim serve`` serves one over HTTP. See docs/simulator.md.

The engine, its presets and its cost model need nothing beyond the package; the HTTP server
and its fault injection need starlette (the ``sim`` extra) and are imported when first used.
"""

from __future__ import annotations

import importlib
import typing

from concur_langgraph.extras import require
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._cost import CostModel
from concur_langgraph.sim._engine import EngineMetrics, RequestOutput, SimEngine, SimRequest
from concur_langgraph.sim._metrics import EXPOSITIONS, render_metrics, render_sglang_metrics
from concur_langgraph.sim._presets import PRESETS, get_preset
from concur_langgraph.sim._tokenizer import Tokenizer

if typing.TYPE_CHECKING:
    from concur_langgraph.sim._calibrate import calibrate, calibrated_config
    from concur_langgraph.sim._cluster import SimCluster
    from concur_langgraph.sim._faults import (
        FaultInjector,
        Faults,
        FaultStatistics,
        TimeoutASGITransport,
    )
    from concur_langgraph.sim._server import SimServer, create_app

__all__ = [
    "EXPOSITIONS",
    "PRESETS",
    "CostModel",
    "EngineMetrics",
    "FaultInjector",
    "FaultStatistics",
    "Faults",
    "RequestOutput",
    "SimCluster",
    "SimConfig",
    "SimEngine",
    "SimRequest",
    "SimServer",
    "TimeoutASGITransport",
    "Tokenizer",
    "calibrate",
    "calibrated_config",
    "create_app",
    "get_preset",
    "render_metrics",
    "render_sglang_metrics",
]

_LAZY: typing.Final = {
    "SimServer": "concur_langgraph.sim._server",
    "SimCluster": "concur_langgraph.sim._cluster",
    "create_app": "concur_langgraph.sim._server",
    "FaultInjector": "concur_langgraph.sim._faults",
    "FaultStatistics": "concur_langgraph.sim._faults",
    "Faults": "concur_langgraph.sim._faults",
    "TimeoutASGITransport": "concur_langgraph.sim._faults",
    "calibrate": "concur_langgraph.sim._calibrate",
    "calibrated_config": "concur_langgraph.sim._calibrate",
}


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'concur_langgraph.sim' has no attribute {name!r}")
    if module != "concur_langgraph.sim._calibrate":
        require("starlette", what="the simulator's HTTP server")
    return getattr(importlib.import_module(module), name)
