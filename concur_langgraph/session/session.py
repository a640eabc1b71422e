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
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from concur_langgraph.core.controller import Controller, ControllerStatistics, stop_task
from concur_langgraph.core.gate import Gate
from concur_langgraph.core.signals import MetricsSource
from concur_langgraph.core.window import AdmissionWindow, LocalWindow
from concur_langgraph.distributed.keys import is_redis_window
from concur_langgraph.errors import ConcurError, ConfigError
from concur_langgraph.laws.fixed import FixedLaw
from concur_langgraph.session.exporter import MetricsExporter
from concur_langgraph.session.options import SessionOptions
from concur_langgraph.session.statistics import SessionStatistics

if TYPE_CHECKING:
    from concur_langgraph.distributed.accounts import SharedAccounts
    from concur_langgraph.distributed.leader import Leadership
    from concur_langgraph.distributed.redis_window import RedisWindow

__all__ = ["ConcurSession", "SessionUser"]

logger = logging.getLogger("concur_langgraph")


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
            from concur_langgraph.distributed.redis_window import RedisWindow

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
        # On a shared window with signals: every worker's agent accounts, for the leader's law.
        self._accounts: SharedAccounts | None = None
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
        return is_redis_window(self.window)

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
            if is_redis_window(self.window):
                await self._enter_distributed(self.window)  # type: ignore[arg-type]
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
        accounts, self._accounts = self._accounts, None
        try:
            failure = self._reign_failure
            if lead_task is not None:
                failure = await stop_task(lead_task) or failure
            try:
                await self._end_reign(exc_type, exc, tb)
            finally:
                try:
                    if leadership is not None:
                        await leadership.__aexit__(None, None, None)
                finally:
                    if accounts is not None:
                        await accounts.__aexit__(None, None, None)
            if failure is not None and exc is None:
                raise failure
        finally:
            await self._close_exporter()
            await self._close_owned_window()

    def timeline(self) -> dict[str, list[float | int | None]]:
        """The batch over time, one row per controller tick (columns
        :data:`~concur_langgraph.core.controller.TIMELINE_KEYS`: the window and why it moved, KV
        usage, hit rate, agents admitted and queued); empty without a controller."""
        controller = self._controller or self._last_controller
        return controller.timeline() if controller is not None else {}

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """Write a PNG of :meth:`timeline` to ``path`` (needs the ``plot`` extra: matplotlib).

        Raises :class:`ConfigError` when there is nothing to draw: the batch had no controller
        (a ``FixedLaw`` without ``vllm_url``, or a worker that never led a shared window).
        """
        from concur_langgraph.session.plot import plot_timeline

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
            source = MetricsSource(opts.urls, client=opts.http_client, field=opts.url_field)
        return Controller(
            source=source,
            law=opts.control_law(),
            window=window,
            interval_s=opts.interval_s,
            min_window=opts.min_window,
            max_window=opts.max_window,
            initial_window=initial_window,
            # A shared window's agents are spread over the workers: the leader's law reads
            # every worker's accounts, merged (distributed/accounts.py).
            accounting=(
                self._accounts.accounts if self._accounts is not None else self.gate.accounting
            ),
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
        from concur_langgraph.distributed.accounts import SharedAccounts
        from concur_langgraph.distributed.leader import Leadership

        accounts = SharedAccounts(
            window.client, window.batch_id, self.gate.accounting, interval_s=opts.interval_s
        )
        await accounts.__aenter__()
        self._accounts = accounts
        try:
            leadership = Leadership(client=window.client, batch_id=window.batch_id)
            await leadership.__aenter__()
        except BaseException:
            self._accounts = None
            await accounts.__aexit__(None, None, None)
            raise
        self._leadership = leadership
        try:
            if leadership.is_leader:
                # A wrong vllm_url fails here, at entry, as it does for an in-process window.
                await self._begin_reign(window, leadership)
        except BaseException:
            self._leadership = None
            self._accounts = None
            try:
                await leadership.__aexit__(None, None, None)
            finally:
                await accounts.__aexit__(None, None, None)
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
        if self._accounts is not None:
            await self._accounts.start_collecting()
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
        if self._accounts is not None:
            self._accounts.stop_collecting()
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
