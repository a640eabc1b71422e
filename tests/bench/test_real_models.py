"""The real-vLLM helper's two models, without a server: the builder's constants, the model
cache and when it is rebuilt, the server configuration and its command line."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from concur_langgraph.errors import ConfigError
from concur_langgraph.testing import make_tiny_model, vllm_cpu
from concur_langgraph.testing.make_tiny_model import SHAPES
from concur_langgraph.testing.vllm_cpu import MODELS, VLLMServerConfig, ensure_model


def test_tiny_shape_is_the_real_tiers_model() -> None:
    tiny = SHAPES["tiny"]
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.num_layers) == (256, 512, 4)
    assert (tiny.num_heads, tiny.num_kv_heads, tiny.head_dim, tiny.vocab_size) == (4, 4, 64, 2048)
    # The parameter count docs/real-vllm.md gives (and the builder logs).
    assert tiny.params == 3_672_320
    assert tiny.kv_bytes_per_token == 4096 == make_tiny_model.KV_BYTES_PER_TOKEN


def test_medium_shape_is_the_pressure_regimes_model() -> None:
    medium = SHAPES["medium"]
    assert (medium.hidden_size, medium.intermediate_size, medium.num_layers) == (1024, 2816, 8)
    assert (medium.num_heads, medium.num_kv_heads, medium.head_dim) == (16, 4, 64)
    assert medium.num_heads * medium.head_dim == medium.hidden_size
    assert medium.params == 94_389_248  # ~94M, as measured by the builder
    # 2 (K, V) x 8 layers x 4 KV heads x 64 x 2 bytes: a 64 MiB cache holds 8192 tokens.
    assert medium.kv_bytes_per_token == 8192
    assert medium.max_positions >= MODELS["medium"].default_max_model_len


def test_models_take_their_kv_bytes_from_the_builder() -> None:
    for name, model in MODELS.items():
        assert model.kv_bytes_per_token == SHAPES[name].kv_bytes_per_token
        assert model.dir_name == f"{name}-model"
    assert VLLMServerConfig().kv_cache_tokens == 4096
    assert VLLMServerConfig(model="medium").kv_cache_tokens == 8192


def test_builder_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert make_tiny_model.main([]) == 2
    assert make_tiny_model.main(["out", "--shape", "huge"]) == 2
    assert "usage: make_tiny_model.py OUT_DIR [--shape tiny|medium]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shape"):
        make_tiny_model.build(Path("unused"), "huge")


# -- configuration ---------------------------------------------------------------------------


def test_defaults_are_the_tiny_tiers() -> None:
    config = VLLMServerConfig()
    assert config.model == "tiny"
    assert config.resolved_kv_cache_memory_bytes() == 16 * 1024 * 1024
    assert config.resolved_max_model_len() == 2048
    assert config.scheduling_policy == "fcfs"


def test_medium_defaults_and_explicit_sizes() -> None:
    config = VLLMServerConfig(model="medium")
    assert config.resolved_kv_cache_memory_bytes() == 64 * 1024 * 1024
    assert config.resolved_max_model_len() == 4096
    sized = VLLMServerConfig(model="medium", kv_cache_memory_bytes=32 << 20, max_model_len=2048)
    assert (sized.resolved_kv_cache_memory_bytes(), sized.resolved_max_model_len()) == (
        32 << 20,
        2048,
    )
    assert sized.kv_cache_tokens == 4096


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "huge"),
        ("kv_cache_memory_bytes", 0),
        ("kv_cache_memory_bytes", True),
        ("kv_cache_memory_bytes", 1.5),
        ("max_model_len", -1),
        ("scheduling_policy", "lifo"),
        ("startup_timeout_s", 0.0),
        ("stop_grace_s", -1.0),
    ],
)
def test_config_errors_name_the_field(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=field):
        VLLMServerConfig(**kwargs)


def _command(config: VLLMServerConfig) -> list[str]:
    return vllm_cpu._server_command(Path("/venv/python"), Path("/model"), 8000, config)


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_tiny_command_line_is_unchanged() -> None:
    command = _command(VLLMServerConfig())
    assert _flag(command, "--served-model-name") == "tiny"
    assert _flag(command, "--kv-cache-memory-bytes") == str(16 * 1024 * 1024)
    assert _flag(command, "--max-model-len") == "2048"
    assert "--scheduling-policy" not in command
    assert "--enable-prefix-caching" in command


def test_medium_command_line_and_priority_scheduling() -> None:
    command = _command(VLLMServerConfig(model="medium", scheduling_policy="priority"))
    assert _flag(command, "--served-model-name") == "medium"
    assert _flag(command, "--kv-cache-memory-bytes") == str(64 * 1024 * 1024)
    assert _flag(command, "--max-model-len") == "4096"
    assert _flag(command, "--scheduling-policy") == "priority"


def test_each_model_has_its_own_server_record(tmp_path: Path) -> None:
    tiny = vllm_cpu._state_path(VLLMServerConfig(home=tmp_path))
    medium = vllm_cpu._state_path(VLLMServerConfig(home=tmp_path, model="medium"))
    assert tiny.name == "server.json"  # what `stop` has always read
    assert medium.name == "server-medium.json"


def test_cli_refuses_a_bad_size_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        vllm_cpu.main(["ensure", "--model", "medium", "--max-model-len", "0"])
    assert exit_.value.code == 2
    assert "max_model_len must be an integer > 0" in capsys.readouterr().err


# -- model cache ------------------------------------------------------------------------------


@pytest.fixture
def fake_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """A copy of the builder script (so a test can change it) and a fake python that records
    each build and writes the staging folder it is given."""
    script = tmp_path / "make_tiny_model.py"
    script.write_bytes(Path(make_tiny_model.__file__).read_bytes())
    monkeypatch.setattr(vllm_cpu, "_MODEL_SCRIPT", script)
    calls = tmp_path / "calls.log"
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{calls}"\n'
        'mkdir -p "$2" && echo weights > "$2/model.safetensors"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    home = tmp_path / "home"
    return python, script, home


def _builds(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def test_models_are_built_once_each_and_reused(fake_builder: tuple[Path, Path, Path]) -> None:
    python, _script, home = fake_builder
    calls = python.parent / "calls.log"
    tiny = ensure_model(python, home)
    medium = ensure_model(python, home, "medium")
    assert (tiny.name, medium.name) == ("tiny-model", "medium-model")
    assert [line.split()[-1] for line in _builds(calls)] == ["tiny", "medium"]
    assert json.loads((medium / "concur-vllm-stamp.json").read_text())["model"] == "medium"
    # Up to date: nothing is built again.
    assert ensure_model(python, home) == tiny
    assert ensure_model(python, home, "medium") == medium
    assert len(_builds(calls)) == 2
    assert (home / "model-medium.log").exists()


def test_changing_the_builder_rebuilds_every_model(
    fake_builder: tuple[Path, Path, Path],
) -> None:
    python, script, home = fake_builder
    calls = python.parent / "calls.log"
    ensure_model(python, home)
    ensure_model(python, home, "medium")
    # A changed constant (any edit of the script) invalidates both models' stamps.
    script.write_text(
        script.read_text().replace("intermediate_size=2816", "intermediate_size=2048")
    )
    ensure_model(python, home, "medium")
    ensure_model(python, home)
    assert [line.split()[-1] for line in _builds(calls)] == ["tiny", "medium", "medium", "tiny"]


def test_a_changed_pin_rebuilds_the_model(
    fake_builder: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    python, _script, home = fake_builder
    ensure_model(python, home, "medium")
    monkeypatch.setitem(vllm_cpu.PINS, "transformers", "0.0.0")
    ensure_model(python, home, "medium")
    assert len(_builds(python.parent / "calls.log")) == 2


def test_unknown_model_is_refused(fake_builder: tuple[Path, Path, Path]) -> None:
    python, _script, home = fake_builder
    with pytest.raises(ConfigError, match="model"):
        ensure_model(python, home, "huge")
