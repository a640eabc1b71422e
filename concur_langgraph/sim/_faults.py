"""Fault injection for the simulator: a vLLM server that misbehaves on purpose.

:class:`Faults` says what goes wrong; a :class:`FaultInjector` applies it to a running app and
can be changed while the app serves (``SimServer(..., faults=Faults(...))``, then
``server.faults.set(...)``, or over HTTP, see below). With no fault set the app answers
byte for byte as it does without an injector.

``/metrics`` faults (``Faults.metrics``):

* ``"down"``: the server drops the connection after the status line, as a process that dies
  mid-answer does. In-process (``httpx.ASGITransport``) the client sees the
  ``httpx.RemoteProtocolError`` the app raises; over a socket (uvicorn) the server closes the
  connection and the client sees its own transport error;
* ``"error"``: an HTTP error status (``metrics_status``, 503 by default) with vLLM's JSON error;
* ``"slow"``: the answer comes ``metrics_delay_s`` seconds late (then it is correct);
* ``"garbage"``: HTTP 200 with a body that is not Prometheus text;
* ``"html"``: HTTP 200 with an HTML error page, as a misrouted proxy serves;
* ``"truncated"``: HTTP 200 with the page cut after the KV-usage gauge (the counters are
  missing), as a proxy with a body-size limit serves it: valid Prometheus text, incomplete;
* counters reset: :meth:`FaultInjector.reset_counters` (``POST /_sim/reset-counters``) makes
  every counter start again from 0 as after a server restart (gauges and the cache itself are
  kept; the ``*_created`` series move to the reset time).

Chat-completion faults (``Faults.chat``), applied before the request is parsed, so a faulted
call never reaches the engine:

* ``"error"``: HTTP ``chat_status`` (e.g. 500, 503, 429) with vLLM's JSON error and, when
  ``chat_retry_after_s`` is set, a ``Retry-After`` header;
* ``"hang"``: no answer at all until the client gives up (disconnects, or is cancelled).

Which calls: each call is faulted with probability ``chat_fraction`` (drawn from a
``random.Random(seed)``, so a run in virtual time faults the same calls every time), and when
``chat_next`` is set only that many calls are faulted, after which calls succeed again.

The admin routes, under ``/_sim/`` (a prefix vLLM does not use, so they cannot collide with a
real route), exist only on an app created with an injector (``SimServer`` and
``concur sim serve`` always have one):

* ``GET /_sim/faults``: ``{"faults": {...}, "statistics": {...}}``;
* ``POST /_sim/faults`` with a JSON object of :class:`Faults` fields: replaces the settings
  (absent fields take their defaults, so ``{}`` clears every fault); 400 naming the field on a
  bad value;
* ``POST /_sim/reset-counters``: the counter reset above.

Time. The delays are ``asyncio.sleep`` on the running loop: real seconds under uvicorn,
virtual seconds under :mod:`concur_langgraph.vtime`. ``httpx.ASGITransport`` enforces no
client timeout at all, so a ``"hang"`` in-process needs a client that does:
:class:`TimeoutASGITransport` applies httpx's read timeout to the app as a socket would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Literal, get_args

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from concur_langgraph.errors import ConfigError
from concur_langgraph.sim._engine import EngineMetrics
from concur_langgraph.sim._metrics import METRICS_CONTENT_TYPE

__all__ = [
    "ChatFault",
    "FaultInjector",
    "FaultStatistics",
    "Faults",
    "MetricsFault",
    "SimulatedDisconnect",
    "TimeoutASGITransport",
    "parse_fault_setting",
    "truncate_page",
]

MetricsFault = Literal["none", "down", "error", "slow", "garbage", "html", "truncated"]
"""What ``GET /metrics`` does (see the module docstring)."""
ChatFault = Literal["none", "error", "hang"]
"""What a faulted ``POST /v1/chat/completions`` does (see the module docstring)."""

_METRICS_FAULTS: Final = frozenset(get_args(MetricsFault))
_CHAT_FAULTS: Final = frozenset(get_args(ChatFault))

GARBAGE_BODY: Final = "\x00\x1b[2J}{ not-prometheus 0xDEADBEEF ~~ \ufffd\n"
"""The body of ``metrics="garbage"``: no Prometheus parser accepts it."""
HTML_BODY: Final = (
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)
"""The body of ``metrics="html"``: the error page an nginx in front of a dead backend serves."""


def _check_status(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 400 <= value <= 599:
        raise ConfigError(f"{field}: must be an HTTP error status in 400..599, got {value!r}")
    return value


def _check_seconds(value: object, field: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    ):
        allowed = "None or " if optional else ""
        raise ConfigError(f"{field}: must be {allowed}a number of seconds >= 0, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """What the simulated server does wrong; the defaults are a healthy server."""

    metrics: MetricsFault = "none"
    """``GET /metrics``: ``"none"``, ``"down"`` (connection dropped), ``"error"`` (HTTP
    ``metrics_status``), ``"slow"`` (``metrics_delay_s`` late), ``"garbage"`` (not Prometheus
    text), ``"html"`` (an HTML error page with status 200), ``"truncated"`` (the page cut
    after the KV-usage gauge, status 200)."""
    metrics_status: int = 503
    """Status of ``metrics="error"`` (400..599). 503 is what a restarting server or a proxy
    without a backend answers."""
    metrics_delay_s: float = 30.0
    """Delay of ``metrics="slow"``, seconds (>= 0). The default outlasts the signal source's
    5 s scrape timeout, so the scrape fails; give less than that to see a late but good
    answer."""
    chat: ChatFault = "none"
    """``POST /v1/chat/completions``: ``"none"``, ``"error"`` (HTTP ``chat_status``) or
    ``"hang"`` (no answer until the client gives up), for the calls picked by
    ``chat_fraction`` and ``chat_next``."""
    chat_status: int = 503
    """Status of ``chat="error"`` (400..599): 500 and 503 as an overloaded or failing server
    answers, 429 as a rate-limiting gateway does. The openai SDK retries 408, 409, 429 and
    5xx."""
    chat_retry_after_s: float | None = None
    """``Retry-After`` header of ``chat="error"`` answers, seconds (>= 0); ``None`` sends none.
    The openai SDK waits that long before its retry (up to 120 s)."""
    chat_fraction: float = 1.0
    """Probability that one chat call is faulted, in (0, 1]; drawn from ``seed``."""
    chat_next: int | None = None
    """Fault only this many calls (>= 1), then answer normally again; ``None``: no limit."""
    seed: int = 0
    """Seed of the draws of ``chat_fraction``; setting new faults restarts the draws."""

    def __post_init__(self) -> None:
        if self.metrics not in _METRICS_FAULTS:
            raise ConfigError(
                f"metrics: must be one of {', '.join(sorted(_METRICS_FAULTS))}, "
                f"got {self.metrics!r}"
            )
        _check_status(self.metrics_status, "metrics_status")
        _check_seconds(self.metrics_delay_s, "metrics_delay_s")
        if self.chat not in _CHAT_FAULTS:
            raise ConfigError(
                f"chat: must be one of {', '.join(sorted(_CHAT_FAULTS))}, got {self.chat!r}"
            )
        _check_status(self.chat_status, "chat_status")
        _check_seconds(self.chat_retry_after_s, "chat_retry_after_s", optional=True)
        fraction = self.chat_fraction
        if not (
            isinstance(fraction, int | float)
            and not isinstance(fraction, bool)
            and 0 < fraction <= 1
        ):
            raise ConfigError(f"chat_fraction: must be a number in (0, 1], got {fraction!r}")
        nxt = self.chat_next
        if nxt is not None and (not isinstance(nxt, int) or isinstance(nxt, bool) or nxt < 1):
            raise ConfigError(f"chat_next: must be None or an integer >= 1, got {nxt!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed: must be an integer, got {self.seed!r}")

    @property
    def active(self) -> bool:
        """Whether any fault is set."""
        return self.metrics != "none" or self.chat != "none"

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON object (what ``GET /_sim/faults`` shows)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Settings from a JSON object of fields; :class:`ConfigError` names a bad one."""
        if not isinstance(data, dict):
            raise ConfigError(f"faults: expected a JSON object of Faults fields, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"faults: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


def parse_fault_setting(text: str) -> tuple[str, object]:
    """``"FIELD=VALUE"`` (the CLI's ``--fault``) -> ``(field, value)`` with the value typed.

    Values are read as JSON when they parse (numbers, ``null``), else as strings, so
    ``metrics=down``, ``chat_status=429`` and ``chat_retry_after_s=2.5`` all work.
    """
    field, sep, raw = text.partition("=")
    field = field.strip()
    if not sep or not field:
        raise ConfigError(f"--fault: expected FIELD=VALUE, got {text!r}")
    known = {f.name for f in dataclasses.fields(Faults)}
    if field not in known:
        raise ConfigError(f"--fault: unknown field {field!r}; known: {', '.join(sorted(known))}")
    value: object
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw.strip()
    return field, value


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultStatistics:
    """What an injector has done since it was created."""

    chat_calls: int
    """Chat-completion calls seen (faulted or not)."""
    chat_faulted: int
    """Chat-completion calls answered with a fault (error or hang)."""
    metrics_scrapes: int
    """``GET /metrics`` requests seen."""
    metrics_faulted: int
    """``GET /metrics`` requests answered with a fault."""
    counter_resets: int
    """Counter resets made (:meth:`FaultInjector.reset_counters`)."""
    chat_next_left: int | None
    """Calls still to fault under ``chat_next``; ``None`` when it is not set."""


class SimulatedDisconnect(httpx.RemoteProtocolError):
    """Raised by the app to drop a connection (``metrics="down"``).

    An ``httpx`` error on purpose: ``httpx.ASGITransport`` hands an app's exception to the
    client unchanged, so in-process the client sees what a peer closing the connection gives it;
    uvicorn closes the socket when an app fails after the status line.
    """


def _subtract(now: Mapping[Any, int], base: Mapping[Any, int]) -> dict[Any, int]:
    return {key: value - base.get(key, 0) for key, value in now.items()}


class FaultInjector:
    """The faults of one running app, changeable while it serves.

    Args:
        faults: the initial settings (default: none).
    """

    def __init__(self, faults: Faults | None = None) -> None:
        self._faults = Faults()
        self._rng = random.Random(0)
        self._left: int | None = None
        self._baseline: EngineMetrics | None = None
        self._created_s: float | None = None
        self._chat_calls = self._chat_faulted = 0
        self._scrapes = self._metrics_faulted = 0
        self._resets = 0
        self.set(faults if faults is not None else Faults())

    @property
    def faults(self) -> Faults:
        """The settings now."""
        return self._faults

    def set(self, faults: Faults) -> None:
        """Replace the settings; the ``chat_fraction`` draws and ``chat_next`` start over."""
        if not isinstance(faults, Faults):
            raise ConfigError(f"faults: expected a Faults, got {type(faults).__name__}")
        self._faults = faults
        self._rng = random.Random(faults.seed)
        self._left = faults.chat_next

    def clear(self) -> None:
        """No faults from now on (a counter reset already made stays: counters never go back)."""
        self.set(Faults())

    def reset_counters(self, current: EngineMetrics) -> None:
        """Make every exposed counter start again from 0 now, as after a server restart.

        ``current`` is the engine's snapshot now; later scrapes show counters minus it.
        """
        self._baseline = current
        self._created_s = time.time()
        self._resets += 1

    def statistics(self) -> FaultStatistics:
        """What was injected so far."""
        return FaultStatistics(
            chat_calls=self._chat_calls,
            chat_faulted=self._chat_faulted,
            metrics_scrapes=self._scrapes,
            metrics_faulted=self._metrics_faulted,
            counter_resets=self._resets,
            chat_next_left=self._left,
        )

    # -- hooks the app calls -----------------------------------------------------------------

    def visible_metrics(
        self, metrics: EngineMetrics, created_s: float
    ) -> tuple[EngineMetrics, float]:
        """The snapshot and ``*_created`` time to expose: unchanged unless counters were reset."""
        base = self._baseline
        if base is None:
            return metrics, created_s
        assert self._created_s is not None
        shown = dataclasses.replace(
            metrics,
            num_preemptions=metrics.num_preemptions - base.num_preemptions,
            prefix_cache_queries=metrics.prefix_cache_queries - base.prefix_cache_queries,
            prefix_cache_hits=metrics.prefix_cache_hits - base.prefix_cache_hits,
            prompt_tokens=metrics.prompt_tokens - base.prompt_tokens,
            prompt_tokens_cached=metrics.prompt_tokens_cached - base.prompt_tokens_cached,
            generation_tokens=metrics.generation_tokens - base.generation_tokens,
            request_success=_subtract(metrics.request_success, base.request_success),
            finished_by_preemptions={
                k: v
                for k, v in _subtract(
                    metrics.finished_by_preemptions, base.finished_by_preemptions
                ).items()
                if v
            },
        )
        return shown, self._created_s

    async def metrics_fault(self, render: Callable[[], bytes]) -> Response | None:
        """The faulted answer to a ``GET /metrics``, or ``None`` to answer normally.

        ``render`` renders the normal page. ``"slow"`` sleeps here, then answers normally
        (``None``), so the page shows the engine as it is when the answer finally comes.
        """
        self._scrapes += 1
        fault = self._faults
        if fault.metrics == "none":
            return None
        self._metrics_faulted += 1
        if fault.metrics == "slow":
            await asyncio.sleep(fault.metrics_delay_s)
            return None
        if fault.metrics == "down":
            return _Disconnect()
        if fault.metrics == "error":
            return _error(fault.metrics_status, "the metrics endpoint is unavailable", None)
        if fault.metrics == "garbage":
            return Response(GARBAGE_BODY, media_type="text/plain; charset=utf-8")
        if fault.metrics == "truncated":
            return Response(
                truncate_page(render()),
                media_type=None,
                headers={"content-type": METRICS_CONTENT_TYPE},
            )
        return Response(HTML_BODY, media_type="text/html")

    async def chat_fault(self, request: Request) -> Response | None:
        """The faulted answer to a chat call, or ``None`` to serve it normally."""
        self._chat_calls += 1
        fault = self._faults
        if fault.chat == "none" or self._left == 0:
            return None
        if fault.chat_fraction < 1 and self._rng.random() >= fault.chat_fraction:
            return None
        if self._left is not None:
            self._left -= 1
        self._chat_faulted += 1
        if fault.chat == "hang":
            await _until_disconnect(request.receive)
            # The client is gone: nobody reads this.
            return Response(status_code=499)
        return _error(fault.chat_status, "injected fault", fault.chat_retry_after_s)

    # -- the admin routes --------------------------------------------------------------------

    def routes(self, engine_metrics: Callable[[], EngineMetrics]) -> list[Route]:
        """``/_sim/faults`` (GET, POST) and ``/_sim/reset-counters`` (POST).

        ``engine_metrics`` returns the engine's snapshot (for the counter reset).
        """

        async def show(request: Request) -> Response:
            return JSONResponse(self._describe())

        async def change(request: Request) -> Response:
            try:
                data = json.loads(await request.body() or b"{}")
                faults = Faults.from_json(data)
            except json.JSONDecodeError as exc:
                return _error(400, f"faults: the body is not JSON: {exc}", None)
            except (ConfigError, TypeError) as exc:
                return _error(400, str(exc), None)
            self.set(faults)
            return JSONResponse(self._describe())

        async def reset(request: Request) -> Response:
            self.reset_counters(engine_metrics())
            return JSONResponse(self._describe())

        return [
            Route("/_sim/faults", show, methods=["GET"]),
            Route("/_sim/faults", change, methods=["POST"]),
            Route("/_sim/reset-counters", reset, methods=["POST"]),
        ]

    def _describe(self) -> dict[str, Any]:
        return {
            "faults": self._faults.to_json(),
            "statistics": dataclasses.asdict(self.statistics()),
        }


def truncate_page(page: bytes) -> bytes:
    """``page`` cut after the KV-usage sample line (``vllm:kv_cache_usage_perc``, or
    ``sglang:token_usage`` on an SGLang page; what ``"truncated"`` serves): the gauges before
    it survive, every counter after it is gone."""
    lines = page.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.startswith((b"vllm:kv_cache_usage_perc{", b"sglang:token_usage{")):
            return b"".join(lines[: index + 1])
    return page


def _error(status: int, message: str, retry_after_s: float | None) -> JSONResponse:
    """vLLM's error shape (``{"error": {message, type, param, code}}``) with any status."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # a status with no standard name, e.g. 499
        phrase = ""
    # vLLM's style: "InternalServerError", "ServiceUnavailableError", "TooManyRequestsError".
    name = phrase.replace(" ", "").replace("-", "")
    body = {
        "error": {
            "message": message,
            "type": name if name.endswith("Error") else name + "Error",
            "param": None,
            "code": status,
        }
    }
    headers = None if retry_after_s is None else {"retry-after": f"{retry_after_s:g}"}
    return JSONResponse(body, status_code=status, headers=headers)


class _Disconnect(Response):
    """Sends the status line and headers, then drops the connection."""

    def __init__(self) -> None:
        super().__init__(b"", status_code=200, media_type="text/plain")
        # A body is promised and never sent: the peer sees the connection end mid-answer.
        self.headers["content-length"] = "4096"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        raise SimulatedDisconnect("server closed the connection without sending the body")


async def _until_disconnect(receive: Receive) -> None:
    # The body comes first; after it, receive() returns only when the client goes away
    # (uvicorn) or never (ASGITransport, where cancelling the request ends the wait).
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class TimeoutASGITransport(httpx.AsyncBaseTransport):
    """``httpx.ASGITransport`` that enforces httpx's read timeout, as a socket would.

    ``httpx.ASGITransport`` ignores timeouts, so in-process a server that never answers makes
    its client wait forever, also in virtual time. This transport fails a request with
    ``httpx.ReadTimeout`` when the app sends nothing (no status line, no body chunk) for the
    request's read timeout, and cancels the app's handler, as a client closing its socket
    makes a server do. Requests without a read timeout run as on ``ASGITransport``.

    Args:
        app: the ASGI app (``SimServer.app``).
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        read = timeouts.get("read")
        if read is None:
            return await httpx.ASGITransport(app=self._app).handle_async_request(request)
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        app = self._app

        async def watched(scope: Scope, receive: Receive, send: Send) -> None:
            async def send_and_note(message: Message) -> None:
                nonlocal last_sent
                last_sent = loop.time()
                await send(message)

            await app(scope, receive, send_and_note)

        inner = httpx.ASGITransport(app=watched)
        task = asyncio.ensure_future(inner.handle_async_request(request))
        try:
            while not task.done():
                deadline = last_sent + read
                try:
                    async with asyncio.timeout_at(deadline):
                        await asyncio.wait({task})
                except TimeoutError:
                    # The loop's own verdict that the deadline passed, not a clock comparison:
                    # a timer within the clock's resolution fires without the (virtual) clock
                    # reaching it, and comparing times would then spin forever.
                    if last_sent + read <= deadline:
                        break  # silent for the whole read timeout
            else:
                return task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        raise httpx.ReadTimeout(
            f"no data from the server for {read:g} s (read timeout)", request=request
        )
