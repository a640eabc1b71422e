"""A vLLM V1 simulator: engine, presets, tokenizer and an OpenAI-compatible server.

``SimServer("cpu-tiny")`` gives an in-process server (``http_client()``, ``chat_model()``);
``concur sim serve`` serves one over HTTP. See docs/simulator.md.
"""

from __future__ import annotations

from concur_langgraph.sim._calibrate import calibrate, calibrated_config
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._cost import CostModel
from concur_langgraph.sim._engine import EngineMetrics, RequestOutput, SimEngine, SimRequest
from concur_langgraph.sim._faults import (
    FaultInjector,
    Faults,
    FaultStatistics,
    TimeoutASGITransport,
)
from concur_langgraph.sim._metrics import render_metrics
from concur_langgraph.sim._presets import PRESETS, get_preset
from concur_langgraph.sim._server import SimServer, create_app
from concur_langgraph.sim._tokenizer import Tokenizer

__all__ = [
    "PRESETS",
    "CostModel",
    "EngineMetrics",
    "FaultInjector",
    "FaultStatistics",
    "Faults",
    "RequestOutput",
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
]
