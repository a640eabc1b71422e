"""The runtime bundle of one batch: window, gate and (when there are signals) controller.

Every way in (``ConcurGate``, ``ConcurCallbackHandler``, ``ConcurMiddleware``, the gate node)
runs on a :class:`ConcurSession`. A session is built from :class:`SessionOptions`; it creates the
window (a :class:`LocalWindow` unless a backend is given), the :class:`Gate` on it, and, when a
vLLM URL or a :class:`SignalSource` is given, the :class:`Controller` that resizes the window
from the server's KV-cache signals. ``async with session:`` starts and stops the controller.

Which law needs what:

* ``law=None`` means ``AdmitLaw()`` (our default, docs/laws.md), which needs signals:
  ``vllm_url`` (or ``source``) is required; ``ConcurLaw()`` is the paper's law;
* ``FixedLaw(k)`` needs no URL: the window is ``k`` from the start and never moves. With a URL
  too, the controller still polls (for the statistics and the progress display) and keeps
  applying ``k``.

Distributed batches (``redis_url`` and ``batch_id``, or a :class:`RedisWindow` as ``window``):
every worker process runs its own session on one window stored in Redis. Entering joins the
stored window and never resets it (``initial_window`` only seeds a batch that does not exist
yet; with ``redis_url``, ``FixedLaw(k)`` sets ``k``, which every worker agrees on; a window
passed in is only joined, its owner may be driving it). When the session has signals,
the workers elect one leader (:class:`Leadership`): only the leader runs a :class:`Controller`,
on the fenced window, starting each reign from the stored window; the others only read it. A
leader that dies is replaced within the leadership lease (``docs/distributed.md``).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypedDict

from ._adaptive import AdmitLaw
from ._controller import Controller, ControllerStatistics, _stop
from ._errors import ConcurError, ConfigError
from ._exporter import MetricsExporter, check_metrics_port
from ._gate import Gate, GateStatistics
from ._laws import ControlLaw, FixedLaw
from ._leader import Leadership
from ._redis_window import RedisWindow, check_batch_id
from ._signals import SignalSource, VLLMMetricsSource
from ._window import OPEN, AdmissionWindow, LocalWindow, window_text

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ConcurSession",
    "OtherSessionKwargs",
    "SessionKwargs",
    "SessionOptions",
    "SessionStatistics",
    "SessionUser",
]

logger = logging.getLogger("concur_langgraph")


class OtherSessionKwargs(TypedDict, total=False):
    """The session options besides ``vllm_url`` and ``law`` (see :class:`SessionOptions`)."""

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


class SessionKwargs(OtherSessionKwargs, total=False):
    """The keyword options every way in accepts (see :class:`SessionOptions`)."""

    vllm_url: str | Sequence[str] | None
    law: ControlLaw | None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptions:
    """Options of a gated batch, validated; every error names its field."""

    vllm_url: str | Sequence[str] | None = None
    """Base URL(s) of the vLLM server(s) whose ``/metrics`` drive the window
    (``http://host:port`` or ``.../v1``; several for data-parallel replicas). Required by every
    law except ``FixedLaw``."""
    law: ControlLaw | None = None
    """The control law; ``None`` is :data:`DEFAULT_LAW` (``AdmitLaw()``): it starts with every
    agent admitted and restricts only when a measured KV budget and a goodput trial say it pays,
    so it is never the reason a batch is slower (docs/laws.md has the benchmarks that chose it).
    ``ConcurLaw()`` is the paper's Eq. 1 with its constants."""
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
    """A signal source instance, instead of ``vllm_url``."""
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
        url = self.vllm_url
        if url is not None:
            urls = [url] if isinstance(url, str) else url
            if isinstance(urls, str | bytes) or not isinstance(urls, Sequence) or not urls:
                raise ConfigError(f"vllm_url: expected a URL or a list of URLs, got {url!r}")
            for one in urls:
                if not isinstance(one, str) or not one.startswith(("http://", "https://")):
                    raise ConfigError(
                        f"vllm_url: {one!r} is not an http(s) URL such as 'http://localhost:8000'"
                    )
        if self.law is not None and not callable(getattr(self.law, "next_window", None)):
            raise ConfigError(f"law: expected a ControlLaw (has next_window), got {self.law!r}")
        if url is not None and self.source is not None:
            raise ConfigError("source: give either vllm_url or source, not both")
        if self.http_client is not None and url is None:
            raise ConfigError("http_client: only used to scrape vllm_url, which is not set")
        if not isinstance(self.law, FixedLaw) and url is None and self.source is None:
            name = f"{DEFAULT_LAW.__name__}()" if self.law is None else type(self.law).__name__
            raise ConfigError(
                f"vllm_url: the law {name} sizes the window from the server's KV-cache "
                "signals, so vllm_url (or source) is required; for a static window without "
                "a server use law=FixedLaw(k)"
            )
        if not (_is_number(self.interval_s) and self.interval_s > 0):
            raise ConfigError(f"interval_s: must be a number > 0, got {self.interval_s!r}")
        if not (_is_count(self.min_window) and self.min_window >= 1):
            raise ConfigError(f"min_window: must be an integer >= 1, got {self.min_window!r}")
        if self.max_window is not None and not (
            _is_count(self.max_window) and self.max_window >= self.min_window
        ):
            raise ConfigError(
                f"max_window: must be None or an integer >= min_window ({self.min_window}), "
                f"got {self.max_window!r}"
            )
        if self.initial_window is not None and not (
            _is_count(self.initial_window) and self.initial_window >= 1
        ):
            raise ConfigError(
                f"initial_window: must be an integer >= 1, got {self.initial_window!r}"
            )
        if self.max_rps is not None and not (_is_number(self.max_rps) and self.max_rps > 0):
            raise ConfigError(f"max_rps: must be None or a number > 0, got {self.max_rps!r}")
        if self.admission_timeout_s is not None and not (
            _is_number(self.admission_timeout_s) and self.admission_timeout_s > 0
        ):
            raise ConfigError(
                "admission_timeout_s: must be None or a number of seconds > 0, "
                f"got {self.admission_timeout_s!r}"
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
            check_metrics_port(self.metrics_port)  # its messages name metrics_port

    @property
    def start_window(self) -> int:
        """The window before the first controller tick: ``k`` for a FixedLaw, else
        ``initial_window``, else the law's own ``start_window`` if it has one (``AdmitLaw``
        with a ``warm`` profile), else open for a law that starts open, else 4; clamped to
        ``[min_window, max_window]``."""
        proposed = getattr(self.law, "start_window", None) if self.law is not None else None
        law_start = (
            proposed if isinstance(proposed, int) and not isinstance(proposed, bool) else None
        )
        if isinstance(self.law, FixedLaw):
            start = self.law.k
        elif self.initial_window is not None:
            start = self.initial_window
        elif law_start is not None and law_start >= 1:
            # A law that knows better than "open" (AdmitLaw with a warm profile).
            start = law_start
        elif getattr(self.law if self.law is not None else DEFAULT_LAW, "starts_open", False):
            start = self.max_window if self.max_window is not None else OPEN
        else:
            start = DEFAULT_INITIAL_WINDOW
        start = max(start, self.min_window)
        if self.max_window is not None:
            start = min(start, self.max_window)
        return start


DEFAULT_LAW = AdmitLaw
"""The law of a session that names none (a class: a fresh object per controller, since laws
keep history)."""

DEFAULT_INITIAL_WINDOW = 4
"""Start window of a law that does not start open: the value both known re-implementations of
the paper chose (the paper states none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStatistics:
    """A snapshot of one session."""

    gate: GateStatistics
    """The gate and its window: limit, holders, active, parked, waiting, completed. With a
    shared window, the shared limit and holders as this process last saw them."""
    controller: ControllerStatistics | None
    """The controller (last sample, staleness, ticks; its final state once the session is
    closed, or once this process stopped leading), or ``None`` when there are no signals, the
    session was never entered, or this process has not led a distributed batch."""
    leader: bool | None = None
    """Whether this process drives the shared window now (it runs the controller); ``None``
    when there is nothing to lead (an in-process window, or no signals)."""

    def __str__(self) -> str:
        """The snapshot for people, one aspect per line (``print(gate.statistics())``)."""
        gate, window = self.gate, self.gate.window
        lines = [
            f"window      {window_text(window.limit)} ({window.holders} holding a slot, "
            f"{window.waiting_parked} parked and {window.waiting_new} new agents waiting)",
            f"agents      {gate.active} active, {gate.parked} parked, {gate.waiting} waiting, "
            f"{gate.completed} done; {gate.llm_calls:,} LLM calls, {gate.parks_total:,} parks",
        ]
        controller = self.controller
        if controller is None:
            lines.append("controller  none (a fixed window without signals, or not the leader)")
            return "\n".join(lines)
        sample = controller.last_sample
        if sample is not None:
            hit = sample.prefix_hit_rate
            age = f", {controller.staleness_s:.0f} s stale" if controller.stale else ""
            lines.append(
                f"server      KV usage {sample.kv_usage:.2f}, prefix hit rate "
                f"{'-' if hit is None else f'{hit:.2f}'}, {sample.running} running, "
                f"{sample.waiting} waiting ({sample.waiting_capacity} for KV), "
                f"{sample.preemptions} preemptions in the last interval{age}"
            )
        decision = controller.last_decision
        if decision is not None:
            lines.append(f"decision    {decision}")
        lines.append(
            f"controller  {controller.ticks} ticks, {controller.changes} window changes, "
            f"{controller.errors} metrics errors"
            + ("" if self.leader is None else f"; {'leader' if self.leader else 'follower'}")
        )
        return "\n".join(lines)


class ConcurSession:
    """Window + gate + controller of one batch; ``async with`` runs the controller.

    Args:
        options: the validated options; or give them as keywords (``ConcurSession(law=...)``).

    A session without signals (``FixedLaw`` and no URL) and without Redis works without being
    entered; a session with signals or a ``redis_url`` must be entered, so that its background
    tasks (polling, leases) have an owner.
    """

    def __init__(self, options: SessionOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = SessionOptions.from_kwargs(kwargs)
        elif kwargs:
            raise ConfigError("options: give a SessionOptions or keywords, not both")
        self.options = options
        self.window: AdmissionWindow
        if options.window is not None:
            self.window = options.window
        elif options.redis_url is not None:
            assert options.batch_id is not None
            self.window = RedisWindow(
                options.redis_url, batch_id=options.batch_id, initial_limit=options.start_window
            )
        else:
            self.window = LocalWindow(options.start_window)
        self.gate = Gate(
            self.window,
            max_rps=options.max_rps,
            admission_timeout_s=options.admission_timeout_s,
        )
        self._controller: Controller | None = None
        self._last_controller: Controller | None = None
        self._final_controller_stats: ControllerStatistics | None = None
        self._leadership: Leadership | None = None
        self._lead_task: asyncio.Task[None] | None = None
        # A controller that died during an earlier reign: raised on exit, as in-process.
        self._reign_failure: BaseException | None = None
        self._exporter: MetricsExporter | None = None
        self._entered = False
        self._closed = False

    @property
    def metrics_url(self) -> str | None:
        """``http://127.0.0.1:PORT/metrics`` while the Prometheus export runs, else ``None``."""
        return self._exporter.url if self._exporter is not None else None

    @property
    def controller(self) -> Controller | None:
        """The running controller, or ``None`` (no signals, not entered, or not the leader)."""
        return self._controller

    @property
    def leadership(self) -> Leadership | None:
        """The leader campaign of a distributed session with signals, while entered."""
        return self._leadership

    @property
    def needs_controller(self) -> bool:
        """Whether this session sizes its window from signals (and so must be entered)."""
        return self.options.vllm_url is not None or self.options.source is not None

    @property
    def distributed(self) -> bool:
        """Whether the window is shared through Redis with other processes."""
        return isinstance(self.window, RedisWindow)

    @property
    def closed(self) -> bool:
        """Whether this session was entered and has ended (it cannot be entered again)."""
        return self._closed

    @property
    def entered(self) -> bool:
        """Whether ``async with`` is active on this session."""
        return self._entered

    def check_usable(self, who: str) -> None:
        """Raise a clear error when the session cannot gate yet (signals but not entered)."""
        if self._closed:
            raise ConcurError(f"{who}: this session is closed; create a new one per batch")
        if self.needs_controller and not self._entered:
            raise ConcurError(
                f"{who} sizes its window from vLLM signals and must be entered first: "
                f"`async with {who}(vllm_url=...) as gate: ...`"
            )
        if self.options.redis_url is not None and not self._entered:
            # The window's heartbeat and subscription need an owner that closes them.
            raise ConcurError(
                f"{who} shares its window through Redis and must be entered first: "
                f"`async with {who}(redis_url=..., batch_id=...) as gate: ...`"
            )
        if self.options.metrics_port is not None and not self._entered:
            # The exporter's server needs an owner that closes it.
            raise ConcurError(
                f"{who} serves its metrics (metrics_port) and must be entered first: "
                f"`async with {who}(metrics_port=...) as gate: ...`"
            )

    async def __aenter__(self) -> ConcurSession:
        if self._entered or self._closed:
            raise ConcurError("a session can be entered once; create a new one per batch")
        opts = self.options
        try:
            if opts.metrics_port is not None:
                # First: a port in use fails before the controller or Redis is touched.
                exporter = MetricsExporter(self.statistics, port=opts.metrics_port)
                await exporter.start()
                self._exporter = exporter
            if isinstance(self.window, RedisWindow):
                await self._enter_distributed(self.window)
            else:
                if opts.window is not None and opts.window.limit != opts.start_window:
                    await opts.window.set_limit(opts.start_window)
                if self.needs_controller:
                    controller = self._new_controller(self.window, opts.start_window)
                    await controller.__aenter__()
                    self._controller = controller
        except BaseException:
            await self._close_exporter()
            await self._close_owned_window()
            self._closed = True
            raise
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered = False
        self._closed = True
        lead_task, self._lead_task = self._lead_task, None
        leadership, self._leadership = self._leadership, None
        try:
            failure = self._reign_failure
            if lead_task is not None:
                failure = await _stop(lead_task) or failure
            try:
                await self._end_reign(exc_type, exc, tb)
            finally:
                if leadership is not None:
                    await leadership.__aexit__(None, None, None)
            if failure is not None and exc is None:
                raise failure
        finally:
            await self._close_exporter()
            await self._close_owned_window()

    def timeline(self) -> dict[str, list[float | int | None]]:
        """The batch over time, one row per controller tick (columns
        :data:`~concur_langgraph._controller.TIMELINE_KEYS`: the window and why it moved, KV
        usage, hit rate, agents admitted and queued); empty without a controller."""
        controller = self._controller or self._last_controller
        return controller.timeline() if controller is not None else {}

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """Write a PNG of :meth:`timeline` to ``path`` (needs the ``plot`` extra: matplotlib).

        Raises :class:`ConfigError` when there is nothing to draw: the batch had no controller
        (a ``FixedLaw`` without ``vllm_url``, or a worker that never led a shared window).
        """
        from ._plot import plot_timeline

        timeline = self.timeline()
        if not timeline.get("t"):
            raise ConfigError(
                "plot: this batch has no timeline: its window was not driven by server "
                "signals in this process (FixedLaw without vllm_url, or a worker that never "
                "led the shared window)"
            )
        return plot_timeline(timeline, path, title=title or "concur batch")

    def statistics(self) -> SessionStatistics:
        """A snapshot of the gate, its window and the controller."""
        controller = self._controller
        leadership = self._leadership
        return SessionStatistics(
            gate=self.gate.statistics(),
            controller=(
                controller.statistics() if controller is not None else self._final_controller_stats
            ),
            leader=(
                leadership is not None and leadership.is_leader and controller is not None
                if self.distributed and self.needs_controller
                else None
            ),
        )

    # -- plumbing ----------------------------------------------------------------------------

    def _new_controller(self, window: Any, initial_window: int) -> Controller:
        opts = self.options
        source = opts.source
        if source is None:
            assert opts.vllm_url is not None
            urls = [opts.vllm_url] if isinstance(opts.vllm_url, str) else list(opts.vllm_url)
            source = VLLMMetricsSource(urls, client=opts.http_client)
        return Controller(
            source=source,
            law=opts.law if opts.law is not None else DEFAULT_LAW(),
            window=window,
            interval_s=opts.interval_s,
            min_window=opts.min_window,
            max_window=opts.max_window,
            initial_window=initial_window,
        )

    async def _close_exporter(self) -> None:
        exporter, self._exporter = self._exporter, None
        if exporter is not None:
            await exporter.aclose()

    async def _close_owned_window(self) -> None:
        if self.options.window is None:
            await self.window.aclose()

    async def _enter_distributed(self, window: RedisWindow) -> None:
        opts = self.options
        # Join the stored window: a worker that starts late (or restarts) must not reset what
        # the leader has learned; RedisWindow seeds initial_limit only into a new batch.
        await window.refresh()
        if (
            opts.window is None
            and isinstance(opts.law, FixedLaw)
            and window.limit != opts.start_window
        ):
            # Every worker of a FixedLaw batch sets the same k: no writer can disagree. A
            # window passed in is left alone: its owner may be driving it (its own leader).
            await window.set_limit(opts.start_window)
        if not self.needs_controller:
            return
        # The window's client is reused: one connection pool per process, and leadership
        # calls fail exactly when window calls do.
        assert window._client is not None
        leadership = Leadership(client=window._client, batch_id=window.batch_id)
        await leadership.__aenter__()
        self._leadership = leadership
        try:
            if leadership.is_leader:
                # A wrong vllm_url fails here, at entry, as it does for an in-process window.
                await self._begin_reign(window, leadership)
        except BaseException:
            self._leadership = None
            await leadership.__aexit__(None, None, None)
            raise
        self._lead_task = asyncio.create_task(
            self._lead(window, leadership), name=f"concur-lead-{window.batch_id}"
        )

    async def _begin_reign(self, window: RedisWindow, leadership: Leadership) -> None:
        opts = self.options
        # Continue from the stored window, not from initial_window: the previous leader's
        # last decision is the best estimate there is.
        stored = (await window.refresh()).limit
        stored = max(stored, opts.min_window)
        if opts.max_window is not None:
            stored = min(stored, opts.max_window)
        controller = self._new_controller(leadership.fence(window), stored)
        await controller.__aenter__()
        self._controller = controller

    async def _end_reign(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            self._last_controller = controller
            self._final_controller_stats = controller.statistics()
            await controller.__aexit__(exc_type, exc, tb)

    async def _lead(self, window: RedisWindow, leadership: Leadership) -> None:
        """Run a controller during each reign of this process; follow in between."""
        try:
            await self._reigns(window, leadership)
        except Exception:
            logger.exception("concur: the leader loop of batch %r failed", window.batch_id)
            # Resign: a process that cannot lead must not keep the lease, or nobody would
            # drive the window for the rest of the batch. Raised again on exit.
            await leadership.__aexit__(None, None, None)
            raise

    async def _reigns(self, window: RedisWindow, leadership: Leadership) -> None:
        warned = False
        while True:
            if self._controller is None:
                await leadership.wait_leader()
                try:
                    await self._begin_reign(window, leadership)
                except ConcurError as exc:
                    # The new leader cannot read /metrics (yet): keep the lease, so no other
                    # worker starts a competing controller, hold the window, retry.
                    if not warned:
                        logger.warning(
                            "concur: the leader of batch %r cannot start its controller, "
                            "holding the window at %d: %s",
                            window.batch_id,
                            window.limit,
                            exc,
                        )
                        warned = True
                    await asyncio.sleep(self.options.interval_s)
                    continue
                warned = False
            await leadership.wait_lost()
            try:
                await self._end_reign()
            except Exception as exc:
                # Already logged by the controller; this process may lead again later.
                self._reign_failure = self._reign_failure or exc


class SessionUser:
    """A way in that owns a session of its own or shares one (handler, middleware).

    ``async with`` enters an owned session (a fresh one per batch: a session runs one batch);
    a shared session is its caller's to enter and close.
    """

    session: ConcurSession
    _owns_session: bool

    def _use_session(self, session: ConcurSession | None, options: dict[str, Any]) -> None:
        if session is not None and options:
            raise ConcurError("session: give a session or session options, not both")
        self._owns_session = session is None
        self.session = session if session is not None else ConcurSession(**options)

    async def __aenter__(self) -> Self:
        if self._owns_session:
            if self.session.closed:
                self.session = ConcurSession(self.session.options)
            await self.session.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owns_session:
            await self.session.__aexit__(exc_type, exc, tb)

    def statistics(self) -> SessionStatistics:
        """The session's statistics (window, agents, controller)."""
        return self.session.statistics()

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """A PNG of the session's batch over time (see :meth:`ConcurSession.plot`)."""
        return self.session.plot(path, title=title)
