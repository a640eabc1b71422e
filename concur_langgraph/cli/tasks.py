"""The tasks file of ``concur run``: one JSON value per line, each the input of one agent.

Rules (docs/batch-cli.md):

* a task is named by its **line number** in the file (1-based, counting every physical line),
  so ``FILE:LINE`` in a message is where an editor shows it, and the agent's thread is
  ``{batch_id}/{line}``;
* blank lines (empty or whitespace only) are not tasks and are skipped silently: a trailing
  newline, or blank lines separating groups, are common in hand-written files and mean nothing;
* a line that is not UTF-8, not valid JSON (``NaN``/``Infinity`` included: they are not JSON
  and could not be written back to the results file), or not an input the graph accepts (see
  below) is a **bad line**. The loader collects every bad line; the caller decides whether
  they stop the batch (the default) or are skipped (``--skip-bad``);
* a file with no task at all is an error whatever the other options.

Input checking does what ``graph.ainvoke(value)`` does with the input on a new thread, then
checks the result against the graph's input schema:

1. LangGraph writes each key of the input that its input schema declares to that key's channel
   (other keys are dropped). A channel with a reducer (``Annotated[list, add_messages]``,
   ``operator.add``, any ``(old, new) -> merged`` function) runs it on the channel's empty
   value: this is where ``add_messages`` turns OpenAI-style ``{"role": ..., "content": ...}``
   dicts, ``[role, text]`` pairs, bare strings and ``{"type": ...}`` dicts into messages, and
   where it raises on anything else. The check runs the graph's own channels the same way, so a
   reducer accepts and refuses exactly what it would in the graph. The input schema that
   pydantic derives from the state (``graph.get_input_schema()``) cannot say this: it types
   ``messages`` as ``list[AnyMessage]``, which takes no ``role`` dict, pair or string.
2. The state the first node reads (every channel that has a value after that write, reducer
   results included) is validated against the input schema, a pydantic model. For a
   pydantic-model state this is what LangGraph itself does before the first node runs. For a
   ``TypedDict`` state LangGraph checks no types at all and a wrongly typed key fails later, in
   the middle of a batch; the check holds such keys to their declared types anyway (the reason
   the tasks file is checked at all).

On Python < 3.12 pydantic cannot build a schema for a state declared with ``typing.TypedDict``;
the check then rebuilds that TypedDict as a ``typing_extensions`` one with the same keys, types
and required keys. A graph that is not a compiled ``StateGraph`` (no channels to run) is checked
by its schema alone. When no schema can be built at all the tasks are checked as JSON only and
:func:`input_check` says why.
"""

from __future__ import annotations

import copy
import hashlib
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typing_extensions
from langgraph.channels.base import BaseChannel
from langgraph.errors import EmptyChannelError
from pydantic import BaseModel, TypeAdapter, ValidationError

from concur_langgraph.errors import ConfigError

__all__ = [
    "BadLine",
    "InputCheck",
    "Task",
    "TaskFile",
    "input_check",
    "input_digest",
    "load_tasks",
]

InputCheck = Callable[[Any], str | None]
"""Checks one task's input: ``None`` when the graph accepts it, else what is wrong."""

