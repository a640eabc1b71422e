"""The results file: one fsync'd write per line, a cut last line tolerated and repaired."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.errors import GraphRecursionError
from langgraph.types import Interrupt
from pydantic import TypeAdapter

from concur_langgraph import ConfigError
from concur_langgraph.cli.results import ResultsWriter, read_results, result_record, to_jsonable


def _record(line: int, **extra: Any) -> dict[str, Any]:
    return {"line": line, "thread_id": f"b/{line}", "status": "ok", "output": None, **extra}


def test_each_record_is_one_write_of_the_whole_line_then_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, Any]] = []
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes) -> int:
        calls.append(("write", data))
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        calls.append(("fsync", fd))
        real_fsync(fd)

    path = tmp_path / "r.jsonl"
    with ResultsWriter(path) as writer:
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)
        writer.write(_record(1, output={"text": "é\nmulti-line"}))
        writer.write(_record(2))
    assert [kind for kind, _ in calls] == ["write", "fsync", "write", "fsync"]
    first = calls[0][1]
    assert first.endswith(b"\n") and first.count(b"\n") == 1
    assert json.loads(first)["output"] == {"text": "é\nmulti-line"}
    assert [r["line"] for r in read_results(path).records] == [1, 2]


def test_a_short_write_is_finished_so_no_line_is_left_torn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    cut = {"done": False}

    def short_write(fd: int, data: bytes) -> int:
        if not cut["done"]:
            cut["done"] = True
            return real_write(fd, data[:5])
        return real_write(fd, data)

    path = tmp_path / "r.jsonl"
    with ResultsWriter(path) as writer:
        monkeypatch.setattr(os, "write", short_write)
        writer.write(_record(1))
    assert read_results(path).records == (_record(1),)


def test_a_cut_last_line_is_ignored_by_the_reader_and_removed_by_the_writer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path) as writer:
        writer.write(_record(1))
        writer.write(_record(2))
    whole = path.read_bytes()
    # What a SIGKILL inside the third write leaves: a prefix without its newline.
    path.write_bytes(whole + json.dumps(_record(3)).encode()[:17])
    seen = read_results(path)
    assert [r["line"] for r in seen.records] == [1, 2]
    assert seen.partial_tail
    with ResultsWriter(path) as writer:
        assert writer.repaired_bytes == 17
        assert path.read_bytes() == whole
        writer.write(_record(3))
    again = read_results(path)
    assert [r["line"] for r in again.records] == [1, 2, 3]
    assert not again.partial_tail


def test_a_file_that_is_only_a_cut_line_is_emptied(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"line": 1, "thr')
    with ResultsWriter(path) as writer:
        assert writer.repaired_bytes == len(b'{"line": 1, "thr')
    assert path.read_bytes() == b""


def test_a_missing_file_reads_as_empty(tmp_path: Path) -> None:
    seen = read_results(tmp_path / "none.jsonl")
    assert seen.records == () and not seen.partial_tail


def test_a_corrupt_complete_line_is_named_not_ignored(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_record(1)) + "\nnot json\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: not a result record"):
        read_results(path)
    path.write_text(json.dumps({"line": 1}) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: not a result record"):
        read_results(path)


def test_two_results_for_one_task_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_record(4)) + "\n" + json.dumps(_record(4)) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: a second result for task line 4"):
        read_results(path)


def test_the_status_follows_the_outcome() -> None:
    ok = result_record(line=1, thread_id="b/1", input_sha256="h", outcome={"x": 1}, failed=False)
    assert ok["status"] == "ok" and ok["output"] == {"x": 1} and "error" not in ok
    paused = result_record(
        line=2,
        thread_id="b/2",
        input_sha256="h",
        outcome={"x": 1, "__interrupt__": [Interrupt(value="approve?", id="i1")]},
        failed=False,
    )
    assert paused["status"] == "interrupted"
    (stored,) = paused["output"]["__interrupt__"]
    assert stored["value"] == "approve?" and stored["id"] == "i1"
    failed = result_record(
        line=3,
        thread_id="b/3",
        input_sha256="h",
        outcome=GraphRecursionError("too deep"),
        failed=True,
    )
    assert failed["status"] == "error" and "output" not in failed
    assert failed["error"] == {
        "type": "langgraph.errors.GraphRecursionError",
        "message": "too deep",
    }
    builtin = result_record(
        line=4, thread_id="b/4", input_sha256="h", outcome=ValueError("bad"), failed=True
    )
    assert builtin["error"]["type"] == "ValueError"


def test_messages_are_written_so_they_validate_back_into_the_same_messages() -> None:
    messages = [
        HumanMessage("question", id="h1"),
        AIMessage(
            "answer",
            id="a1",
            tool_calls=[{"name": "search", "args": {"q": "x"}, "id": "c1"}],
            usage_metadata={"input_tokens": 3, "output_tokens": 1, "total_tokens": 4},
        ),
    ]
    data = json.loads(json.dumps(to_jsonable({"messages": messages})))
    back = TypeAdapter(list[AnyMessage]).validate_python(data["messages"])
    assert back == messages


@dataclasses.dataclass
class _Point:
    x: int
    when: dt.date


def test_other_values_become_readable_json() -> None:
    value = {
        "tuple": (1, 2),
        "set": {3},
        "bytes": b"\x00\x01",
        "point": _Point(x=1, when=dt.date(2026, 1, 2)),
        "nan": float("nan"),
        "error": KeyError("k"),
        "other": object,
        1: "int key",
    }
    out = to_jsonable(value)
    json.dumps(out, allow_nan=False)
    assert out["tuple"] == [1, 2]
    assert out["set"] == [3]
    assert out["bytes"] == "AAE="
    assert out["point"] == {"x": 1, "when": "2026-01-02"}
    assert out["nan"] == "nan"
    assert out["error"] == {"type": "KeyError", "message": "'k'"}
    assert out["other"] == repr(object)
    assert out["1"] == "int key"
