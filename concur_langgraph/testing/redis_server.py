"""A throwaway ``redis-server`` for tests, benchmarks and examples.

:class:`RedisServer` starts the real Debian ``redis-server`` binary on a free loopback port with
its own temporary directory, waits (bounded) until it answers ``PING``, and stops it by PID.
Persistence is off unless asked for (``persistence="aof"`` or ``"rdb"``), so the restart tests
can choose between "Redis lost everything" and "Redis came back with its data"::

    with RedisServer() as server:
        window = RedisWindow(server.url, batch_id="b1")
        ...
        server.restart()          # same port, same directory

Nothing here imports the ``redis`` Python package: readiness is checked with a raw RESP
``PING`` over a socket, so the helper works before the optional extra is installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

from concur_langgraph.errors import ConfigError

__all__ = ["RedisServer", "RedisServerError", "find_redis_server"]

Persistence = Literal["none", "aof", "rdb"]

_INSTALL_HINT = "redis-server not found on PATH: install it with `apt-get install redis-server`"


class RedisServerError(RuntimeError):
    """The test Redis could not be started or stopped (missing binary, did not answer)."""


def find_redis_server() -> str:
    """The path of the ``redis-server`` binary, or :class:`RedisServerError` with the fix."""
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerError(_INSTALL_HINT)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` subprocess on ``127.0.0.1``.

    Args:
        port: the port to listen on; ``None`` picks a free one (kept across :meth:`restart`).
        persistence: ``"none"`` (default: a restart loses every key), ``"aof"`` (append-only
            file, fsync every write, so a restart keeps everything acknowledged) or ``"rdb"``
            (a snapshot written at shutdown by :meth:`stop` with ``save=True``).
        start_timeout_s: how long :meth:`start` waits for ``PING`` before giving up.
        directory: working directory for the server's files; ``None`` makes a temporary one
            that :meth:`close` removes.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        persistence: Persistence = "none",
        start_timeout_s: float = 10.0,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        if persistence not in ("none", "aof", "rdb"):
            raise ConfigError(f"persistence must be 'none', 'aof' or 'rdb', got {persistence!r}")
        if not start_timeout_s > 0:
            raise ConfigError(f"start_timeout_s must be > 0, got {start_timeout_s!r}")
        self.port = port if port is not None else _free_port()
        self.persistence: Persistence = persistence
        self.start_timeout_s = start_timeout_s
        self._owns_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="concur-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's PID while it runs."""
        return self._proc.pid if self._proc is not None else None

    def _args(self, binary: str) -> list[str]:
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.persistence == "aof":
            args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        elif self.persistence == "rdb":
            args += ["--appendonly", "no", "--save", "3600 1", "--dbfilename", "dump.rdb"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        return args

    def start(self) -> None:
        """Start the server and wait until it answers ``PING`` (at most ``start_timeout_s``)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        binary = find_redis_server()
        self._proc = subprocess.Popen(
            self._args(binary),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while not _ping(self.port, 0.2):
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise RedisServerError(
                    f"redis-server exited with status {code} on port {self.port}: "
                    f"{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(
                    f"redis-server did not answer PING on port {self.port} within "
                    f"{self.start_timeout_s} s: {self._log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, *, kill: bool = False, timeout_s: float = 5.0) -> None:
        """Stop the server by PID: SIGTERM (a clean shutdown, which writes the RDB snapshot
        when ``persistence="rdb"``), or SIGKILL with ``kill=True`` (a crash)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def restart(self, *, kill: bool = False) -> None:
        """Stop and start again on the same port and directory."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = (self.directory / "redis.log").read_text(errors="replace").splitlines()
            return " | ".join(lines[-5:]) or "(empty log)"
        return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
