"""Tool calls from the simulator: when, which tool, what arguments, and their shape on the wire.

The server tests run in virtual time on ``test-tiny`` with ``tool_call_turns`` set; the shapes
are OpenAI's / vLLM's with a tool parser (``message.tool_calls``, ``delta.tool_calls``,
``finish_reason="tool_calls"``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import httpx
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from concur_langgraph import ConfigError, vtime
from concur_langgraph.sim import SimConfig, SimServer, Tokenizer, get_preset
from concur_langgraph.sim._cli import parse_tool_call_turns
from concur_langgraph.sim._tools import arguments_for, plan_tool_call, resolve_tool_choice

T = TypeVar("T")

MODEL = "test-tiny"
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query", "limit"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}
TOOLS = [SEARCH, CLOCK]


def sim_config(turns: tuple[int, int] = (0, 0), **changes: Any) -> SimConfig:
    return dataclasses.replace(get_preset(MODEL), tool_call_turns=turns, **changes)


def run(factory: Callable[[SimServer], Awaitable[T]], config: SimConfig) -> T:
    async def main() -> T:
        async with SimServer(config) as server:
            return await factory(server)

    return vtime.run(main())


def body(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "tools": TOOLS, **extra}


async def converse(
    client: httpx.AsyncClient, question: str, *, limit: int = 10, **extra: Any
) -> list[dict[str, Any]]:
    """Answer every tool call with a tool message until a text answer; the answers' choices."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    choices = []
    for _ in range(limit):
        answer = await client.post("/v1/chat/completions", json=body(messages, **extra))
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        choices.append(choice)
        message = choice["message"]
        if choice["finish_reason"] != "tool_calls":
            return choices
        messages.append(
            {
                "role": "assistant",
                "content": message["content"],
                "tool_calls": message["tool_calls"],
            }
        )
        call_id = message["tool_calls"][0]["id"]
        messages.append({"role": "tool", "tool_call_id": call_id, "content": "nothing found"})
    return choices


def sse_events(text: str) -> list[Any]:
    payloads = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


# -- arguments from JSON schemas -------------------------------------------------------------
def test_arguments_fill_the_required_properties_by_type() -> None:
    schema = {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "count": {"type": "integer", "minimum": 3, "maximum": 9},
            "above": {"type": "integer", "exclusiveMinimum": 5},
            "ratio": {"type": "number", "maximum": 0.5},
            "exact": {"type": "boolean"},
            "mode": {"enum": ["fast", "slow"]},
            "fixed": {"const": 7},
            "tags": {"type": "array", "items": {"type": "string"}},
            "pair": {"type": "array", "items": {"type": "integer"}, "minItems": 2},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "string", "format": "date"}]},
            "either": {"type": ["null", "boolean"]},
            "code": {"type": "string", "minLength": 10},
            "inner": {"$ref": "#/$defs/Inner"},
            "optional": {"type": "string"},
        },
        "required": [
            "query", "count", "above", "ratio", "exact", "mode", "fixed", "tags", "pair",
            "maybe", "either", "code", "inner",
        ],
        "$defs": {
            "Inner": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "extra": {"type": "integer"}},
                "required": ["name"],
            }
        },
    }  # fmt: skip
    args = arguments_for(schema, turn=1)
    assert args == {
        "query": "query-2",
        "count": 3,
        "above": 6,
        "ratio": 0.5,
        "exact": True,
        "mode": "fast",
        "fixed": 7,
        "tags": [],
        "pair": [1, 1],
        "maybe": "2024-01-01",
        "either": True,
        "code": "code-2xxxx",
        "inner": {"name": "name-2"},
    }
    assert list(args) == schema["required"]  # the schema's order: a stable JSON text
    assert arguments_for({}) == {} and arguments_for(None) == {}


class Window(BaseModel):
    start: datetime.date
    days: int = Field(ge=1, le=30)


@tool
def book(room: str, guests: int, window: Window, kind: Literal["desk", "hall"]) -> str:
    """Book a room."""
    return room


