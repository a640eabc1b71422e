"""A warm start end to end: one batch's AdmitLaw profile starts the next (virtual time)."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest

from concur_langgraph import AdmitLaw
from concur_langgraph.bench import _policies
from concur_langgraph.bench._runner import SimBackend, run_one
from concur_langgraph.bench._workload import Workload

TINY = SimBackend.preset("test-tiny")


def _register(monkeypatch: pytest.MonkeyPatch, name: str, law: AdmitLaw) -> None:
    monkeypatch.setattr(_policies, "LAWS", MappingProxyType({**_policies.LAWS, name: lambda: law}))


def test_a_profile_measured_by_one_batch_starts_the_next(
    monkeypatch: pytest.MonkeyPatch, tiny_workload: Workload
) -> None:
    first = AdmitLaw()
    _register(monkeypatch, "first", first)
    cold = run_one(tiny_workload, "first", TINY)
    measured = first.profile()
    assert measured is not None
    plans = tiny_workload.plans()
    smallest = tiny_workload.system_prompt_tokens + min(p.task_prompt_tokens for p in plans)
    assert measured.agents == tiny_workload.agents
    assert measured.kv_capacity_tokens == 1024  # test-tiny's cache, from cache_config_info
    assert measured.context_per_call > smallest and measured.prefill_rate > 0

    # The tiny batch fits its cache, so its own profile starts the next batch open; a profile
    # whose agents would outgrow it (contexts of half the cache, slow prefill) caps it at 2.
    assert AdmitLaw(warm=measured).start_window is None
    big = dataclasses.replace(measured, context_per_call=0.9 * 1024 / 2, prefill_rate=1.0)
    warm = AdmitLaw(warm=big)
    _register(monkeypatch, "warm", warm)
    capped = run_one(tiny_workload, "warm", TINY)
    assert warm.start_window == 2
    assert capped["window_peak"] == 2 and capped["agents_ok"] == tiny_workload.agents
    assert capped["llm_calls"] == cold["llm_calls"]
    assert capped["generated_tokens"] == cold["generated_tokens"]
    assert max(capped["series"]["active"]) <= 2
