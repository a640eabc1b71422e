"""The virtual-time event loop: exact clocks, timers, threads, deadlocks, the real client stack."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypedDict

import anyio
import httpx
import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from concur_langgraph import ConcurError, ConfigError, vtime
from concur_langgraph.vtime import VirtualEventLoop, VirtualTimeDeadlockError

pytest_plugins = ["pytester"]


def _loop() -> VirtualEventLoop:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualEventLoop)
    return loop


# --- the clock and timers ------------------------------------------------------------------


def test_sleep_advances_virtual_clock_exactly() -> None:
    async def main() -> list[float]:
        seen = [vtime.virtual_now()]
        await asyncio.sleep(3600)
        seen.append(vtime.virtual_now())
        # Longer than asyncio's one-day cap on a single select timeout: several jumps.
        await asyncio.sleep(10 * 86400)
        seen.append(vtime.virtual_now())
        await asyncio.sleep(0)
        seen.append(vtime.virtual_now())
        return seen

    assert vtime.run(main()) == [0.0, 3600.0, 3600.0 + 864000.0, 3600.0 + 864000.0]


def test_start_sets_the_initial_clock() -> None:
    async def main() -> tuple[float, float]:
        before = vtime.virtual_now()
        await asyncio.sleep(2.5)
        return before, vtime.virtual_now()

    assert vtime.run(main(), start=1000.0) == (1000.0, 1002.5)


def test_clock_lands_exactly_on_a_deadline_far_from_now() -> None:
    # A pair where now + (deadline - now) != deadline in floating point (found by search):
    # the clock must still read the deadline itself when the timer runs.
    start, deadline = 3301.9721859799856, 13372.527164652018
    assert start + (deadline - start) != deadline

    async def main() -> float:
        loop = asyncio.get_running_loop()
        fired: asyncio.Future[float] = loop.create_future()
        loop.call_at(deadline, lambda: fired.set_result(loop.time()))
        return await fired

    assert vtime.run(main(), start=start) == deadline


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0", True])
def test_bad_start_is_refused_naming_the_field(bad: Any) -> None:
    with pytest.raises(ConfigError, match="start"):
        vtime.new_virtual_loop(start=bad)


def test_sleepers_wake_in_order_of_deadline_then_of_scheduling() -> None:
    async def main() -> list[tuple[float, str]]:
        woke: list[tuple[float, str]] = []

        async def sleeper(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            woke.append((vtime.virtual_now(), name))

        async with asyncio.TaskGroup() as tg:
            for name, delay in [("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0), ("z", 0.0)]:
                tg.create_task(sleeper(name, delay))
        return woke

    assert vtime.run(main()) == [(0.0, "z"), (1.0, "a"), (1.0, "a2"), (2.0, "b"), (3.0, "c")]


def test_gather_of_many_sleepers_each_wakes_at_its_own_deadline() -> None:
    rng = random.Random(7)
    delays = [rng.randrange(0, 100_000) / 64 for _ in range(5000)]

    async def main() -> tuple[list[float], float, int]:
        async def sleeper(delay: float) -> float:
            await asyncio.sleep(delay)
            return vtime.virtual_now()

        woke = await asyncio.gather(*(sleeper(d) for d in delays))
        return woke, vtime.virtual_now(), _loop().statistics().jumps

    woke, end, jumps = vtime.run(main())
    assert woke == delays
    assert end == max(delays)
    # One jump per distinct deadline (the zero ones need none).
    assert jumps == len({d for d in delays if d > 0})


def test_timeouts_fire_in_virtual_time() -> None:
    async def main() -> list[float]:
        fired = []
        try:
            async with asyncio.timeout(30):
                await asyncio.Event().wait()
        except TimeoutError:
            fired.append(vtime.virtual_now())
        try:
            await asyncio.wait_for(asyncio.sleep(100), timeout=12.5)
        except TimeoutError:
            fired.append(vtime.virtual_now())
        with anyio.move_on_after(7):
            await anyio.sleep(1000)
        fired.append(vtime.virtual_now())
        return fired

    assert vtime.run(main()) == [30.0, 42.5, 49.5]


def test_same_program_gives_the_same_timeline() -> None:
    def program() -> Coroutine[Any, Any, list[tuple[float, int, str]]]:
        async def main() -> list[tuple[float, int, str]]:
            rng = random.Random(3)
            log: list[tuple[float, int, str]] = []
            queue: asyncio.Queue[int] = asyncio.Queue()

            async def producer(i: int) -> None:
                for _ in range(20):
                    await asyncio.sleep(rng.choice([0.1, 0.25, 1.0, 3.0]))
                    await queue.put(i)
                    log.append((vtime.virtual_now(), i, "put"))

            async def consumer() -> None:
                while True:
                    i = await queue.get()
                    await asyncio.sleep(0.2)
                    log.append((vtime.virtual_now(), i, "got"))
                    queue.task_done()

            workers = [asyncio.create_task(consumer()) for _ in range(3)]
            await asyncio.gather(*(producer(i) for i in range(10)))
            await queue.join()
            for w in workers:
                w.cancel()
            return log

        return main()

    first = vtime.run(program())
    assert len(first) == 400
    assert vtime.run(program()) == first


def test_runner_with_loop_factory_and_statistics() -> None:
    async def main() -> float:
        await asyncio.sleep(5)
        await asyncio.sleep(5)
        return vtime.virtual_now()

    with asyncio.Runner(loop_factory=vtime.new_virtual_loop) as runner:
        assert runner.run(main()) == 10.0
        loop = runner.get_loop()
        assert isinstance(loop, VirtualEventLoop)
        stats = loop.statistics()
        assert (stats.now, stats.start, stats.jumps) == (10.0, 0.0, 2)
        assert loop.strict


def test_virtual_now_refuses_an_ordinary_loop() -> None:
    async def main() -> float:
        return vtime.virtual_now()

    with pytest.raises(RuntimeError, match="VirtualEventLoop"):
        asyncio.run(main())


def test_exceptions_propagate_out_of_run() -> None:
    async def failing() -> None:
        await asyncio.sleep(50)
        raise ValueError("boom at 50")

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(failing())
            tg.create_task(asyncio.sleep(1e6))

    with pytest.raises(ExceptionGroup) as info:
        vtime.run(main())
    assert info.group_contains(ValueError, match="boom at 50")


# --- deadlocks ------------------------------------------------------------------------------


def test_deadlock_is_reported_instead_of_hanging() -> None:
    async def main() -> None:
        await asyncio.sleep(12)
        await asyncio.Event().wait()

    with pytest.raises(VirtualTimeDeadlockError, match=r"deadlock.*12\.000000 s") as info:
        vtime.run(main())
    assert isinstance(info.value, ConcurError)
    assert isinstance(info.value, RuntimeError)


def test_a_real_socket_wait_is_not_a_deadlock() -> None:
    async def main() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping\n")
            line = await reader.readline()
            writer.close()
            await writer.wait_closed()
        return line

    assert vtime.run(main()) == b"ping\n"


def test_non_strict_loop_waits_for_a_foreign_threads_call_soon_threadsafe() -> None:
    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        thread = threading.Thread(target=loop.call_soon_threadsafe, args=(fut.set_result, 42))
        thread.start()
        value = await fut
        thread.join()
        return value, vtime.virtual_now()

    assert vtime.run(main(), strict=False) == (42, 0.0)


# --- threads --------------------------------------------------------------------------------


def test_clock_stands_still_while_executor_work_runs() -> None:
    async def main() -> tuple[list[float], list[tuple[str, float]]]:
        loop = asyncio.get_running_loop()
        order: list[tuple[str, float]] = []

        async def probe() -> float:
            return loop.time()

        def work() -> None:
            # The loop is idle with a timer due at t=1 while this thread computes; between the
            # probes it must wait for us instead of jumping.
            probes.append(asyncio.run_coroutine_threadsafe(probe(), loop).result())
            time.sleep(0.02)  # blocking work (not a wait for anything)
            probes.append(asyncio.run_coroutine_threadsafe(probe(), loop).result())
            order.append(("thread", loop.time()))

        async def timer() -> None:
            await asyncio.sleep(1)
            order.append(("timer", vtime.virtual_now()))

        probes: list[float] = []
        await asyncio.gather(asyncio.to_thread(work), timer())
        return probes, order

    probes, order = vtime.run(main())
    assert probes == [0.0, 0.0]
    assert order == [("thread", 0.0), ("timer", 1.0)]


def test_executor_work_takes_zero_virtual_time() -> None:
    def work() -> str:
        time.sleep(0.01)  # blocking work
        return "done"

    async def main() -> tuple[str, float, int]:
        result = await asyncio.wait_for(asyncio.to_thread(work), timeout=0.001)
        return result, vtime.virtual_now(), _loop().statistics().executor_running

    assert vtime.run(main()) == ("done", 0.0, 0)


def test_cancelled_executor_call_keeps_the_clock_until_its_thread_ends() -> None:
    async def main() -> tuple[list[float], int, int]:
        loop = _loop()
        started, release = threading.Event(), threading.Event()
        seen: list[float] = []

        async def probe() -> float:
            return loop.time()

        def work() -> None:
            started.set()
            release.wait()
            seen.append(asyncio.run_coroutine_threadsafe(probe(), loop).result())

        fut = loop.run_in_executor(None, work)
        started.wait()  # synchronise with the worker; it is already running
        fut.cancel()
        release.set()
        await asyncio.sleep(0)
        running_after_cancel = loop.statistics().executor_running
        await asyncio.sleep(1)
        return seen, running_after_cancel, loop.statistics().executor_running

    seen, running_after_cancel, running_at_end = vtime.run(main())
    assert seen == [0.0]
    assert running_after_cancel == 1
    assert running_at_end == 0


def test_executor_call_cancelled_before_it_starts_never_runs_nor_holds_the_clock() -> None:
    async def main() -> tuple[float, int, list[str]]:
        loop = _loop()
        ran: list[str] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            # Repeated: the pool thread races to pick the second job up once the gate opens.
            for _ in range(50):
                gate = threading.Event()
                first = loop.run_in_executor(pool, gate.wait)
                second = loop.run_in_executor(pool, ran.append, "second")
                second.cancel()
                gate.set()
                await first
            # Were a cancelled call still counted, the clock could not reach 1.
            await asyncio.sleep(1)
        return vtime.virtual_now(), loop.statistics().executor_running, ran

    assert vtime.run(main()) == (1.0, 0, [])


def test_executor_job_cancelled_by_pool_shutdown_is_delivered_as_cancelled() -> None:
    async def main() -> tuple[bool, float, list[str]]:
        loop = _loop()
        ran: list[str] = []
        pool = ThreadPoolExecutor(max_workers=1)
        gate = threading.Event()
        first = loop.run_in_executor(pool, gate.wait)
        second = loop.run_in_executor(pool, ran.append, "second")
        pool.shutdown(wait=False, cancel_futures=True)
        gate.set()
        assert await first is True
        with pytest.raises(asyncio.CancelledError):
            await second
        await asyncio.sleep(1)
        return second.cancelled(), vtime.virtual_now(), ran

    assert vtime.run(main()) == (True, 1.0, [])


def test_executor_results_arrive_in_submission_order_whatever_the_threads_do() -> None:
    n = 12

    def work(i: int) -> int:
        time.sleep((n - i) * 0.001)  # blocking work; later submissions finish first for real
        return i

    async def main() -> list[int]:
        resumed: list[int] = []

        async def agent(i: int) -> None:
            resumed.append(await asyncio.to_thread(work, i))

        await asyncio.gather(*(agent(i) for i in range(n)))
        return resumed

    assert vtime.run(main()) == list(range(n))


# --- the real client stack and LangGraph ----------------------------------------------------


def _slow_openai_app(delay_s: float) -> Starlette:
    async def completions(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        await asyncio.sleep(delay_s)
        return JSONResponse(
            {
                "id": "cmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "slept"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def test_chat_openai_through_asgi_transport_runs_in_virtual_time() -> None:
    async def main() -> tuple[str, float]:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=_slow_openai_app(100.0)))
        async with client:
            model = ChatOpenAI(
                model="sim",
                base_url="http://sim.test/v1",
                api_key=SecretStr("EMPTY"),
                http_async_client=client,
                max_retries=0,
            )
            reply = await model.ainvoke([HumanMessage("hello")])
        return str(reply.content), vtime.virtual_now()

    wall = time.perf_counter()
    content, now = vtime.run(main())
    wall = time.perf_counter() - wall
    assert (content, now) == ("slept", 100.0)
    # Not a speed assertion: 100 s of real sleeping would trip it on any machine.
    assert wall < 100.0


def test_asgi_transport_ignores_httpx_timeouts_so_deadlines_need_asyncio_timeout() -> None:
    async def main() -> tuple[int, float, float]:
        transport = httpx.ASGITransport(app=_slow_openai_app(700.0))
        async with httpx.AsyncClient(transport=transport, timeout=600.0) as client:
            payload = {"model": "sim", "messages": []}
            response = await client.post("http://sim.test/v1/chat/completions", json=payload)
            finished = vtime.virtual_now()
            try:
                async with asyncio.timeout(600.0):
                    await client.post("http://sim.test/v1/chat/completions", json=payload)
            except TimeoutError:
                timed_out = vtime.virtual_now()
        return response.status_code, finished, timed_out

    assert vtime.run(main()) == (200, 700.0, 1300.0)


class _AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _agent_graph(model_latency_s: float, server: asyncio.Semaphore, tool_s: float) -> Any:
    @tool
    async def work(seconds: float) -> str:
        """Do some slow external work."""
        await asyncio.sleep(seconds)
        return f"worked {seconds}"

    def model_node_for(model: GenericFakeChatModel) -> Callable[..., Any]:
        async def call_model(state: _AgentState) -> dict[str, list[AnyMessage]]:
            # One model server that serves one call at a time (FIFO), model_latency_s each.
            async with server:
                await asyncio.sleep(model_latency_s)
                reply = await model.ainvoke(state["messages"])
            return {"messages": [reply]}

        return call_model

    def build() -> Any:
        model = GenericFakeChatModel(
            messages=iter(
                [
                    AIMessage(
                        "",
                        tool_calls=[{"name": "work", "args": {"seconds": tool_s}, "id": "t1"}],
                    ),
                    AIMessage("finished"),
                ]
            )
        )
        graph = StateGraph(_AgentState)
        graph.add_node("model", model_node_for(model))
        graph.add_node("tools", ToolNode([work]))
        graph.add_edge(START, "model")
        graph.add_conditional_edges("model", tools_condition)
        graph.add_edge("tools", "model")
        return graph.compile()

    return build


def test_langgraph_agents_makespan_matches_the_analytic_value_exactly() -> None:
    n_agents, latency, tool_s = 8, 0.25, 5.0
    # Round 1: the server serves the n first calls back to back, agent i done at (i+1)*latency.
    # Each tool then takes tool_s >= (n-1)*latency, so round-2 calls never queue: agent i ends at
    # (i+1)*latency + tool_s + latency, and the last one at (n+1)*latency + tool_s.
    assert tool_s >= (n_agents - 1) * latency
    expected_ends = [(i + 1) * latency + tool_s + latency for i in range(n_agents)]

    async def main() -> tuple[list[float], list[list[AnyMessage]], float]:
        server = asyncio.Semaphore(1)
        build = _agent_graph(latency, server, tool_s)
        ends: list[float] = []
        outputs: list[list[AnyMessage]] = []

        async def agent(i: int) -> None:
            # Staggered by scheduling order only (same virtual start), so FIFO order is i.
            result = await build().ainvoke({"messages": [HumanMessage(f"task {i}")]})
            ends.append(vtime.virtual_now())
            outputs.append(result["messages"])

        await asyncio.gather(*(agent(i) for i in range(n_agents)))
        return ends, outputs, vtime.virtual_now()

    ends, outputs, makespan = vtime.run(main())
    assert sorted(ends) == expected_ends
    assert makespan == (n_agents + 1) * latency + tool_s == 7.25
    for messages in outputs:
        assert [type(m) for m in messages] == [HumanMessage, AIMessage, ToolMessage, AIMessage]
        assert messages[2].content == f"worked {tool_s}"
        assert messages[-1].content == "finished"
    # A second run of the same program reproduces the timeline.
    assert vtime.run(main())[0] == ends


# --- pytest integration ---------------------------------------------------------------------


def test_pytest_plugin_runs_marked_tests_on_a_virtual_loop(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
        addopts = --strict-markers -p no:cacheprovider
        """
    )
    pytester.makeconftest('pytest_plugins = ["concur_langgraph.testing.vtime_fixtures"]\n')
    pytester.makepyfile(
        """
        import asyncio
        import pytest
        from concur_langgraph.testing.vtime_fixtures import virtual_time
        from concur_langgraph.vtime import VirtualEventLoop

        @pytest.fixture
        async def warmed_up():
            await asyncio.sleep(10)
            yield asyncio.get_running_loop()
            await asyncio.sleep(5)

        @virtual_time
        async def test_marked(warmed_up):
            assert warmed_up is asyncio.get_running_loop()
            await asyncio.sleep(3600)
            assert asyncio.get_running_loop().time() == 3610.0

        async def test_unmarked():
            assert not isinstance(asyncio.get_running_loop(), VirtualEventLoop)

        class TestVirtualClass:
            pytestmark = virtual_time

            async def test_in_class(self):
                assert isinstance(asyncio.get_running_loop(), VirtualEventLoop)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=3)
