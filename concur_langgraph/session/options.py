"""The options of a gated batch, checked once where they enter (every way in takes them).

:class:`SessionOptions` holds every option a session takes, each validated at construction
with the shared rules of :mod:`concur_langgraph.checks` (an error names its field) and stored
in its normal form (``vllm_url`` as a tuple of base URLs), so a bad URL, port or number fails
when the gate is built, not at the first batch.

``metrics_url`` is ``vllm_url`` under an engine-neutral name (the server may be vLLM or
SGLang, told apart by what its ``/metrics`` exports): give one or the other; either way the
normal form is stored in both ``vllm_url`` and :attr:`SessionOptions.urls`, and error messages
name the one given.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypedDict

from concur_langgraph.checks import base_urls, check_count, check_number, check_port
from concur_langgraph.core.law import ControlLaw, as_control_law
from concur_langgraph.core.signals import SignalSource
from concur_langgraph.core.window import OPEN, AdmissionWindow
from concur_langgraph.distributed.keys import check_batch_id
from concur_langgraph.errors import ConfigError
from concur_langgraph.laws.fixed import FixedLaw
from concur_langgraph.laws.registry import DEFAULT_LAW

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_INITIAL_WINDOW",
    "OtherSessionKwargs",
    "SessionKwargs",
    "SessionOptions",
]


class OtherSessionKwargs(TypedDict, total=False):
    """The session options besides ``vllm_url`` and ``law`` (see :class:`SessionOptions`)."""

    metrics_url: str | Sequence[str] | None
    interval_s: float
    min_window: int
    max_window: int | None
    initial_window: int | None
    max_rps: float | None
    admission_timeout_s: float | None
    http_client: httpx.AsyncClient | None
    window: AdmissionWindow | None
    source: SignalSource | None
    progress: bool | None
    redis_url: str | None
    batch_id: str | None
    metrics_port: int | None
    router: bool
    priority_hint: bool


class SessionKwargs(OtherSessionKwargs, total=False):
    """The keyword options every way in accepts (see :class:`SessionOptions`)."""

    vllm_url: str | Sequence[str] | None
    law: ControlLaw | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptions:
    """Options of a gated batch, validated; every error names its field."""

    vllm_url: str | Sequence[str] | None = None
    """Base URL(s) of the serving engine(s) whose ``/metrics`` drive the window
    (``http://host:port`` or ``.../v1``; several for data-parallel replicas): vLLM or SGLang,
    recognised from what the page exports (docs/usage.md, "Engines"). Required by every law
    except ``FixedLaw`` (or ``metrics_url``, or ``source``)."""
    metrics_url: str | Sequence[str] | None = None
    """``vllm_url`` under its engine-neutral name; give one of the two. Stored normalised,
    and copied into ``vllm_url``."""
    law: ControlLaw | None = None
    """The control law; ``None`` is :data:`DEFAULT_LAW` (``FitLaw()``): it starts with every
    agent admitted and, from the gate's exact account of each agent's context, admits the
    agents whose contexts fit the KV cache, where restricting pays (docs/laws.md has the
    benchmarks that chose it). On a shared window the leader's law reads every worker's
    accounts (docs/distributed.md). ``ConcurLaw()`` is the paper's Eq. 1 with its constants."""
    interval_s: float = 1.0
    """Seconds between two controller ticks. 1 s is the paper's setting: KV usage moves on the
    scale of a few decode steps times the agent count, and vLLM's counters update every step."""
    min_window: int = 1
    """Smallest window the controller may set. At least 1, so a batch can never deadlock."""
    max_window: int | None = None
    """Largest window the controller may set; ``None`` is no cap (the law's own dynamics and
    the agent count bound it)."""
    initial_window: int | None = None
    """Window at the start of the batch, before the first sample; ``None`` is the law's choice:
    open (``max_window``, or every agent) for a law that starts open (``AdmitLaw``), else 4.
    Small for the other laws, because admitting
    is cheap to undo (the law grows by ``alpha`` per tick while the cache is under-used) while
    an over-admitted start thrashes the cache before the first sample arrives. With a shared
    window it only seeds a batch that does not exist yet: a joining worker keeps the stored
    window."""
    max_rps: float | None = None
    """Optional cap on LLM calls per second, for servers behind a rate-limited gateway."""
    admission_timeout_s: float | None = None
    """Optional bound on one wait for a slot (``AdmissionTimeoutError`` past it); ``None``
    waits: the window never drops below 1, so every waiter is eventually served."""
    http_client: httpx.AsyncClient | None = None
    """The ``httpx.AsyncClient`` used to scrape ``/metrics`` (the simulator's ASGI client in
    tests and demos); ``None``: the signal source makes and closes its own."""
    window: AdmissionWindow | None = None
    """A window backend instance (e.g. a Redis window shared by several processes);
    ``None``: an in-process :class:`LocalWindow` (or a :class:`RedisWindow` from ``redis_url``).
    The caller keeps owning it (the session does not close it)."""
    source: SignalSource | None = None
    """A signal source instance, instead of ``vllm_url``: e.g. ``InProcessMetricsSource()`` for
    an engine that runs in this process (no HTTP endpoint), or a ``MetricsSource`` with options
    of your own. The session starts it and closes it with the controller."""
    progress: bool | None = None
    """Live progress display for ``abatch``: ``None`` shows it when stdout is a terminal,
    ``True`` always, ``False`` never."""
    redis_url: str | None = None
    """``redis://host:port/db`` (or ``rediss://``, ``unix://``) of the Redis that holds the
    window shared by every worker process of the batch; ``None``: the window is in-process.
    Needs ``batch_id``. With signals, one worker at a time (the elected leader) polls
    ``/metrics`` and resizes the shared window; see ``docs/distributed.md``."""
    batch_id: str | None = None
    """The batch's name in Redis: every worker with the same ``redis_url`` and ``batch_id``
    shares one window (and one leader). Required with ``redis_url``; several batches can share
    one Redis under different ids."""
    metrics_port: int | None = None
    """Serve the session's statistics in the Prometheus text format at
    ``http://127.0.0.1:PORT/metrics`` while the session is entered (``docs/observability.md``);
    ``0`` picks a free port (``ConcurSession.metrics_url`` says which). ``None``: no export.
    Loopback only: the numbers are for a scraper or ``concur watch`` on the same host. Off by
    default because a port is a resource two batches on one host would fight over."""

    router: bool = False
    """Whether a router (llm-d, Dynamo, vllm-router, a load balancer) places the calls on the
    replicas. ``False`` (the default): with several URLs the gate places each agent on one
    replica, keeps one window per replica driven by that replica's own signals, and routes the
    calls itself (build the model with ``http_async_client=routed_http_client()``;
    docs/distributed.md, "Replicas"). ``True``: the client cannot choose, so the several URLs
    are read as one server (the fullest replica's KV usage, the counters summed) under one
    window. With one URL it changes nothing."""

    priority_hint: bool = False
    """Send each agent's admission rank as its requests' ``priority`` (vLLM's request field:
    lower is scheduled first and preempted last by a server started with
    ``--scheduling-policy priority``), through :func:`routed_http_client`: the engine then
    preempts the agents the window would park first, at once, instead of at their next step.
    Off by default: a server on the default fcfs policy ignores the field (vLLM 0.32 accepts it
    and does nothing), and a server that mixes this batch with other traffic would rank it
    against that traffic (docs/laws.md has what it measured)."""

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> SessionOptions:
        """The options given as keywords; an unknown name is a :class:`ConfigError` naming it
        and the options there are (the dataclass alone would raise a bare ``TypeError``)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{name}: not an option{hint}; the options are {', '.join(sorted(known))}"
            )
        return cls(**options)

    def __post_init__(self) -> None:
        # Each value is checked once, here, and stored in its normal form: a bad URL, port or
        # number fails at construction, naming its field, not at the first batch.
        if self.metrics_url is not None:
            if self.vllm_url is not None:
                raise ConfigError(
                    "metrics_url: give either vllm_url or metrics_url (the same option under "
                    "its engine-neutral name), not both"
                )
            urls = base_urls("metrics_url", self.metrics_url)
            object.__setattr__(self, "metrics_url", urls)
            object.__setattr__(self, "vllm_url", urls)
        elif self.vllm_url is not None:
            object.__setattr__(self, "vllm_url", base_urls("vllm_url", self.vllm_url))
        if self.law is not None and not callable(getattr(self.law, "next_window", None)):
            raise ConfigError(f"law: expected a ControlLaw (has next_window), got {self.law!r}")
        url = self.vllm_url
        if url is not None and self.source is not None:
            raise ConfigError(f"source: give either {self.url_field} or source, not both")
        if self.http_client is not None and url is None:
            raise ConfigError(
                "http_client: only used to scrape vllm_url (or metrics_url), which is not set"
            )
        if not isinstance(self.law, FixedLaw) and url is None and self.source is None:
            name = (
                f"{type(DEFAULT_LAW()).__name__}()" if self.law is None else type(self.law).__name__
            )
            raise ConfigError(
                f"vllm_url: the law {name} sizes the window from the server's KV-cache "
                "signals, so vllm_url (or metrics_url, or source) is required; for a static "
                "window without a server use law=FixedLaw(k)"
            )
        check_number("interval_s", self.interval_s, low=0, low_open=True)
        check_count("min_window", self.min_window, minimum=1)
        check_count(
            "max_window",
            self.max_window,
            minimum=self.min_window,
            minimum_name="min_window",
            optional=True,
        )
        check_count("initial_window", self.initial_window, minimum=1, optional=True)
        check_number("max_rps", self.max_rps, low=0, low_open=True, optional=True)
        check_number(
            "admission_timeout_s", self.admission_timeout_s, low=0, low_open=True, optional=True
        )
        if self.window is not None and not callable(getattr(self.window, "acquire", None)):
            raise ConfigError(f"window: expected an AdmissionWindow, got {self.window!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigError(f"progress: must be True, False or None, got {self.progress!r}")
        if self.redis_url is not None and not (
            isinstance(self.redis_url, str)
            and self.redis_url.startswith(("redis://", "rediss://", "unix://"))
        ):
            raise ConfigError(
                f"redis_url: must start with redis://, rediss:// or unix://, got {self.redis_url!r}"
            )
        if (self.redis_url is None) != (self.batch_id is None):
            raise ConfigError(
                "batch_id: redis_url and batch_id go together (the workers that share a window "
                f"share both); got redis_url={self.redis_url!r}, batch_id={self.batch_id!r}"
            )
        if self.batch_id is not None:
            check_batch_id(self.batch_id)  # its messages name batch_id
        if self.redis_url is not None and self.window is not None:
            raise ConfigError(
                "window: give either a window instance or redis_url (which makes the shared "
                "window), not both"
            )
        if self.metrics_port is not None:
            check_port("metrics_port", self.metrics_port)
        if not isinstance(self.router, bool):
            raise ConfigError(f"router: must be True or False, got {self.router!r}")
        if not isinstance(self.priority_hint, bool):
            raise ConfigError(f"priority_hint: must be True or False, got {self.priority_hint!r}")
        if self.replicated:
            field = self.url_field
            if self.window is not None:
                raise ConfigError(
                    f"window: one window instance cannot serve the {len(self.urls)} replicas of "
                    f"{field} (each replica gets its own window); pass router=True to run them "
                    "as one server under this window"
                )

    @property
    def url_field(self) -> str:
        """The option the URLs were given as (``vllm_url`` or ``metrics_url``), for messages."""
        return "metrics_url" if self.metrics_url is not None else "vllm_url"

    @property
    def replicated(self) -> bool:
        """Whether the batch runs one window per replica (several URLs and no router)."""
        return len(self.urls) > 1 and not self.router

    @property
    def urls(self) -> tuple[str, ...]:
        """``vllm_url`` in its normal form: a tuple of base URLs (empty without one)."""
        url = self.vllm_url
        return () if url is None else tuple(url)

    def control_law(self) -> ControlLaw:
        """The law with every hook (:func:`as_control_law`): the one given, or the default
        law. The default is made fresh per call: laws keep history, one law per batch."""
        return as_control_law(self.law) if self.law is not None else DEFAULT_LAW()

    @property
    def start_window(self) -> int:
        """The window before the first controller tick: ``k`` for a FixedLaw, else
        ``initial_window``, else the law's own ``start_window`` if it has one (``AdmitLaw``
        with a ``warm`` profile), else open for a law that starts open, else 4; clamped to
        ``[min_window, max_window]``."""
        law = self.control_law()
        if isinstance(law, FixedLaw):
            start = law.k
        elif self.initial_window is not None:
            start = self.initial_window
        elif law.start_window is not None and law.start_window >= 1:
            # A law that knows better than "open" (AdmitLaw with a warm profile).
            start = law.start_window
        elif law.starts_open:
            start = self.max_window if self.max_window is not None else OPEN
        else:
            start = DEFAULT_INITIAL_WINDOW
        start = max(start, self.min_window)
        if self.max_window is not None:
            start = min(start, self.max_window)
        return start


DEFAULT_INITIAL_WINDOW = 4
"""Start window of a law that does not start open: the value both known re-implementations of
the paper chose (the paper states none)."""
