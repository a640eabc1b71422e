"""Shared helpers of the Redis tier: condition waits with deadlines, worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from concur_langgraph import AdmissionWindow, Permit

WORKER = Path(__file__).parent / "distributed" / "_worker.py"
REPO = Path(__file__).resolve().parents[1]


async def eventually(
    predicate: Callable[[], bool], *, timeout_s: float = 5.0, what: str = "condition"
) -> None:
    """Wait until ``predicate()`` holds, checking every millisecond; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.001)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def waiting(w: AdmissionWindow) -> int:
    stats = w.statistics()
    return stats.waiting_new + stats.waiting_parked


async def enqueue(w: AdmissionWindow, name: str, *, parked: bool = False) -> asyncio.Task[Permit]:
    """Start an acquire and return once the window has it queued (or granted).

    FIFO is defined by arrival at the window; for Redis that is the script's execution, so a
    test must not start the next acquire before this one has arrived.
    """
    before = waiting(w)
    task = asyncio.create_task(w.acquire(name, parked=parked))
    await eventually(lambda: task.done() or waiting(w) > before, what=f"{name} queued")
    return task


class Worker:
    """A worker process (``_worker.py``) whose JSON-lines events are collected as they come."""

    def __init__(self, name: str, args: list[str], *, script: Path = WORKER) -> None:
        self.name = name
        self.args = args
        self.script = script
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.stderr = b""

    async def start(self) -> Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(self.script),
            "--name",
            self.name,
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue

    def count(self, ev: str) -> int:
        return sum(1 for e in self.events if e.get("ev") == ev)

    def last(self, ev: str) -> dict[str, Any] | None:
        found = [e for e in self.events if e.get("ev") == ev]
        return found[-1] if found else None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        try:
            async with asyncio.timeout(timeout_s):
                code = await self.proc.wait()
                if self._reader is not None:
                    await self._reader
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            assert self.proc.stderr is not None
            tail = (await self.proc.stderr.read()).decode(errors="replace")[-3000:]
            done = self.count("done")
            raise AssertionError(
                f"worker {self.name} did not finish within {timeout_s} s "
                f"({done} agents done; last events {self.events[-3:]}); stderr tail:\n{tail}"
            ) from None
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
