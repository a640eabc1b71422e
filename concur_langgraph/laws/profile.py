"""What one batch measured, for the next batch of the same agent (a warm start).

A batch cannot know at its start how large its agents' contexts will grow over their lives:
it learns that only as agents finish, minutes after the first admissions (docs/laws.md, third
session). A previous batch of the same agent (RL rollouts and evaluations rerun one agent
hundreds of times) measured it. :class:`BatchProfile` carries those numbers from one batch to
the next: :meth:`AdmitLaw.profile` produces one at the end of a batch, ``AdmitLaw(warm=...)``
starts the next one from it, and :meth:`BatchProfile.save` / :meth:`BatchProfile.load` keep it
in a small JSON file in between. Laws stay free of I/O: the caller saves and loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

from concur_langgraph.checks import check_count, check_number
from concur_langgraph.errors import ConfigError

__all__ = ["BatchProfile"]

FORMAT: Final = "concur-langgraph/batch-profile/1"
"""The ``format`` key of a profile file; a file with another format is refused."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchProfile:
    """One batch's measurements, enough to choose the next batch's start window."""

    context_per_call: float
    """Mean context of one LLM call over the batch, tokens: ``(prompt + generated tokens) /
    requests`` from vLLM's counters (whole prompts, cached or not). It depends on the agent
    and its tasks, not on the policy that ran them."""
    prefill_rate: float
    """Prefill tokens per second the server sustained (``AdmitLaw.prefill_rate``)."""
    kv_capacity_tokens: int
    """KV-cache capacity of the server it was measured on, tokens."""
    agents: int
    """Agents in the batch (the most admitted plus queued at any tick)."""

    def __post_init__(self) -> None:
        check_number("context_per_call", self.context_per_call, low=0, low_open=True)
        check_number("prefill_rate", self.prefill_rate, low=0, low_open=True)
        check_count("kv_capacity_tokens", self.kv_capacity_tokens, minimum=1)
        check_count("agents", self.agents, minimum=1)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object :meth:`save` writes."""
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: object, *, source: str = "profile") -> BatchProfile:
        """Validate ``data`` (as :meth:`to_dict` makes it); errors name ``source`` and the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ConfigError(
                f"{source}: format: expected {FORMAT!r}, got {data.get('format')!r} "
                "(not a batch profile, or one from another version)"
            )
        names = tuple(f.name for f in fields(cls))
        missing = [n for n in names if n not in data]
        if missing:
            raise ConfigError(f"{source}: missing {', '.join(missing)}")
        unknown = sorted(set(data) - {"format", *names})
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**{n: data[n] for n in names})
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON, atomically (a crash leaves the old file or the new one)."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BatchProfile | None:
        """The profile saved at ``path``; ``None`` if there is no file yet (a first batch).
        A file that is not a valid profile raises :class:`ConfigError` naming it."""
        target = Path(path)
        try:
            text = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{target}: not JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data, source=str(target))
