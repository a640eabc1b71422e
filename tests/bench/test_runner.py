"""End-to-end benchmark runs on the simulator in virtual time: complete, exact, repeatable."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from concur_langgraph import ConcurLaw, ConfigError, FitLaw, FixedLaw
from concur_langgraph.bench._bound import lower_bound
from concur_langgraph.bench._policies import LAWS, parse_policy, sweep_windows
from concur_langgraph.bench._runner import (
    RECORD_KEYS,
    SERIES_KEYS,
    SimBackend,
    UrlBackend,
    run_benchmark,
    run_one,
    sweep_summary,
)
from concur_langgraph.bench._workload import Workload, load_workload
from concur_langgraph.sim import Faults

TINY = SimBackend.preset("test-tiny")
# The server answers the first two chat calls with a 400 (the client does not retry on the
# simulator): two agents of the batch fail, as every agent did when light-8 outgrew cpu-tiny.
FAULTY = SimBackend(
    config=TINY.config,
    name="test-tiny",
    faults=Faults(chat="error", chat_status=400, chat_next=2),
)


def _without_wall(record: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in record.items() if k != "wall_s"}


@pytest.mark.parametrize("policy", ["none", "static:2", "concur"])
def test_record_is_complete_and_repeatable(tiny_workload: Workload, policy: str) -> None:
    first = run_one(tiny_workload, policy, TINY)
    second = run_one(tiny_workload, policy, TINY)
    assert set(RECORD_KEYS) <= set(first)
    # Virtual time: the same run gives the same numbers, series included.
    assert _without_wall(first) == _without_wall(second)

    plans = tiny_workload.plans()
    assert first["workload"] == "tiny"
    assert first["policy"] == policy
    assert first["backend"] == "sim:test-tiny"
    assert first["agents_ok"] == tiny_workload.agents
    assert first["agents_failed"] == 0
    assert first["errors"] == []
    assert first["status"] == "ok"
    assert first["generated_tokens"] == sum(sum(p.output_tokens) for p in plans)
    assert first["llm_calls"] == sum(p.steps for p in plans)
    assert first["tokens_per_s"] == pytest.approx(first["generated_tokens"] / first["makespan_s"])
    assert first["prompt_tokens_computed"] > 0
    assert 0 <= first["prefix_hit_rate"] <= 1
    assert first["lower_bound_s"] == lower_bound(tiny_workload, TINY.config).bound_s
    assert first["lower_bound_s"] <= first["makespan_s"]

    series = first["series"]
    assert list(series) == list(SERIES_KEYS)
    lengths = {len(column) for column in series.values()}
    assert len(lengths) == 1
    # One row per tick from t = 0, plus the state at the end.
    assert lengths.pop() == int(first["makespan_s"]) + 2
    assert series["t"][:3] == [0.0, 1.0, 2.0]
    assert series["finished"][-1] == tiny_workload.agents
    assert all(0 <= u <= 1 for u in series["kv_usage"])


def test_policies_shape_the_window(tiny_workload: Workload) -> None:
    none = run_one(tiny_workload, "none", TINY)
    static = run_one(tiny_workload, "static:2", TINY)
    adaptive = run_one(tiny_workload, "concur", TINY)
    assert none["window_peak"] is None and none["window_mean"] is None
    # Without a gate every agent is active from the start.
    assert none["series"]["active"][0] == tiny_workload.agents
    assert static["window_peak"] == 2 and static["window_mean"] == 2.0
    assert max(static["series"]["active"]) <= 2
    # The paper's law starts at W0 = 4 and grows while the cache is under-used.
    assert adaptive["series"]["window"][0] == 4
    assert adaptive["window_peak"] >= 4
    # Two agents at a time cannot beat everything at once on this workload.
    assert static["makespan_s"] > none["makespan_s"]


def test_static_sweep_reports_the_best_window(tiny_workload: Workload) -> None:
    records = run_benchmark(tiny_workload, ["static-sweep"], TINY, sweep=[1, 3, 6])
    assert [r["policy"] for r in records] == ["static:1", "static:3", "static:6", "static-sweep"]
    runs, summary = records[:3], records[3]
    best = min(runs, key=lambda r: r["makespan_s"])
    assert summary["makespan_s"] == best["makespan_s"]
    assert summary["best_k"] == int(best["policy"].removeprefix("static:"))
    assert summary["sweep"] == {r["policy"]: r["makespan_s"] for r in runs}


def test_lower_bound_parts(tiny_workload: Workload) -> None:
    bound = lower_bound(tiny_workload, TINY.config)
    plans = tiny_workload.plans()
    assert bound.critical_path_s >= max(sum(p.tool_latency_s) for p in plans)
    assert bound.decode_tokens == sum(sum(p.output_tokens) - p.steps for p in plans)
    assert bound.prefill_tokens == tiny_workload.system_prompt_tokens + sum(
        p.task_prompt_tokens + sum(p.observation_tokens) for p in plans
    )
    assert bound.bound_s == max(bound.work_s, bound.critical_path_s)


def test_policy_names(tiny_workload: Workload) -> None:
    assert parse_policy("none").make_law() is None
    assert parse_policy("static:8").make_law() == FixedLaw(8)
    assert isinstance(parse_policy("concur").make_law(), ConcurLaw)
    assert "concur" in LAWS
    auto = parse_policy("auto")
    # auto is the gate's own default (law=None), whatever that becomes.
    assert auto.auto and auto.gated and auto.make_law() is None
    with pytest.raises(ConfigError, match="static:K needs an integer K >= 1"):
        parse_policy("static:0")
    with pytest.raises(ConfigError, match="unknown policy 'fast'; known: none, static:K"):
        parse_policy("fast")
    with pytest.raises(ConfigError, match="static-sweep is several runs"):
        run_one(tiny_workload, "static-sweep", TINY)
    assert sweep_windows(10) == [2, 4, 8, 10]
    variant = parse_policy("fit:reopen=1,undo_cost_s=2.5")
    law = variant.make_law()
    assert variant.name == "fit:reopen=1,undo_cost_s=2.5" and variant.law == "fit"
    assert isinstance(law, FitLaw) and (law.reopen, law.undo_cost_s) == (1.0, 2.5)
    assert variant.make_law() is not law  # a fresh law per run
    with pytest.raises(ConfigError, match=r"'fit:nope=1': FitLaw.__init__\(\) got an unexpected"):
        parse_policy("fit:nope=1")
    with pytest.raises(ConfigError, match=r"'fit:reopen=2': reopen: must be a number"):
        parse_policy("fit:reopen=2")


def test_priority_policies_run_the_hint_on_a_priority_engine(tiny_workload: Workload) -> None:
    hinted = parse_policy("static:2+priority")
    assert hinted.priority_hint and hinted.fixed == 2 and hinted.name == "static:2+priority"
    assert parse_policy("auto+priority").auto and not parse_policy("auto").priority_hint
    with pytest.raises(ConfigError, match=r"'none\+priority': \+priority is the gate's hint"):
        parse_policy("none+priority")
    plain, record = (
        run_one(tiny_workload, "static:2", TINY),
        run_one(tiny_workload, "static:2+priority", TINY),
    )
    assert record["policy"] == "static:2+priority" and record["status"] == "ok"
    assert record["agents_ok"] == tiny_workload.agents
    # Two agents at a time never fill test-tiny's queue: the order changes nothing here.
    assert record["makespan_s"] == plain["makespan_s"]


def test_url_backend_validates() -> None:
    with pytest.raises(ConfigError, match="url: 'localhost:8000' is not an http"):
        UrlBackend(url="localhost:8000")
    assert UrlBackend(url="http://h:1/v1/").root == "http://h:1"


def test_a_workload_that_cannot_fit_is_refused_before_running(tiny_workload: Workload) -> None:
    short = SimBackend(
        config=dataclasses.replace(TINY.config, max_model_len=200), name="short.json"
    )
    # 16 + 20 + 4 x 15 + 3 x 30 + 10 x 8 = 266 tokens at the maxima.
    with pytest.raises(ConfigError) as refused:
        run_benchmark(tiny_workload, ["none", "static-sweep"], short)
    message = str(refused.value)
    assert message.startswith("workload tiny: an agent's context can reach 266 tokens")
    assert "the server's max_model_len is 200 (sim config short.json)" in message
    with pytest.raises(ConfigError, match=r"max_model_len is 2048 \(sim preset cpu-tiny\)"):
        run_one(load_workload("light-8"), "none", SimBackend.preset("cpu-tiny"))


def test_failed_agents_mark_the_record_failed(tiny_workload: Workload) -> None:
    record = run_one(tiny_workload, "none", FAULTY)
    assert record["backend"] == "sim:test-tiny+faults"
    assert record["status"] == "failed"
    assert (record["agents_ok"], record["agents_failed"]) == (4, 2)
    # Distinct errors: two agents failed the same way, the record says it once.
    assert record["errors"] == ["OpenAIInvalidRequestError: Error code: 400 - injected fault"]
    # The four others ran to the end; the failed ones stop counting as active when they fail.
    assert record["series"]["finished"][-1] == 4
    assert record["series"]["active"][-1] == 0
    plans = tiny_workload.plans()
    assert record["llm_calls"] == sum(p.steps for p in plans) - sum(p.steps for p in plans[:2])


def test_a_sweep_whose_every_window_failed_has_no_best(tiny_workload: Workload) -> None:
    records = run_benchmark(tiny_workload, ["static-sweep"], FAULTY, sweep=[1, 3])
    assert [r["policy"] for r in records] == ["static:1", "static:3", "static-sweep"]
    assert all(r["status"] == "failed" for r in records)
    summary = records[-1]
    assert set(RECORD_KEYS) <= set(summary)
    assert summary["best_k"] is None
    assert summary["makespan_s"] is None and summary["tokens_per_s"] is None
    assert summary["agents_ok"] is None and summary["series"] is None
    assert summary["sweep"] == {"static:1": None, "static:3": None}
    assert summary["errors"] == records[0]["errors"]


def _run(policy: str, makespan: float, failed: int) -> dict[str, Any]:
    status = "failed" if failed else "ok"
    return {"policy": policy, "makespan_s": makespan, "agents_failed": failed, "status": status}


def test_sweep_summary_never_picks_a_failed_window() -> None:
    runs = [_run("static:2", 5.0, 3), _run("static:4", 9.0, 0), _run("static:8", 7.0, 0)]
    summary = sweep_summary(runs)
    assert summary["best_k"] == 8 and summary["makespan_s"] == 7.0
    assert summary["status"] == "ok"
    # A failed window's makespan compares to nothing: it is left out of the sweep.
    assert summary["sweep"] == {"static:2": None, "static:4": 9.0, "static:8": 7.0}
    # Records written before `status` existed: a failed agent makes the run failed.
    old = [{k: v for k, v in r.items() if k != "status"} for r in runs]
    assert sweep_summary(old)["best_k"] == 8


@pytest.fixture
def models_server() -> Iterator[str]:
    """A server that only lists one model with ``max_model_len`` 200 (as vLLM's card does)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self.send_error(404)
                return
            body = json.dumps(
                {"object": "list", "data": [{"id": "tiny", "max_model_len": 200}]}
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("model", [None, "tiny"])
def test_a_real_server_refuses_a_workload_longer_than_its_max_model_len(
    tiny_workload: Workload, models_server: str, model: str | None
) -> None:
    backend = UrlBackend(url=models_server, model=model)
    with pytest.raises(ConfigError) as refused:
        run_one(tiny_workload, "none", backend)
    message = str(refused.value)
    assert message.startswith("workload tiny: an agent's context can reach 266 tokens")
    assert f"max_model_len is 200 (vllm:{models_server}, from its /v1/models)" in message
