"""The makespan lower bound: its KV-capacity term, and that no simulated run beats it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from concur_langgraph.bench._bound import lower_bound
from concur_langgraph.bench._runner import SimBackend, run_one
from concur_langgraph.bench._workload import Workload
from concur_langgraph.sim import get_preset

TEST_TINY = get_preset("test-tiny")
# The smallest cache test-tiny accepts (it must hold one max_model_len request): the tiny
# workload's histories then need more steps than its per-step limits do.
SMALL_CACHE = dataclasses.replace(TEST_TINY, num_blocks=TEST_TINY.max_model_len // 16)


def test_resident_tokens_count_each_agents_own_history_before_each_decode() -> None:
    one = Workload.from_dict(
        {
            "name": "one",
            "agents": 1,
            "seed": 0,
            "system_prompt_tokens": 10,
            "task_prompt_tokens": {"const": 5},
            "steps": {"const": 2},
            "output_tokens": {"const": 3},
            "observation_tokens": {"const": 7},
            "tool_latency_s": {"const": 1.0},
        },
        source="one",
    )
    bound = lower_bound(one, TEST_TINY)
    # Call 1: prompt 10 + 5; decodes 2 and 3 see 15 and 16 computed tokens, 5 and 6 of them
    # the agent's own. Call 2: prompt 15 + 3 + 7 = 25; decodes see 25 and 26 -> 15 and 16 own.
    assert bound.resident_tokens == (5 + 6) + (15 + 16)
    assert bound.decode_tokens == 4


def test_a_smaller_cache_needs_more_steps_and_raises_the_bound(tiny_workload: Workload) -> None:
    roomy = lower_bound(tiny_workload, TEST_TINY)
    small = lower_bound(tiny_workload, SMALL_CACHE)
    capacity = SMALL_CACHE.num_blocks * SMALL_CACHE.block_size
    assert small.resident_tokens == roomy.resident_tokens
    assert small.min_steps == math.ceil(small.resident_tokens / capacity)
    assert small.min_steps > roomy.min_steps
    assert small.work_s > roomy.work_s
    assert small.bound_s == max(small.work_s, small.critical_path_s)


# Twelve agents, short tools, histories of 100-300 tokens against a 512-token cache: the bound
# is set by the capacity term (without it the work limit would be well under half of it).
PACKED = {
    "name": "packed",
    "agents": 12,
    "seed": 5,
    "system_prompt_tokens": 16,
    "task_prompt_tokens": {"uniform": [40, 60]},
    "steps": {"const": 3},
    "output_tokens": {"const": 40},
    "observation_tokens": {"uniform": [40, 60]},
    "tool_latency_s": {"const": 0.01},
}


@pytest.mark.parametrize("policy", ["none", "static:2", "static:4"])
def test_no_run_beats_the_capacity_bound(policy: str) -> None:
    packed = Workload.from_dict(PACKED, source="packed")
    bound = lower_bound(packed, SMALL_CACHE)
    unlimited = lower_bound(packed, dataclasses.replace(SMALL_CACHE, num_blocks=1 << 20))
    assert bound.bound_s == bound.work_s > 2 * unlimited.bound_s
    record = run_one(packed, policy, SimBackend(config=SMALL_CACHE, name="small-cache"))
    assert record["agents_ok"] == packed.agents
    assert record["lower_bound_s"] == bound.bound_s
    assert record["lower_bound_s"] <= record["makespan_s"]
