"""``concur watch``: against a served simulator, a dead URL, a batch exporter; down and back.

The command runs as users run it (a subprocess); the :class:`Watcher` behind it is also driven
in-process, on ``httpx.MockTransport`` pages or on the served simulator, to check its numbers.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from concur_langgraph import ConcurSession, FixedLaw, cli
from concur_langgraph.cli.watch import (
    BatchView,
    Snapshot,
    VLLMView,
    Watcher,
    _render_rich,
    parse_batch_metrics,
    render_text,
)
from concur_langgraph.sim._presets import TEST_TINY
from concur_langgraph.testing.sim_process import free_port, served_simulator

VLLM_PAGE = (Path(__file__).parent.parent / "data" / "vllm_cpu_0.32.0_metrics.txt").read_text()
CONCUR = [sys.executable, "-m", "concur_langgraph.cli"]


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with served_simulator("--preset", "test-tiny") as sim:
        yield sim.url


def watch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``concur watch ARGS`` in this process (the command's own asyncio.run): status, out, err.

    In-process saves an interpreter start per call; the subprocess tests below cover signals
    and terminals."""
    status = cli.main(["watch", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_once_against_a_served_simulator(sim_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = watch(capsys, sim_url, "--once", "--interval", "0.2")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == f"vLLM  {sim_url}/metrics"
    capacity = TEST_TINY.num_blocks * TEST_TINY.block_size
    assert lines[1].startswith(f"  KV 0.0% of {capacity} tokens | hit rate ")
    assert lines[1].endswith("| running 0 | waiting 0")
    # Rates over one interval: at least --interval long (a loaded machine makes it longer).
    over = re.search(r"preemptions 0 over (\d+\.\d) s", lines[1])
    assert over is not None and float(over.group(1)) >= 0.2

    data = json.loads(watch(capsys, sim_url, "--once", "--json", "--interval", "0.1")[1])
    assert data["vllm"]["up"] is True and data["batch"] is None
    assert data["vllm"]["kv_capacity_tokens"] == capacity
    assert data["vllm"]["interval_s"] >= 0.1


async def test_watcher_sees_the_simulators_prefix_hits(sim_url: str) -> None:
    watcher = Watcher(sim_url)
    try:
        first = await watcher.poll()
        assert first.vllm.up and first.vllm.kv_usage is None  # baseline only
        prompt = "the same long prefix " * 40
        async with httpx.AsyncClient(base_url=sim_url, timeout=30) as client:
            for _ in range(2):  # the second request finds the first one's blocks
                response = await client.post(
                    "/v1/chat/completions",
                    json={"model": TEST_TINY.model_name, "max_tokens": 4, "ignore_eos": True,
                          "messages": [{"role": "user", "content": prompt}]},
                )  # fmt: skip
                response.raise_for_status()
        cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        second = await watcher.poll()
    finally:
        await watcher.aclose()
    view = second.vllm
    assert cached > 0
    assert view.up and view.prefix_hit_rate is not None and 0 < view.prefix_hit_rate < 1
    assert (view.preemptions, view.running, view.waiting) == (0, 0, 0)
    assert view.interval_s is not None and view.interval_s > 0


def test_once_against_a_dead_url(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    status, out, err = watch(capsys, dead, "--once")
    assert status == 1
    assert f"vLLM  {dead}/metrics" in out and "DOWN since " in out
    assert err.startswith("concur watch: error: the vLLM server is down: cannot reach")
    assert f"{dead}/metrics" in err

    status, out, _ = watch(capsys, dead, "--once", "--json")
    data = json.loads(out)
    assert status == 1
    assert data["vllm"]["up"] is False and data["vllm"]["down_since"] is not None
    assert "cannot reach" in data["vllm"]["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ftp://x"], "concur watch: error: vllm_url: 'ftp://x' is not an http(s) URL"),
        (["http://127.0.0.1:1", "--batch", "localhost:9100"], "concur watch: error: --batch:"),
        (["http://127.0.0.1:1", "--interval", "0"], "concur watch: error: --interval must be"),
        (["http://127.0.0.1:1", "--timeout", "-1"], "concur watch: error: --timeout: must be"),
    ],
)
def test_bad_arguments_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = watch(capsys, *args, "--once")
    assert status == 2
    assert err.startswith(message), err


async def test_once_with_a_batch_exporter(sim_url: str) -> None:
    async with ConcurSession(law=FixedLaw(2), metrics_port=0) as session:
        assert session.metrics_url is not None
        await session.gate.before_llm_call("a")
        await session.gate.before_llm_call("b")
        queued = asyncio.create_task(session.gate.before_llm_call("c"))
        await asyncio.sleep(0)
        batch = session.metrics_url.removesuffix("/metrics")  # the base URL is enough
        # The exporter is served by this event loop: run the command without blocking it.
        proc = await asyncio.create_subprocess_exec(
            *CONCUR, "watch", sim_url, "--batch", batch, "--once", "--json", "--interval", "0.1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await proc.communicate()
        queued.cancel()
    assert proc.returncode == 0, stderr.decode()
    got = json.loads(stdout)["batch"]
    assert got["url"] == session_url_of(batch) and got["up"] is True
    assert (got["window"], got["window_open"]) == (2, False)
    assert (got["active"], got["parked"], got["waiting"], got["completed"]) == (2, 0, 1, 0)
    assert got["llm_calls"] == 3 and got["parks"] == 0
    assert got["metrics_stale"] is None  # no controller in this session


def session_url_of(base: str) -> str:
    return base + "/metrics"


def test_live_keeps_trying_and_ctrl_c_exits_0() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [*CONCUR, "watch", dead, "--json", "--interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        records = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert all(not r["vllm"]["up"] for r in records)
    # One outage, polled again and again: its start does not move.
    assert len({r["vllm"]["down_since"] for r in records}) == 1
    assert records[0]["time"] < records[1]["time"] < records[2]["time"]


def test_live_view_on_a_terminal_and_ctrl_c(sim_url: str) -> None:
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [*CONCUR, "watch", sim_url, "--interval", "0.05"],
        stdin=child, stdout=child, stderr=child, env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    os.close(child)
    seen = b""
    try:
        while b"hit rate" not in seen:  # the second frame has the rates
            ready, _, _ = select.select([main], [], [], 30)
            assert ready, f"no frame drawn: {seen!r}"
            seen += os.read(main, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    assert b"concur watch" in seen and f"vLLM {sim_url}/metrics".encode() in seen
    assert b"Traceback" not in seen


class Pages:
    """A /metrics that answers the queued pages in turn; ``None`` is a refused connection."""

    def __init__(self, *pages: str | None) -> None:
        self.pages = list(pages)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        page = self.pages.pop(0)
        if page is None:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, text=page)


def bumped(hits: int, queries: int, preemptions: int) -> str:
    """The captured vLLM page with its counters moved on by the given amounts."""
    page = VLLM_PAGE
    for name, base, extra in (
        ("prefix_cache_hits_total", 22912, hits),
        ("prefix_cache_queries_total", 61983, queries),
        ("num_preemptions_total", 10, preemptions),
    ):
        old = f'vllm:{name}{{engine="0",model_name="tiny"}} {base}.0'
        assert old in page
        page = page.replace(old, f'vllm:{name}{{engine="0",model_name="tiny"}} {base + extra}.0')
    return page


async def test_down_then_up_then_down_again() -> None:
    clock = iter([100.0, 101.0, 102.0, 103.0, 104.0, 105.0])
    pages = Pages(None, None, VLLM_PAGE, bumped(300, 400, 3), None)
    async with httpx.AsyncClient(transport=httpx.MockTransport(pages)) as client:
        watcher = Watcher("http://vllm:8000", client=client, wall=lambda: next(clock))
        snaps = [await watcher.poll() for _ in range(5)]
    down1, down2, measuring, up, down3 = (s.vllm for s in snaps)
    assert not down1.up and down1.down_since == 100.0 and "cannot reach" in (down1.error or "")
    assert not down2.up and down2.down_since == 100.0  # the same outage
    assert measuring.up and measuring.kv_usage is None
    assert up.up and up.down_since is None
    assert up.prefix_hit_rate == pytest.approx(300 / 400)
    assert (up.preemptions, up.running, up.waiting, up.waiting_capacity) == (3, 4, 9, 9)
    assert (up.kv_usage, up.kv_capacity_tokens) == (1.0, 4096)
    assert not down3.up and down3.down_since == 104.0  # a new outage
    assert "DOWN since " in render_text(snaps[4]) and "(0 s)" in render_text(snaps[4])
    assert render_text(snaps[3]).splitlines()[1] == (
        "  KV 100.0% of 4096 tokens | hit rate 75.0% over "
        f"{up.interval_s:.1f} s | preemptions 3 over {up.interval_s:.1f} s | running 4 | "
        "waiting 9 (9 for KV space)"
    )


async def test_a_batch_url_that_is_not_an_exporter() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "vllm":
            return httpx.Response(200, text=VLLM_PAGE)
        if request.url.port == 1:
            return httpx.Response(200, text="<html>oops</html>")
        return httpx.Response(200, text=VLLM_PAGE)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        html = await Watcher("http://vllm:8000", "http://batch:1", client=client).poll()
        vllm = await Watcher("http://vllm:8000", "http://batch:2/", client=client).poll()
    assert html.vllm.up and html.batch is not None and not html.batch.up
    assert "http://batch:1/metrics did not answer with Prometheus text" in (html.batch.error or "")
    assert vllm.batch is not None and not vllm.batch.up
    assert "has no concur_window series" in (vllm.batch.error or "")
    assert not html.ok and not vllm.ok


def test_parse_batch_metrics_and_the_rich_view() -> None:
    text = (
        "concur_window 1048576\nconcur_window_open 1\n"
        'concur_agents{state="active"} 5\nconcur_agents{state="parked"} 0\n'
        'concur_agents{state="waiting"} 0\n'
        "# TYPE concur_agents_completed counter\nconcur_agents_completed_total 7\n"
        "concur_metrics_stale 1\nconcur_metrics_staleness_seconds 12.5\n"
    )
    view = parse_batch_metrics("http://b/metrics", text)
    assert (view.window_open, view.active, view.completed, view.metrics_stale) == (
        True, 5, 7, True,
    )  # fmt: skip
    snap = Snapshot(
        time=1000.0,
        vllm=VLLMView(url="http://v/metrics", up=False, down_since=990.0, error="refused"),
        batch=view,
    )
    line = render_text(snap).splitlines()[3]
    assert line.startswith("  window open | agents 5 active, 0 parked, 0 waiting, 7 completed")
    assert line.endswith("window held: vLLM data stale for 12 s")
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(_render_rich(snap))
    drawn = buffer.getvalue()
    assert "DOWN since" in drawn and "(10 s): refused" in drawn and "window open" in drawn
    assert isinstance(snap.batch, BatchView)
