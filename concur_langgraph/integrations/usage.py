"""The token usage of a finished LLM call, as LangChain reports it.

The gate's accounting needs each call's prompt and completion tokens. LangChain's standard place
is the message's ``usage_metadata`` (``input_tokens``, ``output_tokens``), which ChatOpenAI fills
from the OpenAI response's ``usage`` (with ``stream_usage=True`` for streamed calls); older
clients put the raw ``token_usage`` in ``LLMResult.llm_output``. Both are read, in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["usage_of_message", "usage_of_result"]


def _pair(prompt: object, completion: object) -> tuple[int, int] | None:
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None


def usage_of_message(message: Any) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` of an AI message, or ``None`` without usage."""
    usage = getattr(message, "usage_metadata", None)
    if isinstance(usage, Mapping):
        return _pair(usage.get("input_tokens"), usage.get("output_tokens"))
    return None


def usage_of_result(result: Any) -> tuple[int, int] | None:
    """The usage of an ``LLMResult`` (the callback handler's ``on_llm_end``), or ``None``."""
    for generations in getattr(result, "generations", None) or ():
        for generation in generations:
            found = usage_of_message(getattr(generation, "message", None))
            if found is not None:
                return found
    output = getattr(result, "llm_output", None)
    if isinstance(output, Mapping):
        usage = output.get("token_usage")
        if isinstance(usage, Mapping):
            return _pair(usage.get("prompt_tokens"), usage.get("completion_tokens"))
    return None