@tool
def convert(amount: float, currencies: list[str], exact: bool | None = None) -> str:
    """Convert an amount."""
    return str(amount)


@pytest.mark.parametrize("chosen", [book, convert], ids=lambda t: t.name)
def test_arguments_validate_against_langchain_tools(chosen: BaseTool) -> None:
    parameters = convert_to_openai_tool(chosen)["function"]["parameters"]
    args = json.loads(json.dumps(arguments_for(parameters)))
    assert chosen.args_schema is not None
    chosen.args_schema.model_validate(args)  # type: ignore[union-attr]
    assert chosen.invoke(args)


# -- tool_choice ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tools", "choice", "expected"),
    [
        (TOOLS, None, ("auto", None)),
        (None, None, ("none", None)),
        ([], None, ("none", None)),
        (TOOLS, "auto", ("auto", None)),
        (TOOLS, "none", ("none", None)),
        (None, "none", ("none", None)),
        (TOOLS, "required", ("required", None)),
        ([], "required", ("none", None)),
        (TOOLS, {"type": "function", "function": {"name": "clock"}}, ("named", "clock")),
    ],
)
def test_tool_choice_is_read_as_vllm_reads_it(
    tools: list[Any] | None, choice: object, expected: tuple[str, str | None]
) -> None:
    assert resolve_tool_choice(tools, choice) == expected


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (None, "auto", "When using `tool_choice`, `tools` must be set."),
        (TOOLS, "sometimes", "Invalid value for `tool_choice`: sometimes!"),
        (TOOLS, {"type": "function"}, "Invalid value for `function`: `None`"),
        (TOOLS, {"function": {}}, "Expected field `name` in `function`"),
        (TOOLS, {"function": {"name": "nope"}}, "does not match any of the specified `tools`"),
    ],
)
def test_bad_tool_choices_are_refused_over_http(
    tools: list[Any] | None, choice: object, message: str
) -> None:
    with pytest.raises(ValueError, match="tool"):
        resolve_tool_choice(tools, choice)

    async def go(server: SimServer) -> httpx.Response:
        request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        if tools is not None:
            request["tools"] = tools
        async with server.http_client() as client:
            return await client.post(
                "/v1/chat/completions", json={**request, "tool_choice": choice}
            )

    response = run(go, sim_config())
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("Bad Request", "body", 400)
    assert error["message"].startswith("1 validation error:\n  {'type': 'value_error'")
    assert message in error["message"]


# -- when, and how many turns ----------------------------------------------------------------
def test_a_tool_call_answer_has_vllms_shape_and_counts_its_tokens() -> None:
    async def go(server: SimServer) -> dict[str, Any]:
        request = body([{"role": "user", "content": "find the paper"}], tool_choice="required")
        async with server.http_client() as client:
            response = await client.post("/v1/chat/completions", json=request)
        assert response.status_code == 200
        answer: dict[str, Any] = response.json()
        return answer

    answer = run(go, sim_config())
    choice = answer["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert list(message) == [
        "role", "content", "refusal", "annotations", "audio", "function_call", "tool_calls",
        "reasoning",
    ]  # fmt: skip
    assert message["content"] == ""  # a forced call: vLLM's structured output has no text
    (call,) = message["tool_calls"]
    assert call["id"].startswith("chatcmpl-tool-")
    assert call["type"] == "function"
    assert call["function"]["name"] in ("search", "clock")
    args = json.loads(call["function"]["arguments"])
    assert args == (
        {"query": "query-1", "limit": 1} if call["function"]["name"] == "search" else {}
    )
    # What the engine generated is the call's text as the template tokenizes it, then EOS.
    text = json.dumps(call["function"], sort_keys=True)
    assert answer["usage"]["completion_tokens"] == len(text.split()) + 1


