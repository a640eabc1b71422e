"""The results file of ``concur run``: append-only JSON lines, each durable once written.

One line per finished task (docs/batch-cli.md has the fields)::

    {"line": 3, "thread_id": "results.jsonl/3", "status": "ok", "input_sha256": "...",
     "finished_at": "2026-11-25T12:00:00.123456+00:00", "output": {...}}

Crash safety: :class:`ResultsWriter` writes each line with ONE ``os.write`` of the whole line
on a file opened ``O_APPEND`` and then ``fsync``\\ s it, so a line is either wholly on disk or, if
the process dies inside that write, a prefix with no newline at the very end of the file. Every
line the writer writes ends in a newline, so a last line without one is exactly such a crash
remnant: :func:`read_results` ignores it and the writer truncates it away when it reopens the
file. Any other unreadable line is corruption (someone edited the file), reported with its
``FILE:LINE``.

Outputs are written with :func:`to_jsonable`: pydantic models (LangChain messages among them)
as their ``model_dump(mode="json")`` - a message keeps its ``type``, so the record validates
back into the same message class (``AnyMessage``) -, dataclasses (LangGraph's ``Interrupt``)
as objects of their fields, tuples and sets as lists, bytes as base64 text, dates as ISO 8601,
exceptions as ``{"type", "message"}``, anything else as its ``repr``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import json
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from types import TracebackType
from typing import Any, Final

from pydantic import BaseModel

from concur_langgraph.errors import ConfigError

__all__ = [
    "STATUSES",
    "ResultsFile",
    "ResultsWriter",
    "error_info",
    "read_results",
    "result_record",
    "to_jsonable",
]

STATUSES: Final = ("ok", "error", "interrupted")
"""``ok``: the run finished; ``error``: it raised (``error`` holds the exception);
``interrupted``: it stopped at a human-in-the-loop ``interrupt()`` (``output`` holds the state
with ``__interrupt__``)."""


def _type_name(kind: type) -> str:
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def error_info(exc: BaseException) -> dict[str, str]:
    """``{"type": qualified class name, "message": str(exc)}``."""
    return {"type": _type_name(type(exc)), "message": str(exc)}


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """``value`` as plain JSON data (see the module docstring for each kind)."""
    if _depth > 200:
        return repr(value)
    depth = _depth + 1
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        # JSON has no NaN or infinities; keep them readable rather than fail the record.
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, depth) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v, depth) for v in value]
    if isinstance(value, BaseModel):
        try:
            return value.model_dump(mode="json")
        except Exception:
            # A field pydantic cannot serialise: convert the python-mode dump ourselves.
            return to_jsonable(value.model_dump(), depth)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_jsonable(getattr(value, f.name), depth) for f in dataclasses.fields(value)
        }
    if isinstance(value, BaseException):
        return error_info(value)
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, depth)
    if isinstance(value, uuid.UUID | PurePath):
        return str(value)
    return repr(value)


def result_record(
    *, line: int, thread_id: str, input_sha256: str, outcome: Any, failed: bool
) -> dict[str, Any]:
    """The record of one finished task; ``failed`` says ``outcome`` is the exception raised."""
    record: dict[str, Any] = {"line": line, "thread_id": thread_id}
    if failed:
        record["status"] = "error"
    elif isinstance(outcome, Mapping) and outcome.get("__interrupt__"):
        record["status"] = "interrupted"
    else:
        record["status"] = "ok"
    record["input_sha256"] = input_sha256
    record["finished_at"] = dt.datetime.now(dt.UTC).isoformat()
    if failed:
        record["error"] = error_info(outcome)
    else:
        record["output"] = to_jsonable(outcome)
    return record


def _encode(record: Mapping[str, Any]) -> bytes:
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text + "\n").encode("utf-8")


def _fsync_dir(path: Path) -> None:
    # A new file's directory entry is durable only once the directory itself is synced.
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file's own fsync still holds
    finally:
        os.close(fd)


class ResultsWriter:
    """Appends result records to a file, each durable (written and fsync'd) on return.

    Opening repairs the file: a last line without a newline (a write cut by a crash) is
    truncated away. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        created = not self.path.exists()
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self.repaired_bytes = self._repair()
        if created:
            _fsync_dir(self.path)

    def _repair(self) -> int:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0
        # Find the last newline, reading backwards in blocks.
        end = size
        block = 1 << 16
        keep = 0
        while end > 0:
            start = max(0, end - block)
            chunk = os.pread(self._fd, end - start, start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        if keep == size:
            return 0
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        return size - keep

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line and fsync it."""
        if self._fd is None:
            raise ValueError("ResultsWriter: write after close")
        data = _encode(record)
        written = os.write(self._fd, data)
        # A regular file takes the whole buffer in one write unless the disk is full or a
        # signal cut it; finish the line so the file is never left with a torn one.
        while written < len(data):
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultsFile:
    """What a results file holds."""

    records: tuple[dict[str, Any], ...]
    """The complete records, in file order."""
    partial_tail: bool
    """Whether the file ends in a cut line (a crash inside a write); it is not in
    :attr:`records` and the next :class:`ResultsWriter` removes it."""

    def by_line(self) -> dict[int, dict[str, Any]]:
        """Records keyed by task line."""
        return {int(r["line"]): r for r in self.records}


def read_results(path: str | Path) -> ResultsFile:
    """Read a results file; a missing file is an empty one.

    Raises :class:`ConfigError` naming ``FILE:LINE`` for a complete line that is not a
    result record, and for two records of one task.
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ResultsFile(records=(), partial_tail=False)
    except OSError as exc:
        raise ConfigError(f"--out: cannot read {name}: {exc.strerror or exc}") from exc
    lines = data.split(b"\n")
    # The piece after the last newline is empty for a well-formed file, else a cut line.
    partial_tail = lines[-1] != b""
    records: list[dict[str, Any]] = []
    seen: dict[int, int] = {}
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--out: {name}:{number}: not a result record ({exc})") from exc
        if not (
            isinstance(record, dict)
            and isinstance(record.get("line"), int)
            and isinstance(record.get("thread_id"), str)
            and record.get("status") in STATUSES
        ):
            raise ConfigError(
                f"--out: {name}:{number}: not a result record (needs line, thread_id and a "
                f"status among {', '.join(STATUSES)})"
            )
        task = record["line"]
        if task in seen:
            raise ConfigError(
                f"--out: {name}:{number}: a second result for task line {task} "
                f"(the first is at {name}:{seen[task]})"
            )
        seen[task] = number
        records.append(record)
    return ResultsFile(records=tuple(records), partial_tail=partial_tail)
