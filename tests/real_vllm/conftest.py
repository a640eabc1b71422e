"""The real-vLLM tier: one real vLLM CPU server for the whole session.

Every test under this folder gets the ``real_vllm`` marker. When the run selects any of them,
the vLLM venv and the tiny model are prepared, and, when a selected test uses the
``real_vllm`` fixture, the server is started, right after collection - outside
pytest-timeout's per-test limit, because a fresh install takes minutes and start-up on a
loaded 2-core machine can take more than that limit. The server is stopped at the
end of the session (``pytest_sessionfinish`` also runs after a failure or Ctrl-C; an
``atexit`` hook in the helper covers the rest).

When vLLM cannot be installed or started, every test that uses it fails with one line saying
why (``pytest.fail``), never a skip: CI must notice. The log tail is printed to stderr.

Tests that need a real server live in this folder and ask for the ``real_vllm`` fixture; it
returns a :class:`concur_langgraph.testing.vllm_cpu.RunningServer` with ``.base_url``
(``http://127.0.0.1:PORT``), ``.openai_base_url`` (``.../v1``), ``.model`` (``"tiny"``) and
``.log_path``. ``vllm_installation`` gives the venv's python and the model folder.

``real_vllm_medium`` is a second server, of the ``medium`` model (the pressure regime of
docs/real-vllm.md: 94M parameters, an 8,192-token cache), started the same way (after
collection, only when a selected test asks for it, stopped at the end of the session).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from concur_langgraph.testing.vllm_cpu import (
    RealVLLMError,
    RunningServer,
    VLLMServerConfig,
    ensure_model,
    ensure_venv,
    start_server,
)

_HERE = Path(__file__).resolve().parent
# Start-up takes 20-40 s on an idle 2-core machine; several servers started at once (parallel
# test runs share the cores, and vLLM pins each engine to core 0) have needed over 100 s.
STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Installation:
    """What the session-start preparation produced."""

    python: Path | None
    """The vLLM venv's python, or None when preparation failed."""
    model_dir: Path | None
    """The tiny model's folder, or None when preparation failed."""
    error: RealVLLMError | None
    """Why preparation failed."""
    seconds: float
    """How long preparation took (venv check or install, model build)."""


@dataclass(slots=True)
class _Tier:
    installation: Installation | None = None
    server: RunningServer | None = None
    server_error: RealVLLMError | None = None
    startup_s: float | None = None
    medium: RunningServer | None = None
    medium_error: RealVLLMError | None = None
    medium_startup_s: float | None = None


_tier = _Tier()


def _in_tier(item: pytest.Item) -> bool:
    return _HERE in item.path.resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _in_tier(item):
            item.add_marker(pytest.mark.real_vllm)


def _prepare() -> Installation:
    t0 = time.monotonic()
    home = VLLMServerConfig().resolved_home()
    try:
        python = ensure_venv(home)
        model_dir = ensure_model(python, home)
    except RealVLLMError as exc:
        return Installation(python=None, model_dir=None, error=exc, seconds=time.monotonic() - t0)
    return Installation(
        python=python, model_dir=model_dir, error=None, seconds=time.monotonic() - t0
    )


def _start() -> None:
    t0 = time.monotonic()
    try:
        _tier.server = start_server(VLLMServerConfig(startup_timeout_s=STARTUP_TIMEOUT_S))
    except RealVLLMError as exc:
        _tier.server_error = exc
    _tier.startup_s = time.monotonic() - t0


def _start_medium() -> None:
    # Builds the medium model on first use (~10 s), then starts like the tiny one (~25 s).
    t0 = time.monotonic()
    try:
        config = VLLMServerConfig(model="medium", startup_timeout_s=STARTUP_TIMEOUT_S)
        _tier.medium = start_server(config)
    except RealVLLMError as exc:
        _tier.medium_error = exc
    _tier.medium_startup_s = time.monotonic() - t0


def pytest_collection_finish(session: pytest.Session) -> None:
    # Runs after -m/-k deselection, so a run that selects none of the tier does nothing.
    if session.config.option.collectonly:
        return
    if any(_in_tier(item) for item in session.items):
        _tier.installation = _prepare()
        # Only when some selected test needs the server: `-k config` runs in seconds.
        wanted = any("real_vllm" in getattr(item, "fixturenames", ()) for item in session.items)
        if wanted and _tier.installation.error is None:
            _start()
        medium = any(
            "real_vllm_medium" in getattr(item, "fixturenames", ()) for item in session.items
        )
        if medium and _tier.installation.error is None:
            _start_medium()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _tier.server is not None:
        _tier.server.stop()
        _tier.server = None
    if _tier.medium is not None:
        _tier.medium.stop()
        _tier.medium = None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _tier.installation is None:
        return
    line = f"real vLLM tier: install/model check {_tier.installation.seconds:.1f} s"
    if _tier.startup_s is not None:
        line += f", server start-up {_tier.startup_s:.1f} s"
    if _tier.medium_startup_s is not None:
        line += f", medium server start-up {_tier.medium_startup_s:.1f} s"
    terminalreporter.write_line(line)


def _fail(exc: RealVLLMError) -> None:
    if exc.detail:
        print(f"--- real vLLM log tail ---\n{exc.detail}", file=sys.stderr)
    pytest.fail(f"real vLLM unavailable: {exc.reason}", pytrace=False)


@pytest.fixture(scope="session")
def vllm_installation() -> Installation:
    """The prepared venv and model; fails the test with the reason if preparation failed."""
    if _tier.installation is None:  # collection hooks did not run for this test: prepare now
        _tier.installation = _prepare()
    if _tier.installation.error is not None:
        _fail(_tier.installation.error)
    return _tier.installation


@pytest.fixture(scope="session")
def real_vllm(vllm_installation: Installation) -> RunningServer:
    """One real vLLM server for the session (16 MiB = 4096-token KV cache, prefix caching)."""
    if _tier.server is None and _tier.server_error is None:
        _start()  # the collection hook did not start it: start now
    if _tier.server_error is not None:
        _fail(_tier.server_error)
    assert _tier.server is not None
    return _tier.server


@pytest.fixture(scope="session")
def real_vllm_medium(vllm_installation: Installation) -> RunningServer:
    """The medium model's server for the session (64 MiB = 8,192-token KV cache, prefix
    caching, max_model_len 4096)."""
    if _tier.medium is None and _tier.medium_error is None:
        _start_medium()  # the collection hook did not start it: start now
    if _tier.medium_error is not None:
        _fail(_tier.medium_error)
    assert _tier.medium is not None
    return _tier.medium
