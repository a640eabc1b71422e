"""SimCluster: N replicas in one virtual-time process, each with its own engine and /metrics,
one transport dispatching by host, and replica death as a crashed server shows it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph import ConfigError
from concur_langgraph.sim import Faults, SimCluster
from concur_langgraph.testing.vtime_fixtures import virtual_time

pytestmark = virtual_time


def _body(max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }


async def _counter(client: httpx.AsyncClient, root: str, name: str) -> float:
    response = await client.get(f"{root}/metrics")
    response.raise_for_status()
    return sum(
        s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
        if s.name == name
    )


async def test_urls_follow_the_replica_hosts() -> None:
    async with SimCluster("cpu-tiny", replicas=3) as cluster:
        assert cluster.root_urls == [f"http://replica-{i}.concur-sim" for i in range(3)]
        assert cluster.base_urls == [f"http://replica-{i}.concur-sim/v1" for i in range(3)]
        assert [s.root_url for s in cluster.servers] == cluster.root_urls
        assert len({id(s.engine) for s in cluster.servers}) == 3
        assert len(cluster) == 3


async def test_requests_reach_the_replica_their_host_names_and_metrics_are_per_replica() -> None:
    async with SimCluster("cpu-tiny", replicas=3) as cluster, cluster.http_client() as client:
        roots = cluster.root_urls
        for _ in range(2):
            r = await client.post(f"{roots[1]}/v1/chat/completions", json=_body())
            assert r.status_code == 200
        r = await client.post(f"{roots[2]}/v1/chat/completions", json=_body())
        assert r.status_code == 200
        successes = [sum(s.engine.metrics().request_success.values()) for s in cluster.servers]
        assert successes == [0, 2, 1]
        generated = [await _counter(client, root, "vllm:generation_tokens_total") for root in roots]
        assert generated == [0.0, 8.0, 4.0]
        # The default base URL is replica 0's.
        r = await client.post("/v1/chat/completions", json=_body())
        assert r.status_code == 200
        assert sum(cluster.servers[0].engine.metrics().request_success.values()) == 1


async def test_a_shared_prefix_is_cached_per_replica_only() -> None:
    async with SimCluster("cpu-tiny", replicas=2) as cluster, cluster.http_client() as client:
        long = " ".join(["token"] * 200)
        body = _body(messages=[{"role": "user", "content": long}])
        roots = cluster.root_urls
        first = (await client.post(f"{roots[0]}/v1/chat/completions", json=body)).json()
        again = (await client.post(f"{roots[0]}/v1/chat/completions", json=body)).json()
        other = (await client.post(f"{roots[1]}/v1/chat/completions", json=body)).json()
        cached = [
            x["usage"]["prompt_tokens_details"]["cached_tokens"] for x in (first, again, other)
        ]
        assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0


async def test_an_unknown_host_is_a_connect_error_naming_it() -> None:
    async with SimCluster("cpu-tiny", replicas=2) as cluster, cluster.http_client() as client:
        with pytest.raises(httpx.ConnectError, match=r"replica-7\.concur-sim"):
            await client.get("http://replica-7.concur-sim/metrics")


async def test_chat_model_talks_to_replica_0_through_the_dispatch_transport() -> None:
    async with SimCluster("cpu-tiny", replicas=2) as cluster:
        model = cluster.chat_model(max_tokens=3)
        reply = await model.ainvoke([HumanMessage(content="hello")])
        assert isinstance(reply, AIMessage)
        assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 3
        successes = [sum(s.engine.metrics().request_success.values()) for s in cluster.servers]
        assert successes == [1, 0]


@pytest.mark.parametrize("stream", [False, True])
async def test_kill_drops_requests_in_flight_refuses_new_ones_and_stops_the_engine(
    stream: bool,
) -> None:
    loop = asyncio.get_running_loop()
    async with SimCluster("cpu-tiny", replicas=2) as cluster, cluster.http_client() as client:
        roots = cluster.root_urls
        long_body = _body(max_tokens=1000, stream=stream)
        doomed = asyncio.create_task(client.post(f"{roots[0]}/v1/chat/completions", json=long_body))
        survivor = asyncio.create_task(
            client.post(f"{roots[1]}/v1/chat/completions", json=_body(max_tokens=1000))
        )
        await asyncio.sleep(0.5)
        engine = cluster.servers[0].engine
        assert engine.metrics().num_requests_running == 1
        assert cluster.in_flight(0) == 1
        t_kill = loop.time()
        cluster.kill(0)
        with pytest.raises(httpx.RemoteProtocolError, match="replica 0"):
            await doomed
        assert loop.time() == t_kill  # the connection drops at once, not at the next step
        assert cluster.in_flight(0) == 0
        assert not cluster.alive(0) and cluster.alive(1)
        with pytest.raises(httpx.ConnectError, match="refused"):
            await client.post(f"{roots[0]}/v1/chat/completions", json=_body())
        with pytest.raises(httpx.ConnectError, match="refused"):
            await client.get(f"{roots[0]}/metrics")
        await asyncio.sleep(1.0)
        # Its engine stopped: the request was aborted, nothing runs, no step is taken.
        metrics = engine.metrics()
        assert metrics.num_requests_running == 0 and metrics.num_requests_aborted == 1
        steps = metrics.num_steps
        await asyncio.sleep(5.0)
        assert engine.metrics().num_steps == steps
        # The other replica is untouched.
        done = await survivor
        assert done.status_code == 200
        assert done.json()["usage"]["completion_tokens"] == 1000
        cluster.kill(0)  # idempotent


async def test_a_client_that_goes_away_cancels_as_usual_not_as_a_dead_replica() -> None:
    async with SimCluster("cpu-tiny", replicas=1) as cluster, cluster.http_client() as client:
        task = asyncio.create_task(client.post("/v1/chat/completions", json=_body(max_tokens=500)))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        metrics = cluster.servers[0].engine.metrics()
        assert metrics.num_requests_aborted == 1 and metrics.num_requests_running == 0
        assert cluster.alive(0)


async def test_revive_brings_a_fresh_replica_on_the_same_host() -> None:
    async with SimCluster("cpu-tiny", replicas=2) as cluster, cluster.http_client() as client:
        root = cluster.root_urls[0]
        assert (await client.post(f"{root}/v1/chat/completions", json=_body())).status_code == 200
        old = cluster.servers[0]
        cluster.revive(0)  # alive: nothing happens
        assert cluster.servers[0] is old
        cluster.kill(0)
        cluster.revive(0)
        assert cluster.alive(0) and cluster.servers[0] is not old
        assert await _counter(client, root, "vllm:generation_tokens_total") == 0.0
        assert (await client.post(f"{root}/v1/chat/completions", json=_body())).status_code == 200
        assert await _counter(client, root, "vllm:generation_tokens_total") == 4.0


async def test_faults_apply_per_replica() -> None:
    faults = [None, Faults(metrics="error")]
    async with SimCluster("cpu-tiny", replicas=2, faults=faults) as cluster:
        async with cluster.http_client() as client:
            ok = await client.get(f"{cluster.root_urls[0]}/metrics")
            bad = await client.get(f"{cluster.root_urls[1]}/metrics")
        assert ok.status_code == 200 and bad.status_code == 503


async def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match="replicas"):
        SimCluster("cpu-tiny", replicas=0)
    with pytest.raises(ConfigError, match="faults"):
        SimCluster("cpu-tiny", replicas=2, faults=[None])
    with pytest.raises(ConfigError, match="engine"):
        SimCluster("cpu-tiny", replicas=2, engine="tgi")
    with pytest.raises(ConfigError, match="config"):
        SimCluster(42, replicas=2)  # type: ignore[arg-type]
    cluster = SimCluster("cpu-tiny", replicas=2)
    with pytest.raises(ConfigError, match="replica"):
        cluster.kill(2)
