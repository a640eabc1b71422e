"""Replicas over real sockets: two served simulators, the routing client on a real HTTP
transport, and one replica's process killed mid-batch (SIGKILL): the batch finishes on the
other, nothing lost. Real time (a few seconds); the exact placement rules are checked in
virtual time (tests/core/test_replica_gate.py, test_replica_routing.py)."""

from __future__ import annotations

import asyncio

import httpx
from langchain_openai import ChatOpenAI

from concur_langgraph import ConcurGate, FixedLaw, routed_http_client
from concur_langgraph.testing.agent_loop import loop_tasks, observation_loop
from concur_langgraph.testing.sim_process import served_simulator

AGENTS = 8
STEPS = 6


def test_a_replica_process_killed_mid_batch_loses_nothing() -> None:
    with (
        served_simulator("--preset", "test-tiny") as first,
        served_simulator("--preset", "test-tiny") as second,
    ):

        async def main() -> tuple[list[dict[str, object]], object]:
            async with routed_http_client() as client:
                return await batch(client)

        async def batch(client: httpx.AsyncClient) -> tuple[list[dict[str, object]], object]:
            model = ChatOpenAI(
                model="test-tiny",
                base_url=f"{first.url}/v1",
                api_key="EMPTY",  # type: ignore[arg-type]
                max_tokens=8,  # type: ignore[call-arg]
                max_retries=2,  # the default: the retry goes to the agent's new replica
                extra_body={"ignore_eos": True},
                http_async_client=client,
            )
            graph = observation_loop(model, steps=STEPS, tool_s=0.3)
            async with ConcurGate(
                graph,
                vllm_url=[first.url, second.url],
                law=FixedLaw(8),
                interval_s=0.2,
                progress=False,
            ) as gate:
                running = asyncio.create_task(gate.abatch(loop_tasks(AGENTS)))
                # real-time ok: real server processes; the batch needs >= 2.1 s of tool time
                # alone, so 1 s in is mid-batch however loaded the machine is.
                await asyncio.sleep(1.0)
                assert not running.done()
                second.proc.kill()  # a crashed replica: connections refused from now on
                results = await running
                return results, gate.statistics()

        results, stats = asyncio.run(main())
    assert len(results) == AGENTS
    assert all(len(r["messages"]) == 1 + 2 * STEPS + 1 for r in results)  # type: ignore[arg-type]
    replicas = stats.replicas  # type: ignore[attr-defined]
    assert [r.alive for r in replicas] == [True, False]
    # Every agent started on one of the two; the dead one's were placed again on the first.
    assert replicas[0].placed_total + replicas[1].placed_total >= AGENTS
    assert replicas[0].gate.completed + replicas[1].gate.completed == AGENTS
