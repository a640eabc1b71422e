"""The runtime bundle of one batch: window, gate and (when there are signals) controller.

Every way in (``ConcurGate``, ``ConcurCallbackHandler``, ``ConcurMiddleware``, the gate node)
runs on a :class:`ConcurSession`. A session is built from :class:`SessionOptions`; it creates the
window (a :class:`LocalWindow` unless a backend is given), the :class:`Gate` on it, and, when a
vLLM URL or a :class:`SignalSource` is given, the :class:`Controller` that resizes the window
from the server's KV-cache signals. ``async with session:`` starts and stops the controller.

Which law needs what:

* ``law=None`` means ``FitLaw()`` (our default, docs/laws.md), which needs signals:
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
import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from concur_langgraph.core.controller import Controller, WindowChange, stop_task
from concur_langgraph.core.gate import AgentAccount, Gate
from concur_langgraph.core.replicas import ReplicaGate
from concur_langgraph.core.signals import MetricsSource
from concur_langgraph.core.window import AdmissionWindow, LocalWindow
from concur_langgraph.distributed.keys import is_redis_window, replica_batch_id
from concur_langgraph.errors import ConcurError, ConfigError
from concur_langgraph.session.exporter import MetricsExporter
from concur_langgraph.session.options import SessionOptions
from concur_langgraph.session.statistics import ReplicaSnapshot, SessionStatistics
from concur_langgraph.session.steering import ControllerFactory, Steering

if TYPE_CHECKING:
    from concur_langgraph.distributed.leader import Leadership
    from concur_langgraph.distributed.placements import RedisPlacements

__all__ = ["ConcurSession", "SessionUser"]

logger = logging.getLogger("concur_langgraph")


class ConcurSession:
    """Window + gate + controller of one batch; ``async with`` runs the controller.

    Args:
        options: the validated options; or give them as keywords (``ConcurSession(law=...)``).

    A session without signals (``FixedLaw`` and no URL) and without Redis works without being
    entered; a session with signals or a ``redis_url`` must be entered, so that its background
    tasks (polling, leases) have an owner.

    With several replicas (``vllm_url=[...]``, no ``router``) the session has one window, one
    law and one controller per replica and a :class:`ReplicaGate` that places each agent on
    one (``core/replicas.py``); on Redis, each replica's window is shared with a leader of its
    own, and the placements are shared too (``distributed/placements.py``).
    """

    def __init__(self, options: SessionOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = SessionOptions.from_kwargs(kwargs)
        elif kwargs:
            raise ConfigError("options: give a SessionOptions or keywords, not both")
        self.options = options
        self.window: AdmissionWindow
        self.gate: Gate | ReplicaGate
        self._placements: RedisPlacements | None = None
        if options.replicated:
            # One window and gate per replica, each agent placed on one (core/replicas.py).
            windows = [self._make_window(index) for index in range(len(options.urls))]
            gates = [
                Gate(
                    w,
                    max_rps=options.max_rps,
                    admission_timeout_s=options.admission_timeout_s,
                    priority_hint=options.priority_hint,
                )
                for w in windows
            ]
            for gate in gates[1:]:
                # max_rps caps the batch's calls, not each replica's: one limiter for all.
                gate._limiter = gates[0]._limiter
            replica_gate = ReplicaGate(options.urls, gates)
            replica_gate.on_dead = self._replica_died
            if options.redis_url is not None:
                from concur_langgraph.distributed.placements import RedisPlacements

                self._placements = RedisPlacements(
                    windows[0],  # type: ignore[arg-type]  # a RedisWindow with redis_url
                    options.batch_id,
                    options.urls,
                )
                replica_gate.store = self._placements
            self.gate = replica_gate
            self.window = replica_gate.window  # type: ignore[assignment]  # the sum, for displays
            self._steerings = [
                Steering(
                    windows[index],
                    options,
                    gates[index].accounting,
                    self._controller_factory(index),
                )
                for index in range(len(windows))
            ]
        else:
            self.window = options.window if options.window is not None else self._make_window()
            self.gate = Gate(
                self.window,
                max_rps=options.max_rps,
                admission_timeout_s=options.admission_timeout_s,
                priority_hint=options.priority_hint,
            )
            self._steerings = [
                Steering(
                    self.window,
                    options,
                    self.gate.accounting,
                    self._controller_factory(None),
                    given_window=options.window is not None,
                )
            ]
        self._poll_task: asyncio.Task[None] | None = None
        self._exporter: MetricsExporter | None = None
        self._entered = False
        self._closed = False

    def _make_window(self, replica: int | None = None) -> AdmissionWindow:
        opts = self.options
        if opts.redis_url is None:
            return LocalWindow(opts.start_window)
        assert opts.batch_id is not None
        from concur_langgraph.distributed.redis_window import RedisWindow

        return RedisWindow(
            opts.redis_url,
            batch_id=opts.batch_id if replica is None else replica_batch_id(opts.batch_id, replica),
            initial_limit=opts.start_window,
        )

    @property
    def metrics_url(self) -> str | None:
        """``http://127.0.0.1:PORT/metrics`` while the Prometheus export runs, else ``None``."""
        return self._exporter.url if self._exporter is not None else None

    @property
    def controller(self) -> Controller | None:
        """The running controller, or ``None`` (no signals, not entered, not the leader, or
        several replicas: each has its own, see :meth:`statistics`)."""
        return self._steerings[0].controller if len(self._steerings) == 1 else None

    @property
    def leadership(self) -> Leadership | None:
        """The leader campaign of a distributed session with signals, while entered (with
        several replicas: replica 0's)."""
        return self._steerings[0].leadership

    @property
    def needs_controller(self) -> bool:
        """Whether this session sizes its window from signals (and so must be entered)."""
        return self.options.vllm_url is not None or self.options.source is not None

    @property
    def distributed(self) -> bool:
        """Whether the window is shared through Redis with other processes."""
        return self.options.redis_url is not None or is_redis_window(self.window)

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
        started: list[Steering] = []
        try:
            if opts.metrics_port is not None:
                # First: a port in use fails before the controller or Redis is touched.
                exporter = MetricsExporter(self.statistics, port=opts.metrics_port)
                await exporter.start()
                self._exporter = exporter
            if self._placements is not None:
                # Every worker must list the same replicas in the same order.
                await self._placements.join()
            for steering in self._steerings:
                await steering.start()
                started.append(steering)
            if isinstance(self.gate, ReplicaGate) and self._placements is not None:
                self._poll_task = asyncio.create_task(
                    self._poll_replicas(self.gate), name="concur-replicas"
                )
        except BaseException:
            for steering in reversed(started):
                await steering.stop()
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
        try:
            poll_task, self._poll_task = self._poll_task, None
            if poll_task is not None:
                await stop_task(poll_task)
            failure: BaseException | None = None
            try:
                for steering in self._steerings:
                    try:
                        failure = await steering.stop(exc_type, exc, tb) or failure
                    except BaseException as error:  # stop them all, raise the first failure
                        failure = failure or error
            finally:
                if failure is not None and exc is None:
                    raise failure
        finally:
            await self._close_exporter()
            await self._close_owned_window()

    def timeline(self) -> dict[str, list[float | int | None]]:
        """The batch over time, one row per controller tick (columns
        :data:`~concur_langgraph.core.controller.TIMELINE_KEYS`: the window and why it moved, KV
        usage, hit rate, agents admitted and queued); empty without a controller. With several
        replicas: replica 0's (:meth:`timelines` has each one's)."""
        return self._steerings[0].timeline()

    def timelines(self) -> list[dict[str, list[float | int | None]]]:
        """Each window's :meth:`timeline`: one per replica (one in all on one server)."""
        return [steering.timeline() for steering in self._steerings]

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """Write a PNG of :meth:`timeline` to ``path`` (needs the ``plot`` extra: matplotlib);
        with several replicas, one panel column per replica.

        Raises :class:`ConfigError` when there is nothing to draw: the batch had no controller
        (a ``FixedLaw`` without ``vllm_url``, or a worker that never led a shared window).
        """
        from concur_langgraph.session.plot import plot_timeline, plot_timelines

        timelines = [t for t in self.timelines() if t.get("t")]
        if not timelines:
            raise ConfigError(
                "plot: this batch has no timeline: its window was not driven by server "
                "signals in this process (FixedLaw without vllm_url, or a worker that never "
                "led the shared window)"
            )
        if isinstance(self.gate, ReplicaGate):
            names = [f"replica {i}: {url}" for i, url in enumerate(self.gate.urls)]
            return plot_timelines(
                [(n, t) for n, t in zip(names, self.timelines(), strict=True) if t.get("t")],
                path,
                title=title or "concur batch",
            )
        return plot_timeline(timelines[0], path, title=title or "concur batch")

    def statistics(self) -> SessionStatistics:
        """A snapshot of the gate, its window and the controller (with several replicas: the
        batch summed in ``gate``, and each replica's own in ``replicas``)."""
        if isinstance(self.gate, ReplicaGate):
            replicas = tuple(
                ReplicaSnapshot(
                    index=part.index,
                    url=part.url,
                    alive=part.alive,
                    placed_total=part.placed_total,
                    gate=part.gate,
                    controller=self._steerings[part.index].statistics(),
                    leader=self._steerings[part.index].leader,
                )
                for part in self.gate.replica_statistics()
            )
            return SessionStatistics(
                gate=self.gate.statistics(), controller=None, replicas=replicas
            )
        steering = self._steerings[0]
        return SessionStatistics(
            gate=self.gate.statistics(),
            controller=steering.statistics(),
            leader=steering.leader,
        )

    # -- plumbing ----------------------------------------------------------------------------

    def _controller_factory(self, replica: int | None) -> ControllerFactory:
        """Makes the controller of one window: on the session's URLs (or source), or on one
        replica's URL, with a fresh law (laws keep history)."""
        opts = self.options

        def new_controller(
            window: Any, initial_window: int, accounting: Callable[[], Sequence[AgentAccount]]
        ) -> Controller:
            if replica is None:
                source = opts.source
                if source is None:
                    source = MetricsSource(opts.urls, client=opts.http_client, field=opts.url_field)
                law = opts.control_law()
                on_change = None
            else:
                source = MetricsSource(
                    (opts.urls[replica],), client=opts.http_client, field=opts.url_field
                )
                law = (
                    copy.deepcopy(opts.control_law())
                    if opts.law is not None
                    else opts.control_law()
                )
                gate = self.gate
                assert isinstance(gate, ReplicaGate)

                def on_change(_change: WindowChange) -> None:
                    # A replica's window moved: agents waiting for a replica may fit there now.
                    gate.window_changed()

            return Controller(
                source=source,
                law=law,
                window=window,
                interval_s=opts.interval_s,
                min_window=opts.min_window,
                max_window=opts.max_window,
                initial_window=initial_window,
                accounting=accounting,
                on_change=on_change,
            )

        return new_controller

    async def _replica_died(self, index: int) -> None:
        """A replica was marked dead: stop driving its window (it no longer matters)."""
        if self._placements is not None:
            await self._placements.mark_dead(index)
        steering = self._steerings[index]
        if self._entered:
            failure = await steering.stop()
            if failure is not None:
                logger.warning("concur: replica %d's controller had failed: %s", index, failure)

    async def _poll_replicas(self, gate: ReplicaGate) -> None:
        """Shared replicas: other workers' releases and leaders' resizes change the room on a
        replica without an event here, and a replica another worker found dead is dead here
        too; so, every quarter interval, learn the dead ones and place waiting agents."""
        assert self._placements is not None
        period = self.options.interval_s / 4
        while True:
            await asyncio.sleep(period)
            try:
                for index in await self._placements.dead():
                    if gate.alive(index):
                        await gate.mark_dead(index, reason="marked dead by another worker")
            except Exception as exc:  # Redis away: the windows report it themselves
                logger.debug("concur: could not read the dead replicas: %s", exc)
            gate.window_changed()

    async def _close_exporter(self) -> None:
        exporter, self._exporter = self._exporter, None
        if exporter is not None:
            await exporter.aclose()

    async def _close_owned_window(self) -> None:
        if self.options.window is None:
            await self.window.aclose()


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
