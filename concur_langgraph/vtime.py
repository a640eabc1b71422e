"""Virtual time: an asyncio event loop whose clock jumps to the next timer when all tasks wait.

A closed async program (agents, LangGraph, ``ChatOpenAI`` -> openai SDK -> ``httpx`` on an
``httpx.ASGITransport`` -> the simulator app -> its engine) spends nearly all of its time
waiting: in ``asyncio.sleep`` for a modelled engine step or tool latency, in timeouts, in the
controller's polling interval. On a :class:`VirtualEventLoop` those waits cost no wall time:

* ``loop.time()`` is a virtual clock (it starts at ``start``, default ``0.0``) that only the
  loop moves;
* each loop iteration that would block in ``select`` with a timeout first polls real I/O with
  timeout 0 (the loop's self-pipe included, so ``call_soon_threadsafe`` from other threads
  still works); if nothing is ready, the virtual clock advances by exactly that timeout, i.e.
  to the earliest scheduled timer, and the timer fires at once.

So ``await asyncio.sleep(3600)`` returns immediately in wall time with ``loop.time()`` exactly
3600 later; ``asyncio.timeout``, ``asyncio.wait_for``, ``anyio`` deadlines and the controller's
interval all run on the virtual clock with no special code. Callbacks take zero virtual time,
and the order of events depends only on the program, so the same program gives the same
timeline and the same results on any machine, however loaded.

Threads. Work handed to an executor with ``loop.run_in_executor`` (``asyncio.to_thread``,
LangChain's sync callback handlers and sync ``_generate`` fallbacks, ``ChatOpenAI``'s result
parsing, the openai SDK's platform probe) takes zero virtual time, and its timing never shows:
while any such call is pending the clock does not move, and results are handed back only when
the loop is idle and every pending call has settled, all of them in submission order. The order
in which threads happen to finish in real time is thus invisible, and a batch of ``ChatOpenAI``
agents gives the same timeline on every run. Threads the program starts by other means are
invisible to the loop: if they post work with ``call_soon_threadsafe`` while every task waits
on a timer, the clock may already have jumped. An executor call that waits for another
executor call's result to reach the loop, or for virtual time to pass, never ends.

Deadlock. When no timer is scheduled, no executor call is running and no file descriptor
other than the loop's own self-pipe is registered, nothing inside the program can ever make
progress. With ``strict=True`` (the default of :func:`run` and :func:`new_virtual_loop`) the
loop raises :class:`VirtualTimeDeadlockError` instead of hanging. With ``strict=False`` it
waits for real I/O, as a normal loop would (e.g. for a foreign thread's
``call_soon_threadsafe``). Either way, with real sockets registered (a server listening on a
port, a pending real connection) a wait without timers is a real wait, not a deadlock.

Real I/O and virtual time do not mix well: a virtual timeout around a real network call fires
as soon as the loop has nothing else to do, long before the real answer arrives. Use
``httpx.ASGITransport`` (no sockets) for the simulator under virtual time. Note that
``ASGITransport`` does not enforce httpx's ``timeout`` at all (in real or virtual time); wrap
calls in ``asyncio.timeout`` where a deadline matters.

Usage::

    from concur_langgraph import vtime

    async def main() -> float:
        await asyncio.sleep(3600)
        return vtime.virtual_now()

    assert vtime.run(main()) == 3600.0          # in milliseconds of wall time

    with asyncio.Runner(loop_factory=vtime.new_virtual_loop) as runner:
        runner.run(main())

Tests. Two ways, both exact:

* a plain (sync) test calls ``vtime.run(main())`` and asserts on the result: works in any test
  directory with no configuration;
* a pytest-asyncio (>= 1.5) test runs on a virtual loop when marked
  ``@pytest.mark.asyncio(loop_factories=["virtual"])`` (or via
  :data:`concur_langgraph.testing.vtime_fixtures.virtual_time`) and the test session loads the
  plugin :mod:`concur_langgraph.testing.vtime_fixtures` (``pytest_plugins = [...]`` in the root
  ``conftest.py``); unmarked tests keep an ordinary loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import selectors
import threading
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

from concur_langgraph.errors import ConfigError, VirtualTimeDeadlockError

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

__all__ = [
    "VirtualEventLoop",
    "VirtualLoopStatistics",
    "VirtualTimeDeadlockError",
    "new_virtual_loop",
    "run",
    "virtual_now",
]

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

# While an executor call runs we wait for its completion in real time; the cap only bounds one
# select() call so that the loop re-checks its state now and then, it never moves the clock.
_THREAD_WAIT_CAP_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualLoopStatistics:
    """Counters of a :class:`VirtualEventLoop` since it was created."""

    now: float
    """The virtual clock, in seconds."""
    start: float
    """Where the virtual clock started, in seconds."""
    jumps: int
    """How many times the clock jumped forward to the next timer."""
    thread_waits: int
    """How many idle loop iterations waited in real time for executor calls to settle."""
    executor_calls: int
    """``run_in_executor`` calls made on this loop."""
    executor_running: int
    """Executor calls not yet delivered to their callers (the clock is frozen while > 0)."""


class _ExecutorCall:
    """One ``run_in_executor`` call: shared by the loop and the worker thread.

    ``inner`` is the base loop's future for the pool job; ``outer`` is what the caller awaits,
    and gets ``inner``'s outcome only when the loop delivers it (see
    :meth:`VirtualEventLoop._deliver_executor_results`). The call is *settled* once ``inner`` is
    done and the worker has returned or will never run: a cancelled call whose worker still
    runs is not settled, so the clock stays still until that thread ends too.
    """

    __slots__ = ("_lock", "abandoned", "inner", "outer", "started", "worker_done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outer: asyncio.Future[Any] | None = None
        self.inner: asyncio.Future[Any] | None = None
        self.started = False
        self.abandoned = False
        self.worker_done = False

    def try_start(self) -> bool:
        """Worker side: claim the call; False if it was cancelled before it began."""
        with self._lock:
            if self.abandoned:
                return False
            self.started = True
            return True

    def abandon_if_not_started(self) -> None:
        """Loop side, on cancellation: if the worker has not begun, it never will."""
        with self._lock:
            if not self.started:
                self.abandoned = True

    def settled(self) -> bool:
        inner = self.inner
        if inner is None or not inner.done():
            return False
        # A pool job cancelled while still queued (executor shutdown with cancel_futures, or
        # our own cancel) never starts; a started one always reports back when it ends.
        return self.worker_done or self.abandoned or (inner.cancelled() and not self.started)


class _ExecutorFuture(asyncio.Future[_T]):
    """The future a ``run_in_executor`` caller awaits.

    Cancelling it abandons a call whose worker has not begun at once, not one loop iteration
    later in a done callback: by then a free pool thread could have started the function.
    """

    def __init__(self, call: _ExecutorCall, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._call = call

    def cancel(self, msg: Any | None = None) -> bool:
        if not self.done():
            self._call.abandon_if_not_started()
        return super().cancel(msg)


class _VirtualSelector(selectors.BaseSelector):
    """A real selector whose blocking waits become jumps of the loop's virtual clock."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self._loop: VirtualEventLoop | None = None
        self._own_fds: frozenset[int] = frozenset()

    def bind(self, loop: VirtualEventLoop) -> None:
        # Called once the loop's constructor has registered its self-pipe: those descriptors
        # can only be woken from another thread, so they do not count as pending real I/O.
        self._loop = loop
        self._own_fds = frozenset(key.fd for key in self._real.get_map().values())

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def _has_foreign_fds(self) -> bool:
        return any(key.fd not in self._own_fds for key in self._real.get_map().values())

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self._loop
        if loop is None or (timeout is not None and timeout <= 0):
            return self._real.select(timeout)
        ready = self._real.select(0)
        if ready:
            return ready
        if loop._executor_calls_pending or loop._helper_threads:
            if loop._deliver_executor_results():
                return []
            loop._thread_waits += 1
            return self._real.select(_THREAD_WAIT_CAP_S)
        if timeout is None:
            if loop._strict and not self._has_foreign_fds():
                raise VirtualTimeDeadlockError(
                    "virtual-time deadlock: every task is waiting, and no timer, executor "
                    f"call or real I/O can wake any of them (virtual time {loop.time():.6f} s). "
                    "Look for an Event/Future/Queue that nothing will ever set, or a lock "
                    "cycle; pass strict=False to wait for other threads instead."
                )
            return self._real.select(None)
        loop._advance_by(timeout)
        return []


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """A selector event loop on a virtual clock that jumps to the next timer when idle.

    ``start``: the clock's initial value in seconds (finite). ``strict``: raise
    :class:`VirtualTimeDeadlockError` when the program can never wake up again, instead of
    waiting for real I/O forever. See the module docstring for the rules.
    """

    def __new__(cls, *, start: float = 0.0, strict: bool = True) -> VirtualEventLoop:
        # Validate before the instance exists: a half-built loop fails in BaseEventLoop.__del__.
        _check_options(start, strict)
        return super().__new__(cls)

    def __init__(self, *, start: float = 0.0, strict: bool = True) -> None:
        self._vnow = float(start)
        self._vstart = float(start)
        self._strict = strict
        self._jumps = 0
        self._thread_waits = 0
        self._executor_calls = 0
        # Calls not yet delivered, by submission order; dicts keep insertion order.
        self._executor_calls_pending: dict[int, _ExecutorCall] = {}
        self._helper_threads = 0
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.bind(self)

    def time(self) -> float:
        """The virtual clock, in seconds."""
        return self._vnow

    @property
    def strict(self) -> bool:
        """Whether an unwakeable wait raises :class:`VirtualTimeDeadlockError`."""
        return self._strict

    def _advance_by(self, timeout: float) -> None:
        # The base loop asked to wait `timeout` = min(next deadline - now, one day). Landing on
        # the deadline itself keeps the clock bit-exact: now + (deadline - now) can be one ulp
        # off when now < deadline / 2. `_scheduled` is the base loop's timer heap (CPython
        # 3.4+); its head is live, the base loop drops cancelled heads before choosing timeout.
        target = self._vnow + timeout
        scheduled = getattr(self, "_scheduled", None)
        if scheduled:
            deadline = scheduled[0].when()
            if self._vnow < deadline and deadline - target <= max(1e-9, abs(target) * 1e-12):
                target = deadline
        self._vnow = target
        self._jumps += 1

    def statistics(self) -> VirtualLoopStatistics:
        """Clock and counters (see :class:`VirtualLoopStatistics`)."""
        return VirtualLoopStatistics(
            now=self._vnow,
            start=self._vstart,
            jumps=self._jumps,
            thread_waits=self._thread_waits,
            executor_calls=self._executor_calls,
            executor_running=len(self._executor_calls_pending) + self._helper_threads,
        )

    def run_in_executor(
        self, executor: Executor | None, func: Callable[[*_Ts], _T], *args: *_Ts
    ) -> asyncio.Future[_T]:
        """Like the base method, but the result comes back in virtual time, deterministically.

        The clock stays still while the call runs, and its outcome is handed to the caller
        only when the loop is idle and every pending executor call has settled, all of them
        in submission order: the order in which threads happen to finish in real time never
        shows in the program.
        """
        if self.get_debug() and (asyncio.iscoroutine(func) or inspect.iscoroutinefunction(func)):
            # The base loop's debug check would only see our wrapper below.
            raise TypeError("coroutines cannot be used with run_in_executor()")
        call = _ExecutorCall()
        outer: _ExecutorFuture[_T] = _ExecutorFuture(call, loop=self)
        call.outer = outer

        def worker() -> _T:
            if not call.try_start():
                # Cancelled before it began: the caller no longer wants the result.
                raise asyncio.CancelledError
            try:
                return func(*args)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: no one waits
                    self.call_soon_threadsafe(self._worker_finished, call)

        if isinstance(executor, ProcessPoolExecutor):
            # The wrapper cannot be pickled; the job counts as finished once its future is.
            call.started = call.worker_done = True
            call.inner = super().run_in_executor(executor, func, *args)
        else:
            call.inner = super().run_in_executor(executor, worker)
        self._executor_calls += 1
        self._executor_calls_pending[self._executor_calls] = call

        def on_outer_done(fut: asyncio.Future[_T]) -> None:
            if fut.cancelled() and call.inner is not None:
                call.inner.cancel()

        outer.add_done_callback(on_outer_done)
        return outer

    def _worker_finished(self, call: _ExecutorCall) -> None:
        call.worker_done = True

    def _deliver_executor_results(self) -> bool:
        """At idle: if every pending executor call has settled, deliver them all, in order.

        Returns whether anything was delivered (callbacks are then ready to run).
        """
        pending = self._executor_calls_pending
        if self._helper_threads or not pending:
            return False
        if not all(call.settled() for call in pending.values()):
            return False
        calls = list(pending.values())
        pending.clear()
        for call in calls:
            inner, outer = call.inner, call.outer
            if outer is None or outer.done() or inner is None:
                continue
            if inner.cancelled():
                outer.cancel()
            elif (exc := inner.exception()) is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(inner.result())
        return True

    async def shutdown_default_executor(self, *args: Any, **kwargs: Any) -> None:
        """Like the base method; its helper thread freezes the clock like an executor call."""
        # The base method joins the pool in a plain thread that reports back with
        # call_soon_threadsafe: invisible to run_in_executor, so counted here.
        self._helper_threads += 1
        try:
            await super().shutdown_default_executor(*args, **kwargs)
        finally:
            self._helper_threads -= 1


