"""The gate as a graph node, for hand-built graphs.

Placed before the LLM node (``builder.add_node("admit", gate_node())`` and an edge
``admit -> llm``), the agent waits for admission in a super-step of its own. That super-step
starts right after the previous step's checkpoint, so an agent parked here has its state saved
at the park point: the literal "park at a graph boundary". The node writes nothing to the state.

It uses the gate of the :class:`ConcurCallbackHandler` in the run's callbacks (``ConcurGate``
always puts one there; users of the handler pass it in ``config["callbacks"]``). The node only
admits; the handler is what sees the run end and gives the slot back on success, error, interrupt
and cancellation, which a node cannot see. So the node and the LLM calls share one window and
one agent identity, and the LLM call that follows the node passes the gate on its fast path.

The agent's identity is the run's ``thread_id``, else the handler's root-run id. Without either
the node cannot tell agents apart and raises :class:`ConfigError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.runnables import RunnableConfig

from concur_langgraph.errors import ConfigError
from concur_langgraph.integrations.callbacks import find_handler

__all__ = ["gate_node"]


def _parent_run_id(config: RunnableConfig) -> Any:
    callbacks = config.get("callbacks")
    return callbacks.parent_run_id if isinstance(callbacks, BaseCallbackManager) else None


def gate_node() -> Callable[[Any, RunnableConfig], Awaitable[None]]:
    """A node that waits at the gate; add it before the LLM node."""

    async def admit(state: Any, config: RunnableConfig) -> None:
        handler = find_handler(config)
        if handler is None:
            raise ConfigError(
                "callbacks: the gate node found no ConcurCallbackHandler in the run's "
                "callbacks; run the graph through ConcurGate, or pass a ConcurCallbackHandler "
                "in config['callbacks']"
            )
        handler.session.check_usable(type(handler).__name__)
        thread_id = (config.get("configurable") or {}).get("thread_id")
        agent_id = str(thread_id) if thread_id is not None else None
        if agent_id is None:
            agent_id = handler.agent_of(_parent_run_id(config))
        if agent_id is None:
            raise ConfigError(
                "thread_id: the gate node tells agents apart by config['configurable']"
                "['thread_id']; give each run its own thread_id (ConcurGate does this for you)"
            )
        # Admission only: the LLM call that follows is the one counted (and rate-limited).
        await handler.session.gate.before_llm_call(agent_id, llm_call=False)

    admit.__name__ = "concur_admit"
    return admit
