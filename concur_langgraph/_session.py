"""The runtime bundle of one batch: window, gate and (when there are signals) controller.

Every way in (``ConcurGate``, ``ConcurCallbackHandler``, ``ConcurMiddleware``, the gate node)
runs on a :class:`ConcurSession`. A session is built from :class:`SessionOptions`; it creates the
window (a :class:`LocalWindow` unless a backend is given), the :class:`Gate` on it, and, when a
vLLM URL or a :class:`SignalSource` is given, the :class:`Controller` that resizes the window
from the server's KV-cache signals. ``async with session:`` starts and stops the controller.

Which law needs what:

* ``law=None`` means ``ConcurLaw()``, which needs signals: ``vllm_url`` (or ``source``) is
  required;
* ``FixedLaw(k)`` needs no URL: the window is ``k`` from the start and never moves. With a URL
  too, the controller still polls (for the statistics and the progress display) and keeps
  applying ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict

from ._controller import Controller, ControllerStatistics
from ._errors import ConcurError, ConfigError
from ._gate import Gate, GateStatistics
from ._laws import ConcurLaw, ControlLaw, FixedLaw
from ._signals import SignalSource, VLLMMetricsSource
from ._window import AdmissionWindow, LocalWindow

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ConcurSession",
    "OtherSessionKwargs",
    "SessionKwargs",
    "SessionOptions",
    "SessionStatistics",
]


class OtherSessionKwargs(TypedDict, total=False):
    """The session options besides ``vllm_url`` and ``law`` (see :class:`SessionOptions`)."""

    interval_s: float
    min_window: int
    max_window: int | None
    initial_window: int
    max_rps: float | None
    admission_timeout_s: float | None
    http_client: httpx.AsyncClient | None
    window: AdmissionWindow | None
    source: SignalSource | None
    progress: bool | None


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
    """The control law; ``None`` is ``ConcurLaw()`` (the paper's Eq. 1 with its constants)."""
    interval_s: float = 1.0
    """Seconds between two controller ticks. 1 s is the paper's setting: KV usage moves on the
    scale of a few decode steps times the agent count, and vLLM's counters update every step."""
    min_window: int = 1
    """Smallest window the controller may set. At least 1, so a batch can never deadlock."""
    max_window: int | None = None
    """Largest window the controller may set; ``None`` is no cap (the law's own dynamics and
    the agent count bound it)."""
    initial_window: int = 4
    """Window at the start of the batch, before the first sample. Small, because admitting
    is cheap to undo (the law grows by ``alpha`` per tick while the cache is under-used) while
    an over-admitted start thrashes the cache before the first sample arrives."""
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
    ``None``: an in-process :class:`LocalWindow`."""
    source: SignalSource | None = None
    """A signal source instance, instead of ``vllm_url``."""
    progress: bool | None = None
    """Live progress display for ``abatch``: ``None`` shows it when stdout is a terminal,
    ``True`` always, ``False`` never."""

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
            name = "ConcurLaw()" if self.law is None else type(self.law).__name__
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
        if not (_is_count(self.initial_window) and self.initial_window >= 1):
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

    @property
    def start_window(self) -> int:
        """The window before the first controller tick: ``k`` for a FixedLaw, else
        ``initial_window``, clamped to ``[min_window, max_window]``."""
        start = self.law.k if isinstance(self.law, FixedLaw) else self.initial_window
        start = max(start, self.min_window)
        if self.max_window is not None:
            start = min(start, self.max_window)
        return start


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStatistics:
    """A snapshot of one session."""

    gate: GateStatistics
    """The gate and its window: limit, holders, active, parked, waiting, completed."""
    controller: ControllerStatistics | None
    """The controller (last sample, staleness, ticks; its final state once the session is
    closed), or ``None`` when there are no signals or the session was never entered."""


class ConcurSession:
    """Window + gate + controller of one batch; ``async with`` runs the controller.

    Args:
        options: the validated options; or give them as keywords (``ConcurSession(law=...)``).

    A session without signals (``FixedLaw`` and no URL) works without being entered; a session
    with signals must be entered, so that its polling task has an owner.
    """

    def __init__(self, options: SessionOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = SessionOptions(**kwargs)
        elif kwargs:
            raise ConfigError("options: give a SessionOptions or keywords, not both")
        self.options = options
        self.window: AdmissionWindow = (
            options.window if options.window is not None else LocalWindow(options.start_window)
        )
        self.gate = Gate(
            self.window,
            max_rps=options.max_rps,
            admission_timeout_s=options.admission_timeout_s,
        )
        self._controller: Controller | None = None
        self._final_controller_stats: ControllerStatistics | None = None
        self._entered = False
        self._closed = False

    @property
    def controller(self) -> Controller | None:
        """The running controller, or ``None`` (no signals, or not entered)."""
        return self._controller

    @property
    def needs_controller(self) -> bool:
        """Whether this session sizes its window from signals (and so must be entered)."""
        return self.options.vllm_url is not None or self.options.source is not None

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

    async def __aenter__(self) -> ConcurSession:
        if self._entered or self._closed:
            raise ConcurError("a session can be entered once; create a new one per batch")
        opts = self.options
        if opts.window is not None and opts.window.limit != opts.start_window:
            await opts.window.set_limit(opts.start_window)
        if self.needs_controller:
            source = opts.source
            if source is None:
                assert opts.vllm_url is not None
                urls = [opts.vllm_url] if isinstance(opts.vllm_url, str) else list(opts.vllm_url)
                source = VLLMMetricsSource(urls, client=opts.http_client)
            controller = Controller(
                source=source,
                law=opts.law if opts.law is not None else ConcurLaw(),
                window=self.window,
                interval_s=opts.interval_s,
                min_window=opts.min_window,
                max_window=opts.max_window,
                initial_window=opts.start_window,
            )
            await controller.__aenter__()
            self._controller = controller
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
        controller, self._controller = self._controller, None
        try:
            if controller is not None:
                self._final_controller_stats = controller.statistics()
                await controller.__aexit__(exc_type, exc, tb)
        finally:
            if self.options.window is None:
                await self.window.aclose()

    def statistics(self) -> SessionStatistics:
        """A snapshot of the gate, its window and the controller."""
        controller = self._controller
        return SessionStatistics(
            gate=self.gate.statistics(),
            controller=(
                controller.statistics() if controller is not None else self._final_controller_stats
            ),
        )
