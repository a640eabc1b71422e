"""``ConcurMiddleware``: the gate as a langchain ``create_agent`` middleware.

::

    middleware = ConcurMiddleware(vllm_url="http://localhost:8000")
    agent = create_agent(model, tools, middleware=[middleware])
    async with middleware:
        results = await agent.abatch(inputs)

``awrap_model_call`` waits at the gate before each model call of the agent. The agent is its
run's ``thread_id`` when it has one (the same identity the callback handler and ``ConcurGate``
use, so combining them gates each agent once), else an id the middleware writes into the run's
state when the run starts (an untracked, private state key: never checkpointed, never in the
agent's input or output).

Releasing. ``after_agent`` does not run when an agent fails, is cancelled or is interrupted, so
the slot is given back on each way out the middleware can see:

* ``aafter_agent``: the agent finished;
* any exception or cancellation out of a model call (``awrap_model_call``) or a tool call
  (``awrap_tool_call``), including a ``GraphInterrupt`` raised by a tool (human in the loop):
  the run is ending, or pausing with nothing to send;
* a model-call retry middleware placed outside this one simply re-admits the agent.

What the middleware cannot see: an exception raised outside model and tool calls (in another
middleware's ``before_model``/``after_model`` node, e.g. an ``interrupt()`` there). Such an
agent keeps its slot until its session ends. Running the agent through ``ConcurGate``, or with a
:class:`ConcurCallbackHandler` sharing the session (``ConcurCallbackHandler(session=
middleware.session)`` in ``config["callbacks"]``), closes that gap: the handler releases at the
root run's end, whatever ended it.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, NotRequired, Unpack

from langchain.agents.middleware.types import (
    AgentMiddleware,
    AgentState,
    ModelRequest,
    ModelResponse,
    PrivateStateAttr,
)
from langchain_core.messages import ToolMessage
from langgraph.channels.untracked_value import UntrackedValue
from langgraph.config import get_config
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime
from langgraph.types import Command

from concur_langgraph.core.replicas import CALLING_AGENT
from concur_langgraph.errors import ConcurError, SyncInvocationError
from concur_langgraph.integrations.callbacks import find_handler
from concur_langgraph.integrations.usage import usage_of_message
from concur_langgraph.session.options import SessionKwargs
from concur_langgraph.session.session import ConcurSession, SessionUser

__all__ = ["ConcurMiddleware"]

_STATE_KEY = "concur_agent_id"


class ConcurAgentState(AgentState[Any]):
    """Agent state plus the gate's per-run agent id (private, not checkpointed)."""

    concur_agent_id: NotRequired[Annotated[str, UntrackedValue, PrivateStateAttr]]


def _thread_id(runtime: Any) -> str | None:
    info = getattr(runtime, "execution_info", None)
    thread_id = getattr(info, "thread_id", None)
    if thread_id is None:
        # execution_info.thread_id is None without a checkpointer; the config still has it.
        try:
            thread_id = (get_config().get("configurable") or {}).get("thread_id")
        except RuntimeError:
            thread_id = None
    return str(thread_id) if thread_id is not None else None


def _sync_refused(what: str) -> NoReturn:
    raise SyncInvocationError(
        f"ConcurMiddleware.{what}: the agent was run synchronously, but admission waits "
        "asynchronously; use `await agent.ainvoke(...)` / `abatch` / `astream`"
    )


class ConcurMiddleware(SessionUser, AgentMiddleware[ConcurAgentState, Any, Any]):
    """Admission control for a ``create_agent`` agent (see the module docstring).

    Args:
        session: a :class:`ConcurSession` to share with other ways in; the caller owns it.
        **options: otherwise, the options of a session of its own (``vllm_url``, ``law``, ...
            see :class:`SessionOptions`), entered by ``async with middleware:``.
    """

    state_schema = ConcurAgentState

    def __init__(
        self, *, session: ConcurSession | None = None, **options: Unpack[SessionKwargs]
    ) -> None:
        super().__init__()
        self._use_session(session, dict(options))

    @property
    def name(self) -> str:
        return "ConcurMiddleware"

    def _agent_id(self, state: Any, runtime: Any) -> str:
        thread_id = _thread_id(runtime)
        if thread_id is not None:
            return thread_id
        agent_id = state.get(_STATE_KEY) if isinstance(state, dict) else None
        if agent_id is None:
            raise ConcurError(
                "ConcurMiddleware found no agent identity: the run has no thread_id and its "
                "before_agent hook did not run (is the middleware in create_agent's list?)"
            )
        return str(agent_id)

    # -- hooks -------------------------------------------------------------------------------

    async def abefore_agent(
        self, state: ConcurAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        self.session.check_usable(type(self).__name__)
        if _thread_id(runtime) is not None:
            return None
        return {_STATE_KEY: uuid.uuid4().hex}

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any]:
        agent_id = self._agent_id(request.state, request.runtime)
        gate = self.session.gate
        try:
            await gate.before_llm_call(agent_id)
            # The routing transport (several replicas) finds the calling agent here when the
            # run has no thread id.
            token = CALLING_AGENT.set(agent_id)
            try:
                response = await handler(request)
            finally:
                CALLING_AGENT.reset(token)
        except BaseException:
            await gate.release(agent_id)
            raise
        if not self._handler_sees_calls():
            usage = next(
                (u for m in response.result if (u := usage_of_message(m)) is not None), None
            )
            prompt, completion = usage if usage is not None else (None, None)
            gate.after_llm_call(agent_id, prompt, completion)
        return response

    def _handler_sees_calls(self) -> bool:
        """Whether a ConcurCallbackHandler of this session rides the run (ConcurGate puts one
        there): it reports each call's usage itself, and reporting twice would count twice."""
        try:
            handler = find_handler(get_config())
        except RuntimeError:  # no runnable context (a direct call in a test)
            return False
        return handler is not None and handler.session is self.session

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        try:
            return await handler(request)
        except BaseException:
            await self.session.gate.release(self._agent_id(request.state, request.runtime))
            raise

    async def aafter_agent(
        self, state: ConcurAgentState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        await self.session.gate.release(self._agent_id(state, runtime))
        return None

    # -- sync hooks: refused with a clear message --------------------------------------------

    def before_agent(self, state: ConcurAgentState, runtime: Runtime[Any]) -> NoReturn:
        _sync_refused("before_agent")

    def wrap_model_call(self, request: Any, handler: Any) -> NoReturn:
        _sync_refused("wrap_model_call")

    def wrap_tool_call(self, request: Any, handler: Any) -> NoReturn:
        _sync_refused("wrap_tool_call")

    def after_agent(self, state: ConcurAgentState, runtime: Runtime[Any]) -> NoReturn:
        _sync_refused("after_agent")
