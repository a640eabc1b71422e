"""Workload files: validation messages, deterministic draws, the shipped presets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from concur_langgraph import ConfigError
from concur_langgraph.bench._workload import Workload, load_workload, workload_presets
from concur_langgraph.sim._presets import get_preset

# Which simulator preset each shipped workload is sized for (as benchmarks/run_all.py runs it).
SIZED_FOR = {
    "paper-256": "h100-qwen3-32b-tp2",
    "light-8": "h100-qwen3-32b-tp2",
    "swe-long": "h100-qwen3-32b-tp2",
    "demo": "h100-qwen3-32b-tp2",
    "real-24": "cpu-tiny",
}


def _write(tmp_path: Path, raw: Any) -> Path:
    path = tmp_path / "w.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("agents", 0, "agents: must be an integer >= 1, got 0"),
        ("seed", "x", "seed: must be an integer"),
        ("steps", {"uniform": [5, 2]}, "steps.uniform: high (2) must be >= low (5)"),
        ("steps", {"const": 0}, "steps.const: must be >= 1, got 0"),
        ("output_tokens", {"const": 2.5}, "output_tokens.const: the value must be an integer"),
        ("tool_latency_s", {"gauss": 1}, "tool_latency_s: unknown distribution 'gauss'"),
        ("tool_latency_s", {"uniform": [-1.0, 1.0]}, "tool_latency_s.uniform: low must be >= 0"),
        (
            "observation_tokens",
            {"lognormal": {"median": 100, "sigma": 0.5}},
            "observation_tokens.lognormal: expected",
        ),
        (
            "observation_tokens",
            {"lognormal": {"median": 100, "sigma": 0.5, "max": 50}},
            "observation_tokens.lognormal.max: must be >= median",
        ),
        ("task_prompt_tokens", {"const": 1, "uniform": [1, 2]}, "task_prompt_tokens: expected"),
    ],
)
def test_bad_field_is_named_with_the_file(
    tmp_path: Path, tiny_dict: dict[str, Any], field: str, value: Any, message: str
) -> None:
    tiny_dict[field] = value
    path = _write(tmp_path, tiny_dict)
    with pytest.raises(ConfigError) as info:
        load_workload(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_and_unknown_fields(tmp_path: Path, tiny_dict: dict[str, Any]) -> None:
    del tiny_dict["steps"]
    tiny_dict["agent"] = 3
    with pytest.raises(ConfigError, match="unknown field"):
        load_workload(_write(tmp_path, tiny_dict))
    del tiny_dict["agent"]
    with pytest.raises(ConfigError, match=r"missing field\(s\) steps"):
        load_workload(_write(tmp_path, tiny_dict))


def test_not_json_missing_file_and_unknown_preset(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        load_workload(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_workload(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"neither a JSON file nor a preset; presets: .*light-8"):
        load_workload("no-such-preset")


def test_draws_are_deterministic_and_per_agent(tiny_dict: dict[str, Any]) -> None:
    one = Workload.from_dict(tiny_dict)
    again = Workload.from_dict(tiny_dict)
    assert one.plans() == again.plans()
    # An agent's plan depends on the seed and its index only, not on the batch size.
    bigger = Workload.from_dict({**tiny_dict, "agents": 50})
    assert bigger.plans()[: one.agents] == one.plans()
    other_seed = Workload.from_dict({**tiny_dict, "seed": 4})
    assert other_seed.plans() != one.plans()


def test_draws_respect_their_distributions(tiny_dict: dict[str, Any]) -> None:
    tiny_dict.update(
        agents=200,
        steps={"const": 3},
        observation_tokens={"lognormal": {"median": 40, "sigma": 1.0, "max": 90}},
    )
    work = Workload.from_dict(tiny_dict)
    plans = work.plans()
    for plan in plans:
        assert plan.steps == 3
        assert len(plan.observation_tokens) == len(plan.tool_latency_s) == 2
        assert 8 <= plan.task_prompt_tokens <= 20
        assert all(5 <= n <= 15 for n in plan.output_tokens)
        assert all(1 <= n <= 90 for n in plan.observation_tokens)
        assert all(0.5 <= s <= 1.5 for s in plan.tool_latency_s)
    observations = sorted(n for p in plans for n in p.observation_tokens)
    # The lognormal is centred on its median and its cap is reached by the upper tail.
    assert 30 <= observations[len(observations) // 2] <= 50
    assert observations[-1] == 90


def test_round_trip(tiny_workload: Workload) -> None:
    assert Workload.from_dict(tiny_workload.to_dict()) == tiny_workload


@pytest.mark.parametrize("name", sorted(SIZED_FOR))
def test_shipped_presets_load_and_fit_their_engine(name: str) -> None:
    assert name in workload_presets()
    work = load_workload(name)
    assert work.name == name
    config = get_preset(SIZED_FOR[name])
    # The tools' schema and chat-template tokens come on top; keep a margin for them.
    assert work.max_context_tokens() + 64 <= config.max_model_len


def test_paper_256_matches_the_papers_setting() -> None:
    work = load_workload("paper-256")
    assert work.agents == 256
    # Contexts grow to tens of thousands of tokens.
    finals = [
        work.system_prompt_tokens
        + p.task_prompt_tokens
        + sum(p.output_tokens)
        + sum(p.observation_tokens)
        for p in work.plans()
    ]
    assert max(finals) > 20_000
    assert sorted(finals)[len(finals) // 2] > 10_000


def test_check_fits_refuses_a_workload_longer_than_max_model_len_naming_both() -> None:
    work = load_workload("light-8")
    # 500 + 300 + 8 x 150 + 7 x 1000 + (2 x 8 + 2) x 8: every distribution at its maximum.
    assert work.max_context_tokens() == 9_144
    work.check_fits(9_144, server="sim preset x")  # fits exactly: no error
    with pytest.raises(ConfigError) as refused:
        work.check_fits(2048, server="sim preset cpu-tiny")
    assert str(refused.value).startswith(
        "workload light-8: an agent's context can reach 9,144 tokens (system 500 + task 300 "
        "+ 8 steps x output 150 + 7 tool calls x observation 1,000 + 18 messages x 8 template "
        "tokens, the maxima of the workload's distributions) but the server's max_model_len "
        "is 2048 (sim preset cpu-tiny)"
    )
    with pytest.raises(ConfigError, match="max_model_len is 9143 "):
        work.check_fits(9_143, server="sim preset x")
