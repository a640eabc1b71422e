"""Benchmark workloads: a batch of ReAct agents described by a few distributions.

A workload is a JSON object (schema in docs/benchmarks.md)::

    {
      "name": "light-8",
      "description": "optional free text",
      "agents": 8,
      "seed": 1,
      "system_prompt_tokens": 256,
      "task_prompt_tokens": {"uniform": [50, 150]},
      "steps": {"const": 4},
      "output_tokens": {"const": 64},
      "observation_tokens": {"lognormal": {"median": 200, "sigma": 0.5, "max": 800}},
      "tool_latency_s": {"uniform": [0.5, 2.0]}
    }

``task_prompt_tokens`` and ``steps`` are drawn once per agent; ``output_tokens``,
``observation_tokens`` and ``tool_latency_s`` once per step of each agent. A distribution is
``{"const": v}``, ``{"uniform": [lo, hi]}`` (integers: both ends included) or
``{"lognormal": {"median": m, "sigma": s, "max": x}}`` (``m * exp(s * N(0, 1))`` capped at
``x``; integers are rounded).

Draws are deterministic: agent ``i`` draws from its own ``random.Random`` seeded with the
string ``"<seed>:<i>"`` (string seeds hash with SHA-512, stable across processes and Python
versions), so an agent's plan depends only on the seed and its index, not on the agent count
or on the order in which plans are asked for.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from concur_langgraph.checks import check_count, is_count, is_number
from concur_langgraph.errors import ConfigError

__all__ = [
    "AgentPlan",
    "Distribution",
    "Workload",
    "load_workload",
    "workload_dirs",
    "workload_presets",
]

_KINDS: Final = ("const", "uniform", "lognormal")
_TOP_KEYS: Final = frozenset(
    {
        "name",
        "description",
        "agents",
        "seed",
        "system_prompt_tokens",
        "task_prompt_tokens",
        "steps",
        "output_tokens",
        "observation_tokens",
        "tool_latency_s",
    }
)
# field -> (integer valued, smallest allowed value)
_DIST_FIELDS: Final[Mapping[str, tuple[bool, float]]] = {
    "task_prompt_tokens": (True, 1),
    "steps": (True, 1),
    "output_tokens": (True, 1),
    "observation_tokens": (True, 1),
    "tool_latency_s": (False, 0.0),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Distribution:
    """One of ``const``, ``uniform`` or ``lognormal`` (see the module docstring)."""

    kind: Literal["const", "uniform", "lognormal"]
    """Which distribution."""
    a: float
    """``const``: the value; ``uniform``: the low end; ``lognormal``: the median."""
    b: float
    """``const``: the value again; ``uniform``: the high end; ``lognormal``: sigma."""
    cap: float
    """The largest value a draw can take (``const`` and ``uniform``: the same as the top)."""
    integer: bool
    """Whether draws are integers (token counts) or real numbers (seconds)."""

    @classmethod
    def parse(cls, raw: object, *, where: str, integer: bool, minimum: float) -> Distribution:
        """Validate ``raw`` (the JSON value); errors name ``where`` (file and field)."""
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ConfigError(
                f"{where}: expected an object with one key out of {', '.join(_KINDS)}, "
                f'e.g. {{"const": 100}}; got {raw!r}'
            )
        ((kind, value),) = raw.items()
        kind_name = "integer" if integer else "number"

        def check(v: object, what: str) -> float:
            if not isinstance(v, int | float) or not is_number(v):
                raise ConfigError(f"{where}.{kind}: {what} must be a finite {kind_name}, got {v!r}")
            if integer and what != "sigma" and not float(v).is_integer():
                raise ConfigError(f"{where}.{kind}: {what} must be an integer, got {v!r}")
            return float(v)

        if kind == "const":
            v = check(value, "the value")
            if v < minimum:
                raise ConfigError(f"{where}.const: must be >= {minimum:g}, got {value!r}")
            return cls(kind="const", a=v, b=v, cap=v, integer=integer)
        if kind == "uniform":
            if not isinstance(value, list) or len(value) != 2:
                raise ConfigError(f"{where}.uniform: expected [low, high], got {value!r}")
            lo, hi = check(value[0], "low"), check(value[1], "high")
            if lo < minimum:
                raise ConfigError(f"{where}.uniform: low must be >= {minimum:g}, got {value[0]!r}")
            if hi < lo:
                raise ConfigError(
                    f"{where}.uniform: high ({value[1]!r}) must be >= low ({value[0]!r})"
                )
            return cls(kind="uniform", a=lo, b=hi, cap=hi, integer=integer)
        if kind == "lognormal":
            if not isinstance(value, dict) or set(value) != {"median", "sigma", "max"}:
                raise ConfigError(
                    f'{where}.lognormal: expected {{"median": m, "sigma": s, "max": x}}, '
                    f"got {value!r}"
                )
            median = check(value["median"], "median")
            sigma = check(value["sigma"], "sigma")
            cap = check(value["max"], "max")
            if median <= 0 or median < minimum:
                raise ConfigError(
                    f"{where}.lognormal.median: must be > 0 and >= {minimum:g}, "
                    f"got {value['median']!r}"
                )
            if sigma < 0:
                raise ConfigError(f"{where}.lognormal.sigma: must be >= 0, got {value['sigma']!r}")
            if cap < median:
                raise ConfigError(
                    f"{where}.lognormal.max: must be >= median ({value['median']!r}), "
                    f"got {value['max']!r}"
                )
            return cls(kind="lognormal", a=median, b=sigma, cap=cap, integer=integer)
        raise ConfigError(
            f"{where}: unknown distribution {kind!r}; expected one of {', '.join(_KINDS)}"
        )

    def draw(self, rng: random.Random) -> float:
        """One draw (an integral float when ``integer``)."""
        if self.kind == "const":
            return self.a
        if self.kind == "uniform":
            if self.integer:
                return float(rng.randint(int(self.a), int(self.b)))
            return rng.uniform(self.a, self.b)
        value = min(self.cap, self.a * math.exp(self.b * rng.gauss(0.0, 1.0)))
        return float(max(1, round(value))) if self.integer else value

    def to_json(self) -> dict[str, Any]:
        """The JSON form this distribution was parsed from."""

        def num(v: float) -> float | int:
            return int(v) if self.integer else v

        if self.kind == "const":
            return {"const": num(self.a)}
        if self.kind == "uniform":
            return {"uniform": [num(self.a), num(self.b)]}
        return {"lognormal": {"median": num(self.a), "sigma": self.b, "max": num(self.cap)}}


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentPlan:
    """What one agent of a workload does, drawn from the workload's distributions."""

    index: int
    """The agent's position in the batch (0-based)."""
    task_prompt_tokens: int
    """Words of the agent's own task message (after the shared system prompt)."""
    output_tokens: tuple[int, ...]
    """Tokens generated at each step; its length is the number of LLM calls (steps)."""
    observation_tokens: tuple[int, ...]
    """Words of the tool observation after each step but the last (``steps - 1`` entries)."""
    tool_latency_s: tuple[float, ...]
    """Seconds each tool call takes (``steps - 1`` entries)."""

    @property
    def steps(self) -> int:
        """Number of LLM calls."""
        return len(self.output_tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A batch of agents: how many, and the distributions their plans are drawn from."""

    name: str
    """Short name (used in records, tables and plot titles)."""
    agents: int
    """Number of agents in the batch (>= 1)."""
    seed: int
    """Seed of every draw (see the module docstring)."""
    system_prompt_tokens: int
    """Words of the system prompt shared by every agent (a shared cached prefix)."""
    task_prompt_tokens: Distribution
    """Per agent: words of its task message."""
    steps: Distribution
    """Per agent: number of LLM calls (tool calls happen between them: ``steps - 1``)."""
    output_tokens: Distribution
    """Per step: tokens generated."""
    observation_tokens: Distribution
    """Per tool call: words of the observation appended to the history."""
    tool_latency_s: Distribution
    """Per tool call: seconds the tool takes."""
    description: str = ""
    """Free text: what the workload stands for."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"name: must be a non-empty string, got {self.name!r}")
        for field_name in ("agents", "system_prompt_tokens"):
            check_count(field_name, getattr(self, field_name), minimum=1)
        if not is_count(self.seed):
            raise ConfigError(f"seed: must be an integer, got {self.seed!r}")
        for field_name in _DIST_FIELDS:
            if not isinstance(getattr(self, field_name), Distribution):
                raise ConfigError(f"{field_name}: must be a Distribution")

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: object, *, source: str = "<workload>") -> Workload:
        """Validate a parsed JSON object; every error names ``source`` and the field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a workload must be a JSON object, got {raw!r}")
        unknown = sorted(set(raw) - _TOP_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(unknown)}; known fields: "
                f"{', '.join(sorted(_TOP_KEYS))}"
            )
        missing = sorted(_TOP_KEYS - {"description"} - set(raw))
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        dists = {
            name: Distribution.parse(
                raw[name], where=f"{source}: {name}", integer=integer, minimum=minimum
            )
            for name, (integer, minimum) in _DIST_FIELDS.items()
        }
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise ConfigError(f"{source}: description: must be a string, got {description!r}")
        try:
            return cls(
                name=raw["name"],
                agents=raw["agents"],
                seed=raw["seed"],
                system_prompt_tokens=raw["system_prompt_tokens"],
                description=description,
                **dists,
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "agents": self.agents,
            "seed": self.seed,
            "system_prompt_tokens": self.system_prompt_tokens,
        }
        for name in _DIST_FIELDS:
            dist: Distribution = getattr(self, name)
            out[name] = dist.to_json()
        return out

    # -- draws ------------------------------------------------------------------------------

    def plan(self, index: int) -> AgentPlan:
        """Agent ``index``'s plan (deterministic: depends on ``seed`` and ``index`` only)."""
        if not 0 <= index < self.agents:
            raise ConfigError(f"index: must be in [0, {self.agents}), got {index!r}")
        rng = random.Random(f"{self.seed}:{index}")
        task = int(self.task_prompt_tokens.draw(rng))
        steps = int(self.steps.draw(rng))
        outputs = tuple(int(self.output_tokens.draw(rng)) for _ in range(steps))
        observations = tuple(int(self.observation_tokens.draw(rng)) for _ in range(steps - 1))
        latencies = tuple(self.tool_latency_s.draw(rng) for _ in range(steps - 1))
        return AgentPlan(
            index=index,
            task_prompt_tokens=task,
            output_tokens=outputs,
            observation_tokens=observations,
            tool_latency_s=latencies,
        )

    def plans(self) -> list[AgentPlan]:
        """Every agent's plan, in index order."""
        return [self.plan(i) for i in range(self.agents)]

    def max_context_tokens(self, per_message_overhead: int = 8) -> int:
        """An upper bound on any agent's final context (prompt + output), from the caps.

        ``per_message_overhead`` covers chat-template tokens and the tool-call JSON of each
        step (see the agents module); used to check a workload against ``max_model_len``.
        """
        steps = int(self.steps.cap)
        return int(
            self.system_prompt_tokens
            + self.task_prompt_tokens.cap
            + steps * self.output_tokens.cap
            + (steps - 1) * self.observation_tokens.cap
            + (2 * steps + 2) * per_message_overhead
        )

    def check_fits(self, max_model_len: int, *, server: str, per_message_overhead: int = 8) -> None:
        """Refuse (:class:`ConfigError`) a workload an agent of which may outgrow the server.

        The largest context is :meth:`max_context_tokens` (every distribution at its maximum):
        past ``max_model_len`` the server answers 400 to an agent's call and the agent fails,
        so the run would measure nothing. ``server`` says where ``max_model_len`` comes from
        (``sim preset cpu-tiny``, a URL), for the message.
        """
        need = self.max_context_tokens(per_message_overhead)
        if need <= max_model_len:
            return
        steps = int(self.steps.cap)
        parts = (
            f"system {self.system_prompt_tokens:,} + task {int(self.task_prompt_tokens.cap):,}"
            f" + {steps} steps x output {int(self.output_tokens.cap):,}"
            f" + {steps - 1} tool calls x observation {int(self.observation_tokens.cap):,}"
            f" + {2 * steps + 2} messages x {per_message_overhead} template tokens"
        )
        raise ConfigError(
            f"workload {self.name}: an agent's context can reach {need:,} tokens ({parts}, "
            f"the maxima of the workload's distributions) but the server's max_model_len is "
            f"{max_model_len} ({server}); every agent that outgrows it fails with a 400. Lower "
            "steps, output_tokens or observation_tokens, or use a server with a longer "
            "max_model_len"
        )


# -- files and presets ----------------------------------------------------------------------


def workload_dirs() -> list[Path]:
    """Where preset names are looked up: ``benchmarks/workloads`` of the source tree."""
    # The presets are data of the benchmark suite, not of the library; with an editable
    # install (the repository's own `make` targets) they sit next to the package.
    root = Path(__file__).resolve().parents[2]
    return [root / "benchmarks" / "workloads"]


def workload_presets() -> dict[str, Path]:
    """Preset name -> file, for every ``*.json`` in :func:`workload_dirs`."""
    found: dict[str, Path] = {}
    for folder in workload_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                found.setdefault(path.stem, path)
    return found


def load_workload(name_or_path: str | Path) -> Workload:
    """A workload from a JSON file, or a preset by name (``paper-256``, ``light-8``, ...)."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".json") or path.is_file()):
        presets = workload_presets()
        if text not in presets:
            known = ", ".join(sorted(presets)) or "(none found)"
            raise ConfigError(
                f"workload: {text!r} is neither a JSON file nor a preset; presets: {known}"
            )
        path = presets[text]
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"workload: file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    return Workload.from_dict(raw, source=str(path))
