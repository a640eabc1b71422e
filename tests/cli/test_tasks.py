"""The tasks file: every bad input is named by FILE:LINE, blank lines are not tasks."""

from __future__ import annotations

import json
import operator
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pytest
import step_graph
import typing_extensions
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AnyMessage
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from pydantic import BaseModel, ConfigDict

from concur_langgraph import ConfigError
from concur_langgraph.cli.tasks import Task, input_check, input_digest, load_tasks


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


def _graph(state: Any, input_schema: Any = None) -> Any:
    builder = StateGraph(state, input_schema=input_schema)

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


def test_a_graph_without_a_usable_schema_is_checked_as_json_only() -> None:
    class NoSchema:
        def get_input_schema(self) -> Any:
            raise RuntimeError("no schema here")

    check, why = input_check(NoSchema())
    assert check is None
    assert why is not None and "no schema here" in why


# --- Messages and other reducers: the check accepts exactly what graph.ainvoke accepts ---------


class _Messages(typing_extensions.TypedDict):
    messages: Annotated[list, add_messages]


class _PlainMessages(typing.TypedDict):
    # A typing.TypedDict: on Python < 3.12 the check rebuilds it (see above).
    messages: Annotated[list[AnyMessage], add_messages]


class _ModelState(BaseModel):
    # A pydantic state: LangGraph itself validates the state the first node reads.
    model_config = ConfigDict(extra="forbid")
    messages: Annotated[list[AnyMessage], add_messages]
    n: int = 0


class _WithCount(typing_extensions.TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    n: int


class _MessagesInput(typing_extensions.TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _agent() -> Any:
    model = GenericFakeChatModel(messages=iter([AIMessage("done")]))
    return create_agent(model, tools=[])


_GRAPHS: dict[str, Callable[[], Any]] = {
    "MessagesState": lambda: _graph(MessagesState),
    "TypedDict-list-add_messages": lambda: _graph(_Messages),
    "typing.TypedDict": lambda: _graph(_PlainMessages),
    "pydantic-state": lambda: _graph(_ModelState),
    "input_schema=": lambda: _graph(_WithCount, input_schema=_MessagesInput),
    "create_agent": _agent,
}

_TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

# (id, the value of "messages", whether LangGraph's add_messages takes it)
_MESSAGE_FORMS: list[tuple[str, Any, bool]] = [
    ("openai-user", [{"role": "user", "content": "hi"}], True),
    ("openai-assistant", [{"role": "assistant", "content": "hi"}], True),
    ("openai-system", [{"role": "system", "content": "be brief"}], True),
    ("openai-developer", [{"role": "developer", "content": "be brief"}], True),
    (
        "openai-tool",
        [
            {"role": "assistant", "content": "", "tool_calls": [_TOOL_CALL]},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ],
        True,
    ),
    (
        "openai-assistant-tool-calls",
        [{"role": "assistant", "content": "", "tool_calls": [_TOOL_CALL]}],
        True,
    ),
    ("openai-name-and-id", [{"role": "user", "content": "hi", "name": "ann", "id": "m1"}], True),
    ("content-blocks", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], True),
    ("content-null", [{"role": "user", "content": None}], True),
    ("langchain-human", [{"type": "human", "content": "hi"}], True),
    ("langchain-ai", [{"type": "ai", "content": "hi", "tool_calls": []}], True),
    ("role-text-pair", [["user", "hi"], ["assistant", "hello"]], True),
    ("bare-string-item", ["hi"], True),
    ("a-string-not-a-list", "hi", True),
    ("one-message-not-a-list", {"role": "user", "content": "hi"}, True),
    ("empty-list", [], True),
    ("mixed-forms", ["hi", ["ai", "hello"], {"type": "human", "content": "more"}], True),
    ("bad-role", [{"role": "robot", "content": "hi"}], False),
    ("missing-content", [{"role": "user"}], False),
    ("neither-role-nor-type", [{"content": "hi"}], False),
    ("tool-without-tool-call-id", [{"role": "tool", "content": "42"}], False),
    (
        "tool-call-arguments-not-json",
        [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                ],
            }
        ],
        False,
    ),
    ("content-a-number", [{"role": "user", "content": 5}], False),
    ("pair-of-three", [["user", "hi", "extra"]], False),
    ("a-number-not-a-list", 5, False),
    ("null", None, False),
    ("a-number-in-the-list", ["hi", 5], False),
]


async def _graph_accepts(graph: Any, value: Any) -> bool:
    """Whether ``graph.ainvoke(value)`` runs (the graphs here do nothing else that can fail)."""
    try:
        await graph.ainvoke(value)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("graph_name", list(_GRAPHS))
@pytest.mark.parametrize(
    ("messages", "accepted"),
    [pytest.param(m, ok, id=name) for name, m, ok in _MESSAGE_FORMS],
)
async def test_every_message_form_is_checked_as_the_graph_takes_it(
    graph_name: str, messages: Any, accepted: bool
) -> None:
    # The line as it is read from the file (JSON), for the graph and for the check alike.
    value = json.loads(json.dumps({"messages": messages}))
    check, why = input_check(_GRAPHS[graph_name]())
    assert check is not None, why
    problem = check(json.loads(json.dumps(value)))
    ran = await _graph_accepts(_GRAPHS[graph_name](), value)
    assert (problem is None) == ran, f"check said {problem!r}, graph.ainvoke ran: {ran}"
    assert ran == accepted  # the forms above say what add_messages does: keep them honest


