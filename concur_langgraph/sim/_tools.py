"""Tool calls: when the simulator answers with one, which tool, and with what arguments.

A real vLLM returns tool calls only when it runs with a tool parser (``--enable-auto-tool-choice
--tool-call-parser ...``) and serves a model that calls tools. The simulator has no model: its
tool calls stand in for such a model, deterministically.

* **When** (``tool_choice``, vLLM's rules for absent and invalid values): ``"none"``, or no
  tools, never; ``"required"`` or a named function (``{"type": "function", "function":
  {"name": ...}}``) always, as vLLM forces those with structured output whatever the model;
  ``"auto"``, the default when tools are given, for the first N turns after the
  conversation's last user message. N is drawn in ``SimConfig.tool_call_turns`` by a hash of
  ``SimConfig.seed`` and that message's text; a turn is an assistant message with tool calls
  after it, so the count restarts with each user message and a conversation sent again gets
  the same answer.
* **Which tool**: one call per answer (no parallel calls). Turn ``t`` calls the function
  tool at ``(h + t) % len(tools)`` (``h`` from the same hash), so consecutive turns go round
  the tools; a named ``tool_choice`` calls that one.
* **Arguments**: a JSON object made from the tool's ``parameters`` schema, filling its
  required properties (:func:`arguments_for`): strings ``"<property>-<turn>"``, the turn
  counted from 1 (or a value of their ``format``), numbers their ``minimum`` or 1, booleans
  true, ``enum`` / ``const`` their first value, arrays their ``minItems`` items, objects their
  own required properties, ``anyOf`` / ``oneOf`` / ``allOf`` their first non-null branch,
  ``$ref`` resolved in the schema (``$defs``). Enough for
  langchain tools built from type hints or pydantic models to validate; ``pattern`` and
  ``multipleOf`` are not honoured. The string is ``json.dumps(args, ensure_ascii=False)``, what
  langchain sends back, so the next prompt re-tokenizes it to the ids the engine generated.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["ToolCall", "arguments_for", "plan_tool_call", "resolve_tool_choice"]

_MAX_DEPTH: Final = 8
"""Schemas nest at most this deep before a value is cut to null (recursive ``$ref``)."""
_FORMATS: Final = {
    "date": "2024-01-01",
    "date-time": "2024-01-01T00:00:00Z",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com",
    "url": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
}
"""Strings for the JSON-schema formats pydantic emits (a tool taking a ``date`` validates)."""
_CORRECT_USAGE: Final = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    """The tool call an answer carries."""

    name: str
    """The function's name."""
    arguments: str
    """The arguments, a JSON object as text."""
    forced: bool
    """Asked for by ``tool_choice`` (``"required"`` or a named function): vLLM then answers
    ``content=""`` where its ``"auto"`` tool parser answers ``null``."""

    def function(self) -> dict[str, str]:
        """The call's ``function`` object, as in the answer and as clients send it back."""
        return {"name": self.name, "arguments": self.arguments}


def _function_names(tools: Sequence[Any]) -> list[str]:
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(tool, Mapping) and tool.get("type", "function") == "function" and name:
            names.append(str(name))
    return names


def resolve_tool_choice(tools: Sequence[Any] | None, tool_choice: object) -> tuple[str, str | None]:
    """The effective choice, ``("none" | "auto" | "required" | "named", name)``, as vLLM 0.32
    reads a request's ``tools`` and ``tool_choice``.

    Raises ``ValueError`` with vLLM's message for a choice it refuses.
    """
    if tool_choice is None:
        return ("auto", None) if tools else ("none", None)
    if tool_choice == "none":
        return "none", None
    if tools is None:
        raise ValueError("When using `tool_choice`, `tools` must be set.")
    if tool_choice == "auto":
        return ("auto", None) if tools else ("none", None)
    if tool_choice == "required":
        # As OpenAI: "required" with an empty tool list behaves like "none".
        return ("required", None) if tools else ("none", None)
    if not isinstance(tool_choice, Mapping):
        raise ValueError(
            f"Invalid value for `tool_choice`: {tool_choice}! Only named tools, "
            '"none", "auto" or "required" are supported.'
        )
    function = tool_choice.get("function")
    if not isinstance(function, Mapping):
        raise ValueError(
            f"Invalid value for `function`: `{function}` in `tool_choice`! {_CORRECT_USAGE}"
        )
    if "name" not in function:
        raise ValueError(f"Expected field `name` in `function` in `tool_choice`! {_CORRECT_USAGE}")
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_CORRECT_USAGE}"
        )
    if name not in _function_names(tools):
        raise ValueError(
            "The tool specified in `tool_choice` does not match any of the specified `tools`"
        )
    return "named", name


