"""``concur sim serve|presets``: a real uvicorn server on loopback, the preset table, bad input."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from concur_langgraph.cli import main
from concur_langgraph.sim import PRESETS, get_preset
from concur_langgraph.sim._cli import config_from_json, config_to_json, load_config
from concur_langgraph.testing.sim_process import free_port, served_simulator


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``concur sim serve`` in a subprocess on a free loopback port; stopped by PID."""
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"preset": "cpu-tiny", "model_name": "served-tiny"}))
    with served_simulator("--config", str(config)) as sim:
        yield sim.url, sim.proc


def test_serve_answers_chat_metrics_and_aborts_on_disconnect(
    served: tuple[str, subprocess.Popen[str]],
) -> None:
    url, _proc = served
    body = {
        "model": "served-tiny",
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": 4,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=url, timeout=30.0) as client:
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] == 4
        assert client.get("/v1/models").json()["data"][0]["id"] == "served-tiny"

        # A long streamed request whose client hangs up after the first event: the server
        # must abort it (it would otherwise run ~1000 steps of ~8 ms modelled time).
        long_body = {**body, "max_tokens": 1000, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=long_body) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    break
        for _ in range(400):
            metrics = client.get("/metrics").text
            if _metric(metrics, "vllm:num_requests_running") == 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the abandoned request is still running")
        # Only the first request finished; the abandoned one was aborted, not completed.
        assert _metric(metrics, "vllm:request_success_total", finished_reason="length") == 1
        assert _metric(metrics, "vllm:generation_tokens_total") < 1000
        assert 'model_name="served-tiny"' in metrics


def test_presets_lists_every_preset_with_its_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "presets"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[0] == "preset"
    for name, config in PRESETS.items():
        (row,) = [line for line in lines if line.startswith(name + " ")]
        assert config.model_name in row
        assert f"{config.num_blocks} x {config.block_size}" in row
        assert str(config.kv_capacity_tokens) in row
        assert str(config.max_model_len) in row


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--preset", "no-such"], "unknown preset 'no-such'"),
        (["--preset", "test-tiny", "--num-blocks", "-4"], "SimConfig.num_blocks"),
        (["--preset", "test-tiny", "--block-size", "0"], "SimConfig.block_size"),
        (["--preset", "test-tiny", "--num-blocks", "8"], "max_model_len"),
        (["--preset", "test-tiny", "--max-model-len", "4096"], "max_model_len"),
        ([], "missing SimConfig field(s) model_name"),
        (["--preset", "test-tiny", "--port", "70000"], "--port"),
        (["--preset", "test-tiny", "--tool-call-turns", "3-1"], "--tool-call-turns"),
    ],
)
def test_serve_refuses_bad_input_naming_the_field(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "serve", *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and field in err


def test_config_file_overrides_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"num_blocks": 128, "cost": {"step_overhead_s": 0.5}}))
    config = load_config("test-tiny", str(path))
    base = get_preset("test-tiny")
    assert config.num_blocks == 128
    assert config.cost.step_overhead_s == 0.5
    assert config.cost.decode_seq_s == base.cost.decode_seq_s
    assert config.block_size == base.block_size
    # What `calibrate --out` writes loads back to the same configuration.
    dumped = tmp_path / "full.json"
    dumped.write_text(json.dumps(config_to_json(config)))
    assert load_config(None, str(dumped)) == config
    assert config_from_json(config_to_json(config), base) == config
    # A pair survives JSON (as a list) and comes back as the pair.
    turns = load_config("test-tiny", None, {"tool_call_turns": (1, 3)})
    dumped.write_text(json.dumps(config_to_json(turns)))
    assert load_config(None, str(dumped)) == turns
    assert turns.tool_call_turns == (1, 3)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"num_blokcs": 3}', "unknown SimConfig field(s) num_blokcs"),
        ('{"cost": {"step_overhead": 1}}', "unknown CostModel field(s) step_overhead"),
        ('{"cost": {"step_overhead_s": -1}}', "CostModel.step_overhead_s"),
        ("[1, 2]", "must hold a JSON object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_config_files_are_refused(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["sim", "serve", "--preset", "test-tiny", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_calibrate_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["sim", "calibrate", "--url", url]) == 1
    assert f"--url {url}" in capsys.readouterr().err


def test_calibrate_refuses_an_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "calibrate", "--url", "http://127.0.0.1:1", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