def test_auto_calls_tools_for_the_configured_turns_then_answers() -> None:
    async def go(server: SimServer) -> list[dict[str, Any]]:
        async with server.http_client() as client:
            return await converse(client, "find the paper", max_tokens=12, ignore_eos=True)

    choices = run(go, sim_config((2, 2)))
    assert [c["finish_reason"] for c in choices] == ["tool_calls", "tool_calls", "length"]
    names = [c["message"]["tool_calls"][0]["function"]["name"] for c in choices[:2]]
    assert sorted(names) == ["clock", "search"]  # consecutive turns go round the tools
    for choice in choices[:2]:
        # ignore_eos: free text fills max_tokens before the call; "auto" has no "" content.
        content = choice["message"]["content"]
        assert content and len(content.split()) == 12 - len(
            json.dumps(choice["message"]["tool_calls"][0]["function"], sort_keys=True).split()
        )
    final = choices[-1]["message"]
    assert "tool_calls" not in final and len(final["content"].split()) == 12


def test_turns_are_drawn_per_conversation_deterministically() -> None:
    questions = [f"question {i}" for i in range(12)]

    def counts(config: SimConfig) -> list[int]:
        async def go(server: SimServer) -> list[int]:
            async with server.http_client() as client:
                return [len(await converse(client, q)) - 1 for q in questions]

        return run(go, config)

    first = counts(sim_config((1, 4)))
    assert all(1 <= n <= 4 for n in first)
    assert len(set(first)) > 1
    assert counts(sim_config((1, 4))) == first  # same seed, same conversations
    assert counts(sim_config((1, 4), seed=1)) != first
    assert counts(sim_config((0, 0))) == [0] * 12  # the default never calls a tool unasked


def test_the_count_restarts_with_each_user_message() -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "clock"}}]},
        {"role": "tool", "content": "noon", "tool_call_id": "a"},
        {"role": "assistant", "content": "it is noon"},
    ]
    plan = {"choice": ("auto", None), "turns": (1, 1), "seed": 0}
    assert plan_tool_call(messages, TOOLS, **plan) is None  # type: ignore[arg-type]
    again = [*messages, {"role": "user", "content": "and now?"}]
    assert plan_tool_call(again, TOOLS, **plan) is not None  # type: ignore[arg-type]


def test_tool_choice_none_never_calls_and_required_or_named_always_does() -> None:
    async def go(server: SimServer) -> dict[str, list[dict[str, Any]]]:
        async with server.http_client() as client:
            return {
                "none": await converse(client, "q", tool_choice="none"),
                "required": await converse(client, "q", limit=4, tool_choice="required"),
                "named": await converse(
                    client,
                    "q",
                    limit=4,
                    tool_choice={"type": "function", "function": {"name": "search"}},
                ),
            }

    out = run(go, sim_config((1, 1)))
    assert [c["finish_reason"] for c in out["none"]] in (["stop"], ["length"])
    assert "tool_calls" not in out["none"][0]["message"]
    # Beyond the configured turns: still a call every time.
    assert [c["finish_reason"] for c in out["required"]] == ["tool_calls"] * 4
    assert [c["finish_reason"] for c in out["named"]] == ["tool_calls"] * 4
    named = [c["message"]["tool_calls"][0]["function"]["name"] for c in out["named"]]
    assert named == ["search"] * 4


def test_a_call_cut_by_max_tokens_is_text() -> None:
    async def go(server: SimServer) -> dict[str, Any]:
        request = body([{"role": "user", "content": "q"}], tool_choice="required", max_tokens=2)
        async with server.http_client() as client:
            answer: dict[str, Any] = (
                await client.post("/v1/chat/completions", json=request)
            ).json()
            return answer

    answer = run(go, sim_config())
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "tool_calls" not in choice["message"]
    # The call's first two words, as a tool parser leaves text it cannot parse.
    assert choice["message"]["content"].startswith('{"arguments":')
    assert answer["usage"]["completion_tokens"] == 2


