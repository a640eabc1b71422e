"""Why the window is what it is: reasons logged and kept, a readable snapshot, the batch's
summary and a plot of it, for the Python API (``concur run`` is in tests/cli).

A batch of ReAct-style agents whose contexts outgrow the ``cpu-tiny`` simulator's cache, the
whole client stack in virtual time.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from concur_langgraph import ConcurGate, ConcurLaw, ConfigError, FixedLaw, vtime
from concur_langgraph.sim._presets import get_preset
from concur_langgraph.sim._server import SimServer

AGENTS = 12
PNG = b"\x89PNG\r\n\x1a\n"


def _graph(server: SimServer) -> Any:
    model = server.chat_model(max_tokens=32, extra_body={"ignore_eos": True})

    async def llm(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    async def tool(state: MessagesState) -> dict[str, Any]:
        await asyncio.sleep(2.0)
        return {"messages": [HumanMessage("observation " + "word " * 150)]}

    def route(state: MessagesState) -> str:
        return "tool" if len(state["messages"]) < 10 else END

    builder = StateGraph(MessagesState)
    builder.add_node("llm", llm)
    builder.add_node("tool", tool)
    builder.add_edge(START, "llm")
    builder.add_conditional_edges("llm", route, ["tool", END])
    builder.add_edge("tool", "llm")
    return builder.compile()


def _tasks() -> list[dict[str, Any]]:
    return [{"messages": [HumanMessage(f"task {i} " + "x " * 300)]} for i in range(AGENTS)]


def _run(law: Any) -> ConcurGate:
    async def main() -> ConcurGate:
        server = SimServer(get_preset("cpu-tiny"))
        gate = ConcurGate(
            _graph(server), vllm_url=server.base_url, http_client=server.http_client(), law=law
        )
        await gate.abatch(_tasks())
        return gate

    return vtime.run(main())


def test_every_window_change_is_logged_at_info_with_the_laws_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="concur_langgraph"):
        gate = _run(ConcurLaw())
    changes = [r for r in caplog.records if getattr(r, "event", None) == "window_change"]
    assert len(changes) > 3  # growth and at least one halving
    for record in changes:
        old, new = record.window_old, record.window_new  # type: ignore[attr-defined]
        reason: str = record.reason  # type: ignore[attr-defined]
        assert record.getMessage() == f"concur window {old} -> {new}: {reason}"
        if new < old:
            assert "(thrashing): multiply by beta 0.5" in reason
        else:
            assert "< u_low 0.2: grow by alpha 2" in reason
    stats = gate.statistics()
    assert stats is not None and stats.controller is not None
    decision = stats.controller.last_decision
    assert decision is not None and decision.reason.startswith("paper's law: KV usage ")


def test_the_default_law_says_why_it_keeps_the_window_open() -> None:
    """The user's case: the default law stayed open on a full cache and said nothing."""
    gate = _run(None)
    stats = gate.statistics()
    assert stats is not None and stats.controller is not None
    decision = stats.controller.last_decision
    assert decision is not None
    assert decision.reason.startswith("FitLaw: ")
    text = str(stats)
    assert text.splitlines()[0].startswith("window      open (")
    assert "1048576" not in text
    assert f"{AGENTS} done" in text
    assert "decision    window kept at open: FitLaw: " in text


def test_the_batch_ends_with_a_summary_logged_and_kept(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="concur_langgraph"):
        gate = _run(ConcurLaw())
    summary = gate.summary()
    assert summary is not None
    first, window, last = summary.splitlines()
    stats = gate.statistics()
    assert stats is not None
    assert first.startswith(f"concur batch: {AGENTS} agents ({AGENTS} ok, 0 failed) in ")
    assert first.endswith(f"; {stats.gate.llm_calls:,} LLM calls, {stats.gate.parks_total} parks")
    assert window.startswith("window: started 4, ranged ")
    assert last.startswith("last decision: window ")
    logged = [r for r in caplog.records if getattr(r, "event", None) == "batch_summary"]
    assert [r.getMessage() for r in logged] == [summary]


def test_the_batch_is_plotted_without_touching_matplotlibs_global_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the plot switched matplotlib's backend for the whole process")

    monkeypatch.setattr(matplotlib, "use", refuse)
    gate = _run(ConcurLaw())
    path = gate.plot(tmp_path / "plots" / "batch.png", title="twelve agents")
    assert path == tmp_path / "plots" / "batch.png"
    assert path.read_bytes()[:8] == PNG
    session = gate.session or gate._last_session
    assert session is not None
    timeline = session.timeline()
    assert timeline["t"][0] == 0.0 and len(timeline["t"]) > 10
    assert max(w for w in timeline["window"] if w is not None) > 4


def test_a_batch_without_signals_has_nothing_to_plot(tmp_path: Path) -> None:
    gate = ConcurGate(_graph(SimServer(get_preset("cpu-tiny"))), law=FixedLaw(3))
    with pytest.raises(ConfigError, match="plot: no batch has run"):
        gate.plot(tmp_path / "x.png")
    vtime.run(gate.abatch([]))
    with pytest.raises(ConfigError, match="plot: this batch has no timeline"):
        gate.plot(tmp_path / "x.png")