def _check_options(start: object, strict: object) -> None:
    if isinstance(start, bool) or not isinstance(start, int | float):
        raise ConfigError(f"start must be a number of seconds, got {start!r}")
    if not math.isfinite(start):
        raise ConfigError(f"start must be finite, got {start!r}")
    if not isinstance(strict, bool):
        raise ConfigError(f"strict must be a bool, got {strict!r}")


def new_virtual_loop(*, start: float = 0.0, strict: bool = True) -> VirtualEventLoop:
    """Build a :class:`VirtualEventLoop`; usable as ``asyncio.Runner(loop_factory=...)``."""
    return VirtualEventLoop(start=start, strict=strict)


def run(
    main: Coroutine[Any, Any, _T],
    *,
    start: float = 0.0,
    strict: bool = True,
    debug: bool | None = None,
) -> _T:
    """Run ``main`` to completion on a fresh :class:`VirtualEventLoop`, like ``asyncio.run``.

    The loop is closed afterwards (remaining tasks cancelled, async generators and the default
    executor shut down). Raises :class:`VirtualTimeDeadlockError` if ``strict`` and the
    program deadlocks.
    """

    def factory() -> asyncio.AbstractEventLoop:
        return VirtualEventLoop(start=start, strict=strict)

    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)


def virtual_now() -> float:
    """The running :class:`VirtualEventLoop`'s clock; RuntimeError on any other loop."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualEventLoop):
        raise RuntimeError(
            f"virtual_now() needs a running VirtualEventLoop, not {type(loop).__name__}"
        )
    return loop.time()
