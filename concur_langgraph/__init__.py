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

from ._adaptive import AdmitLaw
from ._callbacks import ConcurCallbackHandler
from ._controller import Controller, ControllerStatistics, WindowChange
from ._errors import (
    AdmissionTimeoutError,
    AgentDrainedError,
    ConcurError,
    ConfigError,
    MetricsError,
    MetricsUnavailableError,
    NotVLLMError,
    SlotLostError,
    SyncInvocationError,
    VirtualTimeDeadlockError,
    WindowBackendError,
)
from ._gate import Gate, GateStatistics
from ._laws import ConcurLaw, ControlLaw, FixedLaw
from ._middleware import ConcurMiddleware
from ._node import gate_node
from ._profile import BatchProfile
from ._session import ConcurSession, SessionOptions, SessionStatistics
from ._signals import Sample, SignalSource, VLLMMetricsSource
from ._window import AdmissionWindow, LocalWindow, Permit, WindowStatistics
from ._wrapper import ConcurGate

if typing.TYPE_CHECKING:
    from ._redis_window import RedisWindow

__version__ = "0.1.0"

__all__ = [
    "AdmissionTimeoutError",
    "AdmissionWindow",
    "AdmitLaw",
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
    "FixedLaw",
    "Gate",
    "GateStatistics",
    "LocalWindow",
    "MetricsError",
    "MetricsUnavailableError",
    "NotVLLMError",
    "Permit",
    "RedisWindow",
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
]


def __getattr__(name: str) -> typing.Any:
    # The Redis window is an optional extra (pip install concur-langgraph[redis]): import it
    # only when asked for, so `import concur_langgraph` never needs redis.
    if name == "RedisWindow":
        from ._redis_window import RedisWindow

        return RedisWindow
    raise AttributeError(f"module 'concur_langgraph' has no attribute {name!r}")
