"""The simulator's fault-injection mode, seen from an HTTP client: each fault, the admin routes,
settings validation, and that no fault means no change."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph import ConfigError, vtime
from concur_langgraph.sim import SimServer, create_app
from concur_langgraph.sim._cli import faults_from_settings
from concur_langgraph.sim._faults import (
    FaultInjector,
    Faults,
    TimeoutASGITransport,
    parse_fault_setting,
)

CHAT = {"model": "test-tiny", "messages": [{"role": "user", "content": "hello there"}]}


def _counter(page: str, name: str) -> float:
    """The value of a series, summed over its labels."""
    values = [
        float(sample.value)
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name
    ]
    assert values, f"{name} not in the page"
    return sum(values)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"metrics": "sometimes"}, "metrics"),
        ({"metrics_status": 200}, "metrics_status"),
        ({"metrics_delay_s": -1}, "metrics_delay_s"),
        ({"metrics_delay_s": float("inf")}, "metrics_delay_s"),
        ({"chat": "explode"}, "chat"),
        ({"chat_status": 600}, "chat_status"),
        ({"chat_status": True}, "chat_status"),
        ({"chat_retry_after_s": -0.5}, "chat_retry_after_s"),
        ({"chat_fraction": 0}, "chat_fraction"),
        ({"chat_fraction": 1.5}, "chat_fraction"),
        ({"chat_next": 0}, "chat_next"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        Faults(**kwargs)


def test_the_cli_reads_fault_settings_and_names_a_bad_one() -> None:
    assert parse_fault_setting("chat_status=429") == ("chat_status", 429)
    assert parse_fault_setting("metrics=down") == ("metrics", "down")
    assert parse_fault_setting("chat_retry_after_s=null") == ("chat_retry_after_s", None)
    faults = faults_from_settings(["chat=error", "chat_status=429", "chat_fraction=0.25"])
    assert faults == Faults(chat="error", chat_status=429, chat_fraction=0.25)
    assert faults_from_settings(None) == Faults()
    with pytest.raises(ConfigError, match="unknown field 'metric'"):
        faults_from_settings(["metric=down"])
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        faults_from_settings(["metrics"])
    with pytest.raises(ConfigError, match=r"^--fault chat_status: "):
        faults_from_settings(["chat_status=abc"])


def test_without_a_fault_every_answer_is_as_without_an_injector() -> None:
    async def main() -> None:
        async with SimServer("test-tiny") as server:
            plain = create_app(server.engine)
            async with (
                server.http_client() as faulted,
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=plain), base_url=server.root_url
                ) as bare,
            ):
                assert (await faulted.post("/v1/chat/completions", json=CHAT)).status_code == 200
                one, two = await faulted.get("/metrics"), await bare.get("/metrics")
                assert one.status_code == two.status_code == 200
                assert one.headers["content-type"] == two.headers["content-type"]
                # Same engine, same counters; only the `_created` stamps are per app.
                strip = [ln for ln in one.text.splitlines() if "_created{" not in ln]
                assert strip == [ln for ln in two.text.splitlines() if "_created{" not in ln]
                # The admin routes exist only with an injector.
                assert (await bare.get("/_sim/faults")).status_code == 404

    vtime.run(main())


@pytest.mark.parametrize("fault", ["down", "error", "garbage", "html"])
def test_each_metrics_fault_as_a_client_sees_it(fault: str) -> None:
    async def main() -> httpx.Response | Exception:
        async with (
            SimServer("test-tiny", faults=Faults(metrics=fault)) as server,  # type: ignore[arg-type]
            server.http_client() as client,
        ):
            try:
                return await client.get("/metrics")
            except httpx.HTTPError as exc:
                return exc

    answer = vtime.run(main())
    if fault == "down":
        assert isinstance(answer, httpx.RemoteProtocolError)
        return
    assert isinstance(answer, httpx.Response)
    if fault == "error":
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == 503
    elif fault == "garbage":
        assert answer.status_code == 200
        with pytest.raises(ValueError):
            list(text_string_to_metric_families(answer.text))
    else:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/html")
        assert "502 Bad Gateway" in answer.text


def test_slow_metrics_answer_late_and_correct() -> None:
    async def main() -> tuple[float, httpx.Response]:
        faults = Faults(metrics="slow", metrics_delay_s=7.5)
        async with SimServer("test-tiny", faults=faults) as server, server.http_client() as client:
            loop = asyncio.get_running_loop()
            start = loop.time()
            answer = await client.get("/metrics")
            return loop.time() - start, answer

    took, answer = vtime.run(main())
    assert took == 7.5
    assert answer.status_code == 200
    assert _counter(answer.text, "vllm:num_requests_running") == 0.0


def test_a_counter_reset_starts_every_counter_again_from_zero() -> None:
    async def main() -> list[str]:
        async with SimServer("test-tiny") as server, server.http_client() as client:
            pages = []
            await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
            pages.append((await client.get("/metrics")).text)
            reset = await client.post("/_sim/reset-counters")
            assert reset.json()["statistics"]["counter_resets"] == 1
            pages.append((await client.get("/metrics")).text)
            await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
            pages.append((await client.get("/metrics")).text)
            server.reset_counters()  # the same, in process
            pages.append((await client.get("/metrics")).text)
            assert server.faults.statistics().counter_resets == 2
            return pages

    before, after, later, again = vtime.run(main())
    assert _counter(again, "vllm:generation_tokens_total") == 0
    for name in ("vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        assert _counter(before, name) > 0
        assert _counter(after, name) == 0
    assert _counter(later, "vllm:generation_tokens_total") == 3
    assert _counter(later, "vllm:request_success_total") == 1


@pytest.mark.parametrize(("status", "retry_after"), [(500, None), (503, 2.0), (429, 1.5)])
def test_the_next_n_chat_calls_fail_with_the_status_then_calls_succeed(
    status: int, retry_after: float | None
) -> None:
    async def main() -> tuple[list[httpx.Response], Any, int]:
        faults = Faults(
            chat="error", chat_status=status, chat_retry_after_s=retry_after, chat_next=2
        )
        async with SimServer("test-tiny", faults=faults) as server, server.http_client() as client:
            answers = [
                await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
                for _ in range(4)
            ]
            return answers, server.faults.statistics(), server.engine.metrics().generation_tokens

    answers, stats, generated = vtime.run(main())
    assert [a.status_code for a in answers] == [status, status, 200, 200]
    assert answers[0].json()["error"]["code"] == status
    if retry_after is None:
        assert "retry-after" not in answers[0].headers
    else:
        assert float(answers[0].headers["retry-after"]) == retry_after
    assert (stats.chat_calls, stats.chat_faulted, stats.chat_next_left) == (4, 2, 0)
    assert generated == 4  # the faulted calls never reached the engine


def test_a_fraction_of_calls_fails_and_the_seed_decides_which() -> None:
    def pattern(seed: int) -> list[int]:
        async def main() -> list[int]:
            faults = Faults(chat="error", chat_status=500, chat_fraction=0.3, seed=seed)
            async with (
                SimServer("test-tiny", faults=faults) as server,
                server.http_client() as client,
            ):
                return [
                    (
                        await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1})
                    ).status_code
                    for _ in range(40)
                ]

        return vtime.run(main())

    first = pattern(7)
    assert first == pattern(7)
    assert set(first) == {200, 500}
    assert first != pattern(8)


def test_a_hung_call_ends_at_the_clients_read_timeout_and_leaves_nothing_running() -> None:
    async def main() -> tuple[float, Exception, Any]:
        async with SimServer("test-tiny", faults=Faults(chat="hang", chat_next=1)) as server:
            transport = TimeoutASGITransport(server.app)
            async with httpx.AsyncClient(
                transport=transport, base_url=server.root_url, timeout=12.0
            ) as client:
                loop = asyncio.get_running_loop()
                start = loop.time()
                try:
                    await client.post("/v1/chat/completions", json=CHAT)
                except httpx.HTTPError as exc:
                    error: Exception = exc
                else:
                    raise AssertionError("the hung call answered")
                took = loop.time() - start
                # The fault is spent: the next call is served normally, through the same client.
                ok = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
                assert ok.status_code == 200
                return took, error, server.engine.metrics()

    took, error, metrics = vtime.run(main())
    assert isinstance(error, httpx.ReadTimeout)
    assert took == 12.0
    assert (metrics.num_requests_running, metrics.num_requests_waiting) == (0, 0)


def test_a_slow_stream_is_not_a_timeout_while_chunks_keep_coming() -> None:
    # The read timeout bounds the silence between chunks, not the whole answer, as on a socket.
    async def main() -> tuple[float, int]:
        async with SimServer("cpu-tiny") as server:
            transport = TimeoutASGITransport(server.app)
            async with httpx.AsyncClient(
                transport=transport, base_url=server.root_url, timeout=1.0
            ) as client:
                loop = asyncio.get_running_loop()
                start = loop.time()
                body = {
                    **CHAT,
                    "model": server.model_name,
                    "max_tokens": 400,
                    "ignore_eos": True,
                    "stream": True,
                }
                answer = await client.post("/v1/chat/completions", json=body)
                return loop.time() - start, answer.text.count("data: ")

    took, events = vtime.run(main())
    assert took > 1.0  # longer than the read timeout in all
    assert events > 400


def test_faults_change_over_http_while_the_server_runs() -> None:
    async def main() -> list[Any]:
        async with SimServer("test-tiny") as server, server.http_client() as client:
            seen: list[Any] = []
            seen.append((await client.get("/_sim/faults")).json()["faults"])
            changed = await client.post("/_sim/faults", json={"metrics": "error"})
            seen.append(changed.json()["faults"]["metrics"])
            seen.append((await client.get("/metrics")).status_code)
            bad = await client.post("/_sim/faults", json={"chat_fraction": 2})
            seen.append((bad.status_code, bad.json()["error"]["message"]))
            unknown = await client.post("/_sim/faults", json={"nope": 1})
            seen.append((unknown.status_code, unknown.json()["error"]["message"]))
            not_json = await client.post("/_sim/faults", content=b"{")
            seen.append(not_json.status_code)
            seen.append((await client.get("/metrics")).status_code)  # unchanged by the refusals
            cleared = await client.post("/_sim/faults", json={})
            seen.append(cleared.json()["faults"] == Faults().to_json())
            seen.append((await client.get("/metrics")).status_code)
            stats = (await client.get("/_sim/faults")).json()["statistics"]
            seen.append((stats["metrics_scrapes"], stats["metrics_faulted"]))
            return seen

    seen = vtime.run(main())
    assert seen[0] == Faults().to_json()
    assert seen[1] == "error"
    assert seen[2] == 503
    assert seen[3][0] == 400 and seen[3][1].startswith("chat_fraction: ")
    assert seen[4][0] == 400 and "unknown field(s) nope" in seen[4][1]
    assert seen[5] == 400
    assert seen[6] == 503
    assert seen[7] is True
    assert seen[8] == 200
    assert seen[9] == (3, 2)


def test_faults_work_in_real_time_too() -> None:
    # An ordinary event loop: the delay is real (kept tiny), the faults are the same.
    async def main() -> tuple[float, int, int]:
        faults = Faults(metrics="slow", metrics_delay_s=0.01, chat="error", chat_status=503)
        async with SimServer("test-tiny", faults=faults) as server, server.http_client() as client:
            loop = asyncio.get_running_loop()
            start = loop.time()
            scrape = await client.get("/metrics")
            took = loop.time() - start
            chat = await client.post("/v1/chat/completions", json=CHAT)
            return took, scrape.status_code, chat.status_code

    took, scrape, chat = asyncio.run(main())
    assert took >= 0.01
    assert (scrape, chat) == (200, 503)


def test_an_injector_shared_by_two_servers_and_bad_inputs() -> None:
    injector = FaultInjector(Faults(chat="error"))
    one, two = SimServer("test-tiny", faults=injector), SimServer("test-tiny", faults=injector)
    assert one.faults is two.faults is injector
    with pytest.raises(ConfigError, match=r"^faults: "):
        SimServer("test-tiny", faults={"chat": "error"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^faults: "):
        injector.set("down")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^faults: expected a JSON object"):
        Faults.from_json([1])
    injector.clear()
    assert not injector.faults.active
    assert json.loads(json.dumps(injector.faults.to_json())) == Faults().to_json()


def test_a_truncated_page_is_valid_prometheus_text_without_the_counters() -> None:
    async def main() -> httpx.Response:
        async with (
            SimServer("test-tiny", faults=Faults(metrics="truncated")) as server,
            server.http_client() as client,
        ):
            return await client.get("/metrics")

    answer = vtime.run(main())
    assert answer.status_code == 200
    names = {s.name for f in text_string_to_metric_families(answer.text) for s in f.samples}
    assert "vllm:kv_cache_usage_perc" in names
    assert "vllm:num_requests_running" in names
    assert not any(name.endswith("_total") for name in names)