def _conversation(messages: Sequence[Mapping[str, Any]]) -> tuple[str, int]:
    """The last user message's text and the assistant turns with tool calls after it."""
    key, turn = "", 0
    for message in messages:
        role = message.get("role")
        if role == "user":
            content = message.get("content")
            key = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
            turn = 0
        elif role == "assistant" and message.get("tool_calls"):
            turn += 1
    return key, turn


def plan_tool_call(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] | None,
    choice: tuple[str, str | None],
    *,
    turns: tuple[int, int],
    seed: int,
) -> ToolCall | None:
    """The tool call that answers this conversation, or None for a text answer.

    ``choice`` is :func:`resolve_tool_choice`'s; ``turns`` and ``seed`` are
    ``SimConfig.tool_call_turns`` and ``SimConfig.seed`` (see the module docstring).
    """
    mode, named = choice
    if mode == "none" or not tools:
        return None
    names = _function_names(tools)
    if not names:
        return None
    key, turn = _conversation(messages)
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "big")
    if mode == "auto":
        least, most = turns
        if turn >= least + h % (most - least + 1):
            return None
    name = named if named is not None else names[((h >> 32) + turn) % len(names)]
    parameters: object = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and function.get("name") == name:
            parameters = function.get("parameters") or {}
            break
    args = arguments_for(parameters, turn=turn)
    return ToolCall(
        name=name, arguments=json.dumps(args, ensure_ascii=False), forced=mode != "auto"
    )


def arguments_for(parameters: object, *, turn: int = 0) -> dict[str, Any]:
    """Arguments satisfying a function's ``parameters`` JSON schema (module docstring)."""
    if not isinstance(parameters, Mapping):
        return {}
    value = _value(parameters, parameters, "value", turn, 0)
    return value if isinstance(value, dict) else {}


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    for _ in range(_MAX_DEPTH):
        if not isinstance(ref, str) or not ref.startswith("#/"):
            break
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        if not isinstance(target, Mapping):
            return {}
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        ref = target.get("$ref")
    return schema


def _value(
    schema: Mapping[str, Any], root: Mapping[str, Any], name: str, turn: int, depth: int
) -> Any:
    if depth > _MAX_DEPTH:
        return None
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for combinator in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(combinator)
        if isinstance(branches, list) and branches:
            usable = [b for b in branches if isinstance(b, Mapping) and b.get("type") != "null"]
            if usable:
                return _value(usable[0], root, name, turn, depth + 1)
            return None
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        required = schema.get("required")
        wanted = set(required) if isinstance(required, list) else set()
        # Keys in the schema's order: the JSON text (and its tokens) is stable.
        ordered = [key for key in properties if key in wanted]
        ordered += sorted(str(key) for key in wanted if key not in properties)
        return {
            key: _value(_as_schema(properties.get(key)), root, key, turn, depth + 1)
            for key in ordered
        }
    if kind == "array":
        items = _as_schema(schema.get("items"))
        count = _number(schema.get("minItems")) or 0
        return [_value(items, root, name, turn, depth + 1) for _ in range(int(count))]
    if kind in ("integer", "number"):
        return _numeric(schema, integer=kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = _FORMATS.get(str(schema.get("format")), f"{name}-{turn + 1}")
    least, most = _number(schema.get("minLength")), _number(schema.get("maxLength"))
    if least is not None and len(text) < least:
        text += "x" * (int(least) - len(text))
    if most is not None and len(text) > most:
        text = text[: int(most)]
    return text


def _as_schema(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _numeric(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    step = 1.0 if integer else 0.5
    low, high = _number(schema.get("minimum")), _number(schema.get("maximum"))
    low_x, high_x = _number(schema.get("exclusiveMinimum")), _number(schema.get("exclusiveMaximum"))
    if low is None and low_x is not None:
        low = math.floor(low_x) + 1.0 if integer else low_x + step
    if high is None and high_x is not None:
        high = math.ceil(high_x) - 1.0 if integer else high_x - step
    value = low if low is not None else 1.0
    if integer:
        value = float(math.ceil(value))
    if high is not None and value > high:
        value = float(math.floor(high)) if integer else high
    return int(value) if integer else float(value)
