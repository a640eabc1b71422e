"""Admission policies a benchmark can run, by name.

* ``none``: plain ``graph.abatch``, every agent at once, no gate (what users do today);
* ``static:K``: the gate with ``FixedLaw(K)`` (a hand-set ``max_concurrency`` at agent level);
* ``static-sweep``: ``static:K`` for several K (see :data:`DEFAULT_SWEEP`); the best is the
  hand-tuned oracle a user could only find by running the batch several times;
* ``auto``: the gate with its default law and defaults (``ConcurGate(graph, vllm_url=...)``
  with no ``law``): what a user gets, whatever the default becomes;
* every name in :data:`LAWS`: the gate with that adaptive law, driven by the server's
  ``/metrics`` (``concur``: the paper's Eq. 1 with its constants, ``W0 = 4``; ``admit``: our
  default law; the registry of ``concur_langgraph/laws/registry.py``);
* a name of :data:`LAWS` with constants: ``fit:reopen=1`` (the law's dataclass fields
  overridden; a variant to measure against the default);
* every name in :data:`PEERS`: a peer system's admission idea re-implemented as a law (run
  like the laws above). The real-server benchmark (``benchmarks/bench_real.py``) runs every
  peer by default, so a peer added here joins its comparison with no other change.

Any gated policy takes the suffix ``+priority`` (``auto+priority``, ``static:12+priority``):
the gate's ``priority_hint`` on, the model's calls through ``routed_http_client`` (which sends
each agent's admission rank as the request's ``priority``), and, on the simulator, the engine
on vLLM's ``--scheduling-policy priority``; a real server must have been started with it.

A law joins the benchmarks by an entry in the package's registry; a peer, in :data:`PEERS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from concur_langgraph.bench._peers import ThunderAgentLaw
from concur_langgraph.core.law import ControlLaw
from concur_langgraph.errors import ConfigError
from concur_langgraph.laws import registry
from concur_langgraph.laws.fixed import FixedLaw

__all__ = [
    "AUTO",
    "DEFAULT_SWEEP",
    "LAWS",
    "PEERS",
    "Policy",
    "parse_policy",
]


LAWS: Final[Mapping[str, Callable[[], ControlLaw]]] = MappingProxyType(dict(registry.LAWS))
"""Adaptive law name -> factory (a fresh law object per run: laws may keep history): the
package's registry (``concur run --law`` reads the same one). The law lab's candidates are
added by ``benchmarks/law_lab.py`` for its runs."""

PEERS: Final[Mapping[str, Callable[[], ControlLaw]]] = MappingProxyType(
    {"thunderagent": ThunderAgentLaw}
)
"""Peer policy name -> factory: other systems' admission ideas (../shared/notes/peers.md) as
laws, benchmarked against ours. Names must not clash with :data:`LAWS`."""

AUTO: Final = "auto"
"""The policy name of the gate's default law (``ConcurGate`` with ``law=None``)."""

DEFAULT_SWEEP: Final = (2, 4, 8, 16, 32, 64, 128)
"""Windows tried by ``static-sweep`` (those below the agent count, plus the agent count)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """One admission policy of a benchmark run."""

    name: str
    """As given (``none``, ``static:8``, ``concur``, ...); the record's ``policy``."""
    law: str | None
    """Key of :data:`LAWS`, or :data:`AUTO`, for adaptive policies; ``None`` otherwise."""
    fixed: int | None
    """K for ``static:K``; ``None`` otherwise."""
    factory: Callable[[], ControlLaw] | None = None
    """Makes the law instead of ``LAWS[law]`` (a caller that keeps the law, e.g. to read its
    profile after the run)."""
    priority_hint: bool = False
    """``+priority``: the gate sends each agent's admission rank as the request priority, to
    an engine on priority scheduling."""

    @property
    def gated(self) -> bool:
        """Whether the run goes through ``ConcurGate``."""
        return self.law is not None or self.fixed is not None

    @property
    def auto(self) -> bool:
        """Whether this is the gate's default law (``law=None`` and default options)."""
        return self.law == AUTO

    def make_law(self) -> ControlLaw | None:
        """A fresh law for one run; ``None`` for ``none`` and for ``auto`` (the default)."""
        if self.fixed is not None:
            return FixedLaw(self.fixed)
        if self.factory is not None:
            return self.factory()
        if self.law is not None and self.law != AUTO:
            return (LAWS.get(self.law) or PEERS[self.law])()
        return None


PRIORITY_SUFFIX: Final = "+priority"


def parse_policy(text: str) -> Policy:
    """A policy by name; ``static-sweep`` is expanded by the runner, not here."""
    if text.endswith(PRIORITY_SUFFIX):
        base = parse_policy(text.removesuffix(PRIORITY_SUFFIX))
        if not base.gated:
            raise ConfigError(
                f"policy: {text!r}: +priority is the gate's hint, and {base.name!r} has no gate"
            )
        return Policy(
            name=base.name + PRIORITY_SUFFIX,
            law=base.law,
            fixed=base.fixed,
            factory=base.factory,
            priority_hint=True,
        )
    if text == "none":
        return Policy(name=text, law=None, fixed=None)
    if text.startswith("static:"):
        raw = text.removeprefix("static:")
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"policy: static:K needs an integer K >= 1, got {text!r}")
        return Policy(name=f"static:{int(raw)}", law=None, fixed=int(raw))
    if text in LAWS or text in PEERS or text == AUTO:
        return Policy(name=text, law=text, fixed=None)
    name, _, constants = text.partition(":")
    if constants and name in LAWS:
        # A registry law with constants overridden (``fit:reopen=1``): what a variant measures.
        overrides = _constants(text, constants)
        make = LAWS[name]
        if not dataclasses.is_dataclass(make()):
            raise ConfigError(f"policy: {text!r}: law {name!r} takes no constants")

        def factory() -> ControlLaw:
            return dataclasses.replace(make(), **overrides)  # type: ignore[type-var]

        try:
            factory()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"policy: {text!r}: {exc}") from exc
        return Policy(name=text, law=name, fixed=None, factory=factory)
    known = ", ".join(["none", "static:K", "static-sweep", AUTO, *sorted(LAWS), *sorted(PEERS)])
    raise ConfigError(f"policy: unknown policy {text!r}; known: {known}")


def _constants(text: str, spec: str) -> dict[str, float | bool]:
    out: dict[str, float | bool] = {}
    for part in spec.split(","):
        key, eq, raw = part.partition("=")
        if not eq or not key.isidentifier():
            raise ConfigError(f"policy: {text!r}: constants are key=value, got {part!r}")
        if raw in ("true", "false"):
            out[key] = raw == "true"
            continue
        try:
            out[key] = float(raw)
        except ValueError as exc:
            raise ConfigError(f"policy: {text!r}: {key}={raw!r} is not a number") from exc
    return out


def sweep_windows(agents: int, windows: tuple[int, ...] = DEFAULT_SWEEP) -> list[int]:
    """The windows ``static-sweep`` tries for a batch of ``agents``: below it, and it."""
    picked = sorted({k for k in windows if k < agents})
    return [*picked, agents]
