"""concur-langgraph: agent-level admission control for LangGraph batches on vLLM.

Wrap a compiled graph and run the batch through the gate::

    from concur_langgraph import ConcurGate

    results = await ConcurGate(graph, vllm_url="http://127.0.0.1:8000").abatch(tasks)

Or add :class:`ConcurCallbackHandler` to your own ``graph.abatch`` config, add
:class:`ConcurMiddleware` to ``langchain.agents.create_agent``, or put :func:`gate_node` before
the LLM node of a hand-built graph. See docs/usage.md.
"""

from __future__ import annotations

import typing

from concur_langgraph.core.controller import Controller, ControllerStatistics, WindowChange
from concur_langgraph.core.gate import AgentAccount, Gate, GateStatistics
from concur_langgraph.core.law import ControlLaw
from concur_langgraph.core.replicas import ReplicaError
from concur_langgraph.core.signals import (
    InProcessMetricsSource,
    MetricsSource,
    Sample,
    SignalSource,
    VLLMMetricsSource,
)
from concur_langgraph.core.window import AdmissionWindow, LocalWindow, Permit, WindowStatistics
from concur_langgraph.errors import (
    AdmissionTimeoutError,
    AgentDrainedError,
    ConcurError,
    ConfigError,
    MetricsDisabledError,
    MetricsError,
    MetricsUnavailableError,
    NotVLLMError,
    SlotLostError,
    SyncInvocationError,
    VirtualTimeDeadlockError,
    WindowBackendError,
)
from concur_langgraph.integrations.callbacks import ConcurCallbackHandler
from concur_langgraph.integrations.node import gate_node
from concur_langgraph.integrations.transport import RoutingTransport, routed_http_client
from concur_langgraph.integrations.wrapper import ConcurGate
from concur_langgraph.laws.admit import AdmitLaw
from concur_langgraph.laws.fit import FitLaw
from concur_langgraph.laws.fixed import FixedLaw
from concur_langgraph.laws.paper import ConcurLaw
from concur_langgraph.laws.profile import BatchProfile
from concur_langgraph.session.options import SessionOptions
from concur_langgraph.session.session import ConcurSession
from concur_langgraph.session.statistics import ReplicaSnapshot, SessionStatistics

if typing.TYPE_CHECKING:
    from concur_langgraph.distributed.redis_window import RedisWindow
    from concur_langgraph.integrations.middleware import ConcurMiddleware

__version__ = "0.1.0"

__all__ = [
    "AdmissionTimeoutError",
    "AdmissionWindow",
    "AdmitLaw",
    "AgentAccount",
    "AgentDrainedError",
    "BatchProfile",
    "ConcurCallbackHandler",
    "ConcurError",
    "ConcurGate",
    "ConcurLaw",
    "ConcurMiddleware",
    "ConcurSession",
    "ConfigError",
    "ControlLaw",
    "Controller",
    "ControllerStatistics",
    "FitLaw",
    "FixedLaw",
    "Gate",
    "GateStatistics",
    "InProcessMetricsSource",
    "LocalWindow",
    "MetricsDisabledError",
    "MetricsError",
    "MetricsSource",
    "MetricsUnavailableError",
    "NotVLLMError",
    "Permit",
    "RedisWindow",
    "ReplicaError",
    "ReplicaSnapshot",
    "RoutingTransport",
    "Sample",
    "SessionOptions",
    "SessionStatistics",
    "SignalSource",
    "SlotLostError",
    "SyncInvocationError",
    "VLLMMetricsSource",
    "VirtualTimeDeadlockError",
    "WindowBackendError",
    "WindowChange",
    "WindowStatistics",
    "gate_node",
    "routed_http_client",
]


_LAZY: typing.Final = {
    # Optional parts, imported when asked for: the Redis window needs the redis extra, and the
    # middleware imports langchain.agents (seconds of import time a gate does not need).
    "RedisWindow": "concur_langgraph.distributed.redis_window",
    "ConcurMiddleware": "concur_langgraph.integrations.middleware",
}


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'concur_langgraph' has no attribute {name!r}")
    if name == "ConcurMiddleware":
        from concur_langgraph.extras import require

        require("langchain.agents", what="ConcurMiddleware (for langchain's create_agent)")
    import importlib

    return getattr(importlib.import_module(module), name)
