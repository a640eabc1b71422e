"""The pressure regime on a real vLLM: the medium model's server (94M parameters, an
8,192-token KV cache, docs/real-vllm.md "The medium model") thrashes under a batch of agents
with no admission control, and a small window stops it.

Counts, never times: vLLM's own counters (prompt tokens computed, i.e. prompt minus cached,
and preemptions) and the agents' outcomes. The batch is sized so that without control the
agents' contexts together (~30k tokens at the end) are several times the cache and their
first requests, all sent at once, fill it (decodes that cross a block boundary then preempt),
while five agents at their largest (at most 12 blocks of 128 each: 60 of the 63 usable) can
never be preempted. Each run starts from a flushed prefix cache, as on a fresh server.

Measured (2026-12-02): without control 4 preemptions in each of three runs, ~47,100 prompt
tokens computed, hit rate 0.171; with a window of 4, 0 preemptions, 29,041 tokens, hit rate
0.489. This test passed with windows of 4 and of 5. The simulator (``cpu-medium``) gives 4-6
preemptions over seeds without control, 0 and the same 29k tokens with a window of 4 or 5.
~85 s of runs and flushing, plus the server's start-up (~25-35 s).
"""

from __future__ import annotations

import pytest

from concur_langgraph.bench._runner import UrlBackend, run_one
from concur_langgraph.bench._workload import Workload
from concur_langgraph.testing.vllm_cpu import RunningServer, flush_prefix_cache

WORKLOAD = Workload.from_dict(
    {
        "name": "medium-thrash",
        "agents": 24,
        "seed": 14,
        "system_prompt_tokens": 200,
        "task_prompt_tokens": {"uniform": [100, 200]},
        "steps": {"const": 3},
        "output_tokens": {"const": 64},
        "observation_tokens": {"uniform": [300, 400]},
        "tool_latency_s": {"uniform": [0.1, 0.3]},
    },
    source="test_medium_live",
)
WINDOW = 5


@pytest.mark.timeout(420)
def test_a_small_window_computes_and_preempts_less_and_every_agent_finishes(
    real_vllm_medium: RunningServer,
) -> None:
    backend = UrlBackend(url=real_vllm_medium.base_url, model=real_vllm_medium.model)
    records = {}
    for policy in ("none", f"static:{WINDOW}"):
        flush_prefix_cache(real_vllm_medium.base_url, model=real_vllm_medium.model)
        records[policy] = run_one(WORKLOAD, policy, backend, interval_s=0.5)
    none, window = records["none"], records[f"static:{WINDOW}"]
    for record in records.values():
        assert record["status"] == "ok", record["errors"]
        assert record["agents_ok"] == WORKLOAD.agents
        assert record["llm_calls"] == WORKLOAD.agents * 3
    # Without control the cache thrashes: requests are preempted and contexts re-prefilled.
    assert none["preemptions"] > 0
    assert window["preemptions"] < none["preemptions"]
    assert window["prompt_tokens_computed"] < 0.8 * none["prompt_tokens_computed"]
    assert window["prefix_hit_rate"] > none["prefix_hit_rate"]
    assert window["window_peak"] == WINDOW
