"""The tasks file: every bad input is named by FILE:LINE, blank lines are not tasks."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Annotated, Any

import pytest
import step_graph
import typing_extensions
from langgraph.graph import START, StateGraph

from concur_langgraph._errors import ConfigError
from concur_langgraph._tasks import Task, input_check, input_digest, load_tasks


def _write(tmp_path: Path, text: str | bytes, name: str = "tasks.jsonl") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _check() -> Any:
    check, why = input_check(step_graph.graph)
    assert check is not None, why
    return check


def test_tasks_are_named_by_their_physical_line_and_blank_lines_are_skipped(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        '{"topic": "a", "rounds": 1}\n\n   \n{"topic": "b", "rounds": 2}\r\n'
        '{"topic": "c", "rounds": 3}',
    )
    tasks = load_tasks(path, check=_check())
    assert [t.line for t in tasks.tasks] == [1, 4, 5]
    assert [t.value["topic"] for t in tasks.tasks] == ["a", "b", "c"]
    assert tasks.bad == ()
    assert tasks.checked


def test_values_are_passed_as_written_not_as_the_schema_coerced_them(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"topic": "a", "rounds": 1, "tool_s": 1}\n')
    (task,) = load_tasks(path, check=_check()).tasks
    assert task.value == {"topic": "a", "rounds": 1, "tool_s": 1}
    assert type(task.value["tool_s"]) is int


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"topic": "a", "rounds": 1', "not valid JSON"),
        ('{"topic": "a", "rounds": NaN}', "NaN is not JSON"),
        ('{"topic": "a"}', "rounds: Field required"),
        ('{"topic": "a", "rounds": "many"}', "rounds: Input should be a valid integer"),
        ('["a", 1]', "Input should be a valid dictionary"),
    ],
)
def test_a_bad_line_stops_the_load_and_is_named_by_file_and_line(
    tmp_path: Path, line: str, expected: str
) -> None:
    path = _write(tmp_path, '{"topic": "ok", "rounds": 1}\n\n' + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_tasks(path, check=_check())
    message = str(info.value)
    assert f"{path}:3: " in message
    assert expected in message
    assert "--skip-bad" in message


def test_a_line_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, b'{"topic": "ok", "rounds": 1}\n{"topic": "\xff", "rounds": 1}\n')
    with pytest.raises(ConfigError, match=rf"{path}:2: not UTF-8"):
        load_tasks(path)


def test_skip_bad_keeps_the_good_lines_and_returns_the_bad_ones(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '{"topic": "a", "rounds": 1}\n{oops\n{"topic": "c", "rounds": 1}\n{"topic": 3}\n',
    )
    tasks = load_tasks(path, check=_check(), keep_going=True)
    assert [t.line for t in tasks.tasks] == [1, 3]
    assert [b.line for b in tasks.bad] == [2, 4]
    assert tasks.bad[0].describe(path).startswith(f"{path}:2: not valid JSON")


def test_every_bad_line_is_listed_up_to_ten_then_counted(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"topic": "a", "rounds": 1}\n' + "x\n" * 12)
    with pytest.raises(ConfigError) as info:
        load_tasks(path)
    message = str(info.value)
    assert "12 bad line(s)" in message
    assert f"{path}:11:" in message
    assert f"{path}:12:" not in message
    assert "and 2 more bad lines" in message


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_a_file_without_tasks_is_an_error_even_with_skip_bad(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="has no tasks"):
        load_tasks(path, keep_going=True)


def test_a_file_of_only_bad_lines_is_an_error_even_with_skip_bad(tmp_path: Path) -> None:
    path = _write(tmp_path, "x\ny\n")
    with pytest.raises(ConfigError, match=r"every task line .* is bad") as info:
        load_tasks(path, keep_going=True)
    assert f"{path}:1:" in str(info.value)
    assert f"{path}:2:" in str(info.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TASKS: cannot read .*nope\.jsonl"):
        load_tasks(tmp_path / "nope.jsonl")


def test_the_digest_ignores_formatting_but_not_content() -> None:
    assert input_digest({"a": 1, "b": [1, 2]}) == input_digest(json.loads('{ "b":[1,2],"a":1 }'))
    assert input_digest({"a": 1}) != input_digest({"a": 2})


def test_task_lines_start_at_one() -> None:
    with pytest.raises(ConfigError, match="line"):
        Task(line=0, value={}, digest="")


class _Extension(typing_extensions.TypedDict):
    n: int


class _Plain(typing.TypedDict):
    n: int
    tags: Annotated[list[str], "reducer-free annotation"]


class _Partial(typing.TypedDict, total=False):
    n: int


def _graph(state: Any) -> Any:
    builder = StateGraph(state)

    async def node(s: Any) -> dict[str, Any]:
        return {}

    builder.add_node("node", node)
    builder.add_edge(START, "node")
    return builder.compile()


@pytest.mark.parametrize("state", [_Extension, _Plain])
def test_the_input_schema_is_checked_for_both_kinds_of_typed_dict(state: Any) -> None:
    # pydantic cannot take a typing.TypedDict on Python < 3.12; the check rebuilds it.
    check, why = input_check(_graph(state))
    assert check is not None, why
    good: dict[str, Any] = {"n": 1, "tags": ["x"]}
    assert check(good) is None
    problem = check({"n": "one"})
    assert problem is not None and "n: Input should be a valid integer" in problem


def test_keys_a_typed_dict_does_not_require_may_be_left_out() -> None:
    check, _ = input_check(_graph(_Partial))
    assert check is not None
    assert check({}) is None


def test_message_inputs_need_langchains_type_key() -> None:
    from langgraph.graph import MessagesState

    check, _ = input_check(_graph(MessagesState))
    assert check is not None
    assert check({"messages": [{"type": "human", "content": "hi"}]}) is None
    problem = check({"messages": [{"role": "user", "content": "hi"}]})
    assert problem is not None and "type" in problem


def test_a_graph_without_a_usable_schema_is_checked_as_json_only() -> None:
    class NoSchema:
        def get_input_schema(self) -> Any:
            raise RuntimeError("no schema here")

    check, why = input_check(NoSchema())
    assert check is None
    assert why is not None and "no schema here" in why