# -- streaming ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_a_streamed_tool_call_is_the_non_streamed_one_in_deltas(ignore_eos: bool) -> None:
    request = body(
        [{"role": "user", "content": "find the paper"}],
        tool_choice="required",
        max_tokens=16,
        ignore_eos=ignore_eos,
    )

    async def plain(server: SimServer) -> dict[str, Any]:
        async with server.http_client() as client:
            answer: dict[str, Any] = (
                await client.post("/v1/chat/completions", json=request)
            ).json()
            return answer

    async def streamed(server: SimServer) -> list[Any]:
        options = {"stream": True, "stream_options": {"include_usage": True}}
        async with server.http_client() as client:
            response = await client.post("/v1/chat/completions", json={**request, **options})
            return sse_events(response.text)

    answer = run(plain, sim_config())
    events = run(streamed, sim_config())
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"] for e in events[1:-2]]
    content = "".join(d.get("content", "") for d in deltas)
    parts = [part for d in deltas for part in d.get("tool_calls", [])]
    assert {part["index"] for part in parts} == {0}
    assert [i for i, part in enumerate(parts) if "id" in part] == [0]
    head = parts[0]
    arguments = "".join(part["function"]["arguments"] for part in parts)
    (call,) = answer["choices"][0]["message"]["tool_calls"]
    assert (head["id"], head["type"], head["function"]["name"]) == (
        call["id"],
        "function",
        call["function"]["name"],
    )
    assert arguments == call["function"]["arguments"]
    assert content == answer["choices"][0]["message"]["content"]
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-2]["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]


# -- through ChatOpenAI: parsing, and the tokens of the next turn -----------------------------
@tool
def search(query: str, limit: int) -> str:
    """Search the web."""
    return f"{limit} results for {query}"


def test_chat_openai_parses_the_calls_and_the_next_prompt_holds_their_tokens() -> None:
    async def go(server: SimServer) -> dict[str, Any]:
        model = server.chat_model().bind_tools([search])
        question = HumanMessage("find the KV cache paper " * 4)
        first = await model.ainvoke([question])
        assert isinstance(first, AIMessage)
        result = ToolMessage(
            content=search.invoke(first.tool_calls[0]["args"]),
            tool_call_id=first.tool_calls[0]["id"],
        )
        second = await model.ainvoke([question, first, result])
        streamed: AIMessageChunk | None = None
        async for chunk in model.astream([HumanMessage("find the KV cache paper " * 4)]):
            assert isinstance(chunk, AIMessageChunk)
            streamed = chunk if streamed is None else streamed + chunk
        return {"first": first, "result": result, "second": second, "streamed": streamed}

    out = run(go, sim_config((1, 1)))
    first, second, streamed = out["first"], out["second"], out["streamed"]
    assert first.response_metadata["finish_reason"] == "tool_calls"
    assert first.tool_calls == [
        {
            "name": "search",
            "args": {"query": "query-1", "limit": 1},
            "id": first.tool_calls[0]["id"],
            "type": "tool_call",
        }
    ]
    assert second.tool_calls == [] and second.response_metadata["finish_reason"] != "tool_calls"
    assert streamed is not None and streamed.tool_calls == [
        {**first.tool_calls[0], "id": streamed.tool_calls[0]["id"]}
    ]
    # The call as langchain sends it back re-tokenizes to the ids the engine generated (the
    # last one EOS, the template's <|im_end|>): the second prompt is the first prompt, the
    # answer, the tool message (3 template tokens + its words) and the generation prompt.
    used, again = first.usage_metadata, second.usage_metadata
    assert used is not None and again is not None
    tool_tokens = 3 + Tokenizer().count(str(out["result"].content))
    assert again["input_tokens"] == used["input_tokens"] + used["output_tokens"] + tool_tokens + 2
    block = get_preset(MODEL).block_size
    expected = (used["input_tokens"] + used["output_tokens"] - 1) // block * block
    assert again["input_token_details"]["cache_read"] == expected


# -- settings ----------------------------------------------------------------------------------
def test_tool_call_turns_flag_and_config_file() -> None:
    assert parse_tool_call_turns("2") == (2, 2)
    assert parse_tool_call_turns("1-3") == (1, 3)
    for bad in ("x", "3-1", "-1", "1-"):
        with pytest.raises(ConfigError, match="--tool-call-turns"):
            parse_tool_call_turns(bad)
    # A JSON config gives a list: read as the pair.
    assert sim_config([1, 3]).tool_call_turns == (1, 3)  # type: ignore[arg-type]
