"""The tasks file of ``concur run``: one JSON value per line, each the input of one agent.

Rules (docs/batch-cli.md):

* a task is named by its **line number** in the file (1-based, counting every physical line),
  so ``FILE:LINE`` in a message is where an editor shows it, and the agent's thread is
  ``{batch_id}/{line}``;
* blank lines (empty or whitespace only) are not tasks and are skipped silently: a trailing
  newline, or blank lines separating groups, are common in hand-written files and mean nothing;
* a line that is not UTF-8, not valid JSON (``NaN``/``Infinity`` included: they are not JSON
  and could not be written back to the results file), or not an input the graph accepts (its
  input schema) is a **bad line**. The loader collects every bad line; the caller decides
  whether they stop the batch (the default) or are skipped (``--skip-bad``);
* a file with no task at all is an error whatever the other options.

Input checking uses the graph's own input schema (``graph.get_input_schema()``, a pydantic
model). On Python < 3.12 pydantic cannot build one for a state declared with
``typing.TypedDict``; the check then rebuilds that TypedDict as a ``typing_extensions`` one
with the same keys, types and required keys. When no schema can be built at all the tasks are
checked as JSON only and :func:`input_check` says why.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typing_extensions
from pydantic import BaseModel, TypeAdapter, ValidationError

from ._errors import ConfigError

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


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        # The graph's input model is a RootModel around the state type: drop that "root".
        loc = [str(p) for p in error["loc"] if p != "root"]
        where = ".".join(loc)
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def _schema_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return f"does not match the graph's input schema: {_format_validation(exc)}"
    # Validators of LangChain's message union raise TypeError for a dict without "type".
    hint = ""
    if isinstance(exc, TypeError) and "'type'" in str(exc):
        hint = ' (a message is written {"type": "human", "content": "..."})'
    return f"does not match the graph's input schema: {exc}{hint}"


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


def _adapter_check(adapter: TypeAdapter[Any]) -> InputCheck:
    def check(value: Any) -> str | None:
        try:
            adapter.validate_python(value)
        except (ValidationError, TypeError, ValueError) as exc:
            return _schema_error(exc)
        return None

    return check


def input_check(graph: Any) -> tuple[InputCheck | None, str | None]:
    """A checker of task inputs for ``graph``, or ``(None, why)`` when none can be built."""
    try:
        model = graph.get_input_schema()
    except Exception as exc:
        first_error: Exception = exc
    else:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return _adapter_check(TypeAdapter(model)), None
        return None, f"its input schema is not a pydantic model ({model!r})"
    state = getattr(getattr(graph, "builder", None), "input_schema", None)
    if typing.is_typeddict(state):
        try:
            return _adapter_check(TypeAdapter(_rebuilt_typed_dict(state))), None
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
