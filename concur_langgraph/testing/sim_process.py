"""The simulator served over HTTP in a child process, as a user (or a test) would run it.

``with served_simulator("--preset", "test-tiny") as sim:`` runs ``concur sim serve ARGS`` on a
free loopback port, waits for ``/health`` (bounded; the error carries the server's output), and
stops the process at the end, however the block ends. ``sim.url`` is the base URL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from concur_langgraph.errors import ConcurError

__all__ = ["ServedSimulator", "served_simulator"]


@dataclass(frozen=True, slots=True)
class ServedSimulator:
    """A running ``concur sim serve`` process."""

    url: str
    """Base URL, ``http://127.0.0.1:PORT``."""
    proc: subprocess.Popen[str]
    """The server process (its stdout and stderr are one pipe)."""


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served_simulator(
    *args: str, startup_timeout_s: float = 60.0, log_level: str = "warning"
) -> Iterator[ServedSimulator]:
    """Serve the simulator with ``concur sim serve ARGS`` (e.g. ``"--preset", "test-tiny"``).

    Raises :class:`ConcurError` with the server's output when it exits or does not answer
    ``/health`` within ``startup_timeout_s`` (start-up is mostly imports: seconds on a busy
    machine).
    """
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "concur_langgraph.cli", "sim", "serve", *args),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", log_level),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                out = proc.stdout.read() if proc.stdout else ""
                raise ConcurError(
                    f"concur sim serve {' '.join(args)} did not answer {url}/health within "
                    f"{startup_timeout_s} s (exit status {proc.returncode}); its output:\n"
                    f"{out[-2000:]}"
                )
            time.sleep(0.05)  # polling a child process's start-up
        yield ServedSimulator(url=url, proc=proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