_MAX_LISTED = 10
"""Bad lines listed in one error message; the rest are counted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """One agent's input, read from the tasks file."""

    line: int
    """1-based line number in the tasks file: the task's name and its thread's suffix."""
    value: Any
    """The parsed JSON value, passed to the graph as is (the graph applies its own reducers
    and coercions, exactly as for ``graph.ainvoke(value)``)."""
    digest: str
    """SHA-256 of the value's canonical JSON: a changed line (not a reformatted one) on
    ``--resume`` is detected with it."""

    def __post_init__(self) -> None:
        if self.line < 1:
            raise ConfigError(f"line: must be >= 1, got {self.line!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BadLine:
    """A line that cannot be a task."""

    line: int
    """1-based line number in the tasks file."""
    reason: str
    """What is wrong with it, for a person."""

    def __post_init__(self) -> None:
        if self.line < 1:
            raise ConfigError(f"line: must be >= 1, got {self.line!r}")

    def describe(self, path: str | Path) -> str:
        """``FILE:LINE: reason``."""
        return f"{path}:{self.line}: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFile:
    """A loaded tasks file."""

    path: str
    """The file, as the user named it (messages quote it so)."""
    tasks: tuple[Task, ...]
    """The good lines, in file order."""
    bad: tuple[BadLine, ...]
    """The bad lines, in file order (empty unless the loader was told to keep going)."""
    checked: bool
    """Whether the inputs were checked against the graph's input schema."""

    def by_line(self) -> dict[int, Task]:
        """Tasks keyed by line number."""
        return {task.line: task for task in self.tasks}


def input_digest(value: Any) -> str:
    """SHA-256 hex of ``value``'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _validation_problems(exc: ValidationError, *, skip: Mapping[str, str]) -> list[str]:
    """One ``where: what`` per error, leaving out the keys in ``skip`` (already reported)."""
    parts = []
    for error in exc.errors(include_url=False):
        # The graph's input model is a RootModel around the state type: drop that "root".
        loc = [str(p) for p in error["loc"] if p != "root"]
        if loc and loc[0] in skip:
            continue
        where = ".".join(loc)
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return parts


def _schema_error(problems: list[str]) -> str:
    return f"does not match the graph's input schema: {'; '.join(problems)}"


def _type_error_hint(exc: Exception) -> str:
    # Validators of LangChain's message union raise TypeError for a dict without "type": the
    # message did not go through a reducer that converts other forms (add_messages does).
    if isinstance(exc, TypeError) and "'type'" in str(exc):
        return (
            " (a message that no reducer such as add_messages converts is written"
            ' {"type": "human", "content": "..."})'
        )
    return ""


def _describe(exc: Exception) -> str:
    """What a channel's reducer said about a value, on one line."""
    if isinstance(exc, ValidationError):
        return f"not a valid {exc.title}: {'; '.join(_validation_problems(exc, skip={}))}"
    if isinstance(exc, KeyError):
        # LangChain's message constructors index the keys a role needs (tool: tool_call_id).
        return f"missing key {exc.args[0]!r}" if exc.args else "missing key"
    # LangChain adds a troubleshooting link on a second line; a bad line is reported on one.
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if type(exc) in (ValueError, TypeError, NotImplementedError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _rebuilt_typed_dict(state: Any) -> Any:
    """``state`` (a ``typing.TypedDict``) as a ``typing_extensions.TypedDict`` pydantic takes."""
    hints = typing.get_type_hints(state, include_extras=True)
    required: frozenset[str] = getattr(state, "__required_keys__", frozenset())
    fields = {
        key: (
            typing_extensions.Required[hint]
            if key in required
            else typing_extensions.NotRequired[hint]
        )
        for key, hint in hints.items()
    }
    return typing_extensions.TypedDict(state.__name__, fields)  # type: ignore[operator]


_Channel = BaseChannel[Any, Any, Any]
"""A LangGraph channel: a state key's storage, with its reducer if it has one."""

_ROOT = "__root__"
"""The one channel of a graph whose state is not a mapping (``StateGraph(list[str])``)."""


def _input_channels(graph: Any) -> dict[str, _Channel] | None:
    """The channels the graph writes its input to, by key (those its input schema declares);
    ``None`` when ``graph`` is not a compiled ``StateGraph``."""
    builder = getattr(graph, "builder", None)
    schemas = getattr(builder, "schemas", None)
    channels = getattr(graph, "channels", None)
    if not isinstance(schemas, dict) or not isinstance(channels, dict):
        return None
    try:
        keys = schemas[builder.input_schema]  # type: ignore[union-attr]
    except (AttributeError, KeyError, TypeError):
        return None
    # Managed values are not channels, and LangGraph refuses them in an input schema anyway.
    return {key: channels[key] for key in keys if isinstance(channels.get(key), BaseChannel)}


def _written(spec: _Channel, value: Any) -> _Channel:
    """A new thread's channel ``spec`` after the input wrote ``value`` to it; raises what the
    channel's reducer raises."""
    # The compiled graph's channels are specs that never hold a value: a copy is a new
    # thread's empty channel.
    channel = spec.copy()
    # A copy: reducers may change what they are given, and the task is run as written.
    channel.update([copy.deepcopy(value)])
    return channel


def _write_problem(spec: _Channel, key: str, value: Any, exc: Exception) -> str:
    """``KEY[.INDEX]: what is wrong``, naming the item of a list that the reducer refused
    (the first one that, written alone, fails the same way)."""
    where = "" if key == _ROOT else key
    if isinstance(value, list):
        for index, item in enumerate(value):
            try:
                _written(spec, [item])
            except Exception as alone:
                if type(alone) is type(exc) and str(alone) == str(exc):
                    where = f"{where}.{index}" if where else str(index)
                    break
    return f"{where}: {_describe(exc)}" if where else _describe(exc)


def _first_step(channels: Mapping[str, _Channel], value: Any) -> tuple[Any, dict[str, str]]:
    """The state the graph's first node reads after the input ``value`` is written on a new
    thread, and the keys whose channel refused their value (key: what is wrong)."""
    root = list(channels) == [_ROOT]
    if root:
        writes = {_ROOT: value}
    elif isinstance(value, dict):
        writes = {key: item for key, item in value.items() if key in channels}
    else:
        return value, {}  # not a mapping: LangGraph raises, and so does the schema
    state: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for key, spec in channels.items():
        try:
            channel = _written(spec, writes[key]) if key in writes else spec.copy()
        except Exception as exc:
            refused[key] = _write_problem(spec, key, writes[key], exc)
            continue
        # A reducer channel has a value (its empty one) even when the input left its key out,
        # so such a key is never missing for the schema.
        try:
            state[key] = channel.get()
        except EmptyChannelError:
            pass
    if root:
        return state.get(_ROOT, value), refused
    return state, refused


def _raised_at(adapter: TypeAdapter[Any], state: Any, exc: Exception) -> str | None:
    """The key of ``state`` whose value alone makes the schema raise ``exc`` (a validator that
    raises instead of reporting, as LangChain's message union does, gives no location)."""
    if not isinstance(state, dict):
        return None
    for key, item in state.items():
        try:
            adapter.validate_python({key: item})
        except ValidationError:
            continue  # reported, not raised (the other keys are missing): not this key
        except (TypeError, ValueError) as alone:
            if type(alone) is type(exc) and str(alone) == str(exc):
                return str(key)
    return None


def _adapter_check(
    adapter: TypeAdapter[Any], channels: Mapping[str, _Channel] | None
) -> InputCheck:
    def check(value: Any) -> str | None:
        state, refused = (value, {}) if channels is None else _first_step(channels, value)
        problems = list(refused.values())
        if _ROOT not in refused:
            try:
                adapter.validate_python(state)
            except ValidationError as exc:
                problems.extend(_validation_problems(exc, skip=refused))
            except (TypeError, ValueError) as exc:
                # Raised at the first bad key only: report it unless a reducer already did.
                key = _raised_at(adapter, state, exc)
                if key not in refused:
                    where = f"{key}: " if key is not None else ""
                    problems.append(f"{where}{exc}{_type_error_hint(exc)}")
        return _schema_error(problems) if problems else None

    return check


def input_check(graph: Any) -> tuple[InputCheck | None, str | None]:
    """A checker of task inputs for ``graph``, or ``(None, why)`` when none can be built."""
    channels = _input_channels(graph)
    try:
        model = graph.get_input_schema()
    except Exception as exc:
        first_error: Exception = exc
    else:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return _adapter_check(TypeAdapter(model), channels), None
        return None, f"its input schema is not a pydantic model ({model!r})"
    state = getattr(getattr(graph, "builder", None), "input_schema", None)
    if typing.is_typeddict(state):
        try:
            return _adapter_check(TypeAdapter(_rebuilt_typed_dict(state)), channels), None
        except Exception as exc:
            return None, f"no schema can be built for its input type {state!r}: {exc}"
    return None, f"graph.get_input_schema() failed: {type(first_error).__name__}: {first_error}"


def _parse_line(raw: bytes, check: InputCheck | None) -> tuple[Any, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start + 1} of the line)"
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (column {exc.colno})"
    except ValueError as exc:
        return None, f"not valid JSON: {exc}"
    if check is not None:
        problem = check(value)
        if problem is not None:
            return None, problem
    return value, None


def load_tasks(
    path: str | Path, *, check: InputCheck | None = None, keep_going: bool = False
) -> TaskFile:
    """Read and check a tasks file.

    Raises :class:`ConfigError` when the file cannot be read, holds no line that could be a
    task, or (unless ``keep_going``) has bad lines: the message lists them as ``FILE:LINE:
    what is wrong``. With ``keep_going`` the bad lines are returned in :attr:`TaskFile.bad`;
    a file whose every task line is bad is still an error.
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"TASKS: cannot read {name}: {exc.strerror or exc}") from exc
    tasks: list[Task] = []
    bad: list[BadLine] = []
    # A final line without a newline is a line; a final newline does not start one.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        value, problem = _parse_line(raw.rstrip(b"\r"), check)
        if problem is not None:
            bad.append(BadLine(line=number, reason=problem))
        else:
            tasks.append(Task(line=number, value=value, digest=input_digest(value)))
    if not tasks and not bad:
        raise ConfigError(f"TASKS: {name} has no tasks (it is empty or has only blank lines)")
    if bad and (not keep_going or not tasks):
        listed = [b.describe(name) for b in bad[:_MAX_LISTED]]
        if len(bad) > _MAX_LISTED:
            listed.append(f"... and {len(bad) - _MAX_LISTED} more bad lines")
        head = (
            f"TASKS: every task line of {name} is bad"
            if not tasks
            else f"TASKS: {len(bad)} bad line(s) in {name}; nothing was started (pass "
            "--skip-bad to run the good lines and skip these)"
        )
        raise ConfigError("\n".join([head, *listed]))
    return TaskFile(path=name, tasks=tuple(tasks), bad=tuple(bad), checked=check is not None)