def _keep_max(current: int, new: int) -> int:
    if not isinstance(new, int):
        raise TypeError(f"a score is an int, got {new!r}")
    return max(current, new)


class _Reducers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topic: str
    n: int = 0
    notes: Annotated[list[str], operator.add]
    best: Annotated[int, _keep_max] = 0


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ({"topic": "t", "notes": ["a"], "best": 3}, True),
        # A reducer key left out is not missing: its channel starts empty (notes == []).
        ({"topic": "t"}, True),
        # Overwrite skips the reducer; LangGraph reads this JSON form of it too.
        ({"topic": "t", "notes": {"__overwrite__": ["a"]}}, True),
        # Keys the input schema does not declare are dropped by LangGraph (extra="forbid" or not).
        ({"topic": "t", "unknown": 1}, True),
        ({"topic": "t", "n": "many"}, False),
        ({"topic": 3}, False),
        ({"n": 1}, False),
        ({"topic": "t", "notes": "abc"}, False),  # list + str: operator.add raises
        ({"topic": "t", "notes": [1]}, False),  # the reducer takes it, the state type does not
        ({"topic": "t", "best": "high"}, False),  # the custom reducer raises
        (["t", 1], False),
    ],
)
async def test_other_keys_and_reducers_are_checked_as_a_pydantic_state_graph_takes_them(
    value: Any, accepted: bool
) -> None:
    check, why = input_check(_graph(_Reducers))
    assert check is not None, why
    problem = check(json.loads(json.dumps(value)))
    ran = await _graph_accepts(_graph(_Reducers), value)
    assert (problem is None) == ran, f"check said {problem!r}, graph.ainvoke ran: {ran}"
    assert ran == accepted


async def test_a_typed_dict_key_is_held_to_its_declared_type_though_the_graph_does_not_check() -> (
    None
):
    # LangGraph checks no types of a TypedDict state: this task would start, and fail in the
    # middle of the batch. The check refuses it up front (docs/batch-cli.md).
    value = {"messages": [{"role": "user", "content": "hi"}], "n": "many"}
    assert await _graph_accepts(_graph(_WithCount), value)
    check, _ = input_check(_graph(_WithCount))
    assert check is not None
    problem = check(value)
    assert problem is not None and "n: Input should be a valid integer" in problem


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}',
            "does not match the graph's input schema: messages.1: Unexpected message type: 'robot'",
        ),
        (
            '{"messages": [{"role": "user"}]}',
            "does not match the graph's input schema: messages.0: Message dict must contain "
            "'role' and 'content' keys",
        ),
        (
            '{"messages": ["hi", {"role": "tool", "content": "42"}]}',
            "does not match the graph's input schema: messages.1: missing key 'tool_call_id'",
        ),
        (
            '{"messages": [{"role": "user", "content": 5}]}',
            "messages.0: not a valid HumanMessage: content.str: Input should be a valid string",
        ),
        ('{"messages": 5}', "messages: Unsupported message type"),
        # Every key that is wrong is named, the reducer's and the schema's.
        (
            '{"messages": [{"role": "robot", "content": "x"}], "n": "many"}',
            "messages.0: Unexpected message type: 'robot'. Use one of",
        ),
        (
            '{"messages": [{"role": "robot", "content": "x"}], "n": "many"}',
            "; n: Input should be a valid integer",
        ),
    ],
)
def test_a_refused_message_is_named_by_file_line_key_and_index(
    tmp_path: Path, line: str, expected: str
) -> None:
    path = _write(tmp_path, '{"messages": "ok", "n": 1}\n\n' + line + "\n")
    check, _ = input_check(_graph(_WithCount))
    with pytest.raises(ConfigError) as info:
        load_tasks(path, check=check)
    listed = str(info.value).splitlines()
    # One line per bad line: LangChain's troubleshooting link (a second line) is left out.
    assert len(listed) == 2
    assert listed[1].startswith(f"{path}:3: does not match the graph's input schema: ")
    assert expected in listed[1]


def test_openai_style_task_lines_load_and_are_passed_as_written(tmp_path: Path) -> None:
    line = {"messages": [{"role": "user", "content": "hi"}, ["assistant", "hello"], "more"]}
    path = _write(tmp_path, json.dumps(line) + "\n")
    check, _ = input_check(_graph(MessagesState))
    (task,) = load_tasks(path, check=check).tasks
    # The graph converts them when it runs; the task (and its digest) is the line as written.
    assert task.value == line


def test_a_message_in_a_key_without_a_reducer_must_be_a_langchain_message() -> None:
    class Transcript(typing_extensions.TypedDict):
        messages: list[AnyMessage]  # no add_messages: nothing converts other forms

    check, _ = input_check(_graph(Transcript))
    assert check is not None
    assert check({"messages": [{"type": "human", "content": "hi"}]}) is None
    problem = check({"messages": [{"role": "user", "content": "hi"}]})
    assert problem is not None
    assert problem.startswith("does not match the graph's input schema: messages: ")
    assert '{"type": "human", "content": "..."}' in problem
