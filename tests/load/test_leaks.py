"""Slot leaks outside ``ConcurGate``: a model call the handler sees with no graph run above it.

``ConcurCallbackHandler`` treats a chat model called outside any run it tracks as an agent of
its own, released at that call's ``on_llm_end`` / ``on_llm_error``. LangChain fires neither
when the call is cancelled (../shared/notes/langgraph.md), so the handler also watches the
calling task: when it ends, or starts its next such call, a root it left open is closed. Without
that, a cancelled bare call kept its slot for ever, and with ``FixedLaw(1)`` every later call
waited for ever.
"""

from __future__ import annotations

import asyncio

from concur_langgraph import ConcurCallbackHandler, FixedLaw
from concur_langgraph.sim import SimServer
from concur_langgraph.testing.vtime_fixtures import virtual_time


async def _cancel_mid_call(server: SimServer, handler: ConcurCallbackHandler) -> None:
    model = server.chat_model(max_tokens=50)
    call = asyncio.create_task(model.ainvoke("hello there", config={"callbacks": [handler]}))
    # Virtual time: 10 ms into a 50-token reply of ~1 ms steps, the call is in the engine.
    await asyncio.sleep(0.01)
    assert handler.statistics().gate.active == 1
    assert not call.done()
    call.cancel()
    await asyncio.wait([call])
    assert call.cancelled()


@virtual_time
async def test_a_bare_model_call_that_completes_releases_its_slot() -> None:
    async with SimServer("test-tiny") as server:
        handler = ConcurCallbackHandler(law=FixedLaw(1))
        model = server.chat_model(max_tokens=5)
        await model.ainvoke("hello there", config={"callbacks": [handler]})
        assert handler.live_runs == 0
        assert handler.statistics().gate.window.holders == 0


@virtual_time
async def test_a_cancelled_bare_model_call_releases_its_slot() -> None:
    async with SimServer("test-tiny") as server:
        handler = ConcurCallbackHandler(law=FixedLaw(1))
        await _cancel_mid_call(server, handler)
        # The task that made the call has ended: nothing can still need the slot.
        assert handler.statistics().gate.window.holders == 0
        assert handler.live_runs == 0
        # And the window (one slot) still admits the next call.
        model = server.chat_model(max_tokens=5)
        async with asyncio.timeout(60):
            await model.ainvoke("again", config={"callbacks": [handler]})
