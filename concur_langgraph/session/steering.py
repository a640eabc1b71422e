"""Who drives one window: a controller in this process, or the elected leader of a shared one.

A session drives one window (one server, or several folded behind a router), or one window per
replica. Each is a :class:`Steering`: for an in-process window, a :class:`Controller` from
entry to exit; for a window shared on Redis, a leader campaign, and a controller during each
reign of this process, the agents' accounts shared so the leader's law sees every worker's
(``docs/distributed.md``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from concur_langgraph.core.controller import Controller, ControllerStatistics, stop_task
from concur_langgraph.core.gate import AgentAccount
from concur_langgraph.core.window import AdmissionWindow
from concur_langgraph.distributed.keys import is_redis_window
from concur_langgraph.errors import ConcurError
from concur_langgraph.laws.fixed import FixedLaw
from concur_langgraph.session.options import SessionOptions

if TYPE_CHECKING:
    from concur_langgraph.distributed.accounts import SharedAccounts
    from concur_langgraph.distributed.leader import Leadership
    from concur_langgraph.distributed.redis_window import RedisWindow

__all__ = ["Steering"]

logger = logging.getLogger("concur_langgraph")

ControllerFactory = Callable[[Any, int, Callable[[], Sequence[AgentAccount]]], Controller]
"""``(window, initial_window, accounting) -> Controller``."""


class Steering:
    """Drives ``window`` from signals while entered (see the module docstring).

    Args:
        window: the window (a :class:`RedisWindow` is shared: joined, led by election).
        options: the session's options.
        accounting: this process's agents on this window (``Gate.accounting``).
        new_controller: makes the controller of a reign (its source and law are fresh per
            reign: a law keeps history).
        owns_window: whether entry may set a window given in from outside to the start window.
    """

    def __init__(
        self,
        window: AdmissionWindow,
        options: SessionOptions,
        accounting: Callable[[], Sequence[AgentAccount]],
        new_controller: ControllerFactory,
        *,
        given_window: bool = False,
    ) -> None:
        self.window = window
        self.options = options
        self._accounting = accounting
        self._new_controller = new_controller
        self._given_window = given_window
        self.controller: Controller | None = None
        """The running controller (``None``: no signals, not entered, or not the leader)."""
        self.last_controller: Controller | None = None
        self.final_statistics: ControllerStatistics | None = None
        self.leadership: Leadership | None = None
        self._accounts: SharedAccounts | None = None
        self._lead_task: asyncio.Task[None] | None = None
        # A controller that died during an earlier reign: raised on exit, as in-process.
        self._reign_failure: BaseException | None = None

    @property
    def needs_controller(self) -> bool:
        return self.options.vllm_url is not None or self.options.source is not None

    @property
    def distributed(self) -> bool:
        return is_redis_window(self.window)

    def statistics(self) -> ControllerStatistics | None:
        """The running controller's statistics, else the last one's final state."""
        if self.controller is not None:
            return self.controller.statistics()
        return self.final_statistics

    @property
    def leader(self) -> bool | None:
        """Whether this process drives the shared window now; ``None`` when there is nothing
        to lead (an in-process window, or no signals)."""
        if not (self.distributed and self.needs_controller):
            return None
        leadership = self.leadership
        return leadership is not None and leadership.is_leader and self.controller is not None

    def timeline(self) -> dict[str, list[float | int | None]]:
        controller = self.controller or self.last_controller
        return controller.timeline() if controller is not None else {}

    async def start(self) -> None:
        """Start driving: the controller, or the campaign (and, as leader, a reign)."""
        opts = self.options
        if is_redis_window(self.window):
            await self._enter_distributed(self.window)  # type: ignore[arg-type]
            return
        if self._given_window and self.window.limit != opts.start_window:
            await self.window.set_limit(opts.start_window)
        if self.needs_controller:
            controller = self._new_controller(self.window, opts.start_window, self._accounting)
            await controller.__aenter__()
            self.controller = controller

    async def stop(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> BaseException | None:
        """Stop driving; returns a controller failure to raise (``None``: none)."""
        lead_task, self._lead_task = self._lead_task, None
        leadership, self.leadership = self.leadership, None
        accounts, self._accounts = self._accounts, None
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
        return failure

    # -- a shared window ----------------------------------------------------------------------

    async def _enter_distributed(self, window: RedisWindow) -> None:
        opts = self.options
        # Join the stored window: a worker that starts late (or restarts) must not reset what
        # the leader has learned; RedisWindow seeds initial_limit only into a new batch.
        await window.refresh()
        if (
            not self._given_window
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
            window.client, window.batch_id, self._accounting, interval_s=opts.interval_s
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
        self.leadership = leadership
        try:
            if leadership.is_leader:
                # A wrong vllm_url fails here, at entry, as it does for an in-process window.
                await self._begin_reign(window, leadership)
        except BaseException:
            self.leadership = None
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
        # A shared window's agents are spread over the workers: the leader's law reads every
        # worker's accounts, merged (distributed/accounts.py).
        accounting = self._accounts.accounts if self._accounts is not None else self._accounting
        controller = self._new_controller(leadership.fence(window), stored, accounting)
        await controller.__aenter__()
        self.controller = controller

    async def _end_reign(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        controller, self.controller = self.controller, None
        if self._accounts is not None:
            self._accounts.stop_collecting()
        if controller is not None:
            self.last_controller = controller
            self.final_statistics = controller.statistics()
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
            if self.controller is None:
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
