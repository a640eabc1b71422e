"""Capture a real vLLM server's answers to the requests the simulator must answer alike.

Writes ``vllm_cpu_0.32.0_responses.json`` next to this file: for each case the request, the
HTTP status, the content type and the body (JSON when it parses). The simulator's tests compare
its own answers with these (status, error type/param/message, field sets).

The server it was captured from (vllm-cpu 0.32.0, the tiny model of
/work/shared/reference/vllm-cpu/recipe.sh)::

    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name tiny \
      --host 127.0.0.1 --port 8031 --dtype bfloat16 --max-model-len 2048 \
      --enable-prefix-caching --kv-cache-memory-bytes 16777216 --enforce-eager \
      --enable-prompt-tokens-details --enable-auto-tool-choice --tool-call-parser hermes

Usage: python capture_vllm_cpu_responses.py [BASE_URL]   (default http://127.0.0.1:8031)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx

MODEL = "tiny"
MAX_MODEL_LEN = 2048
_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hello world"}],
    "max_tokens": 5,
    "ignore_eos": True,
}
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get",
            "description": "d",
            "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
        },
    }
]
_LONG = " ".join(["hello world"] * 1500)  # far over 2048 tokens for any tokenizer
_MID = " ".join(["hello world"] * 600)  # under 2048 tokens, but not with max_tokens=2000

CASES: dict[str, dict[str, Any]] = {
    "health": {"method": "GET", "path": "/health"},
    "models": {"method": "GET", "path": "/v1/models"},
    "chat": {"json": _BODY},
    "chat_stream_usage": {
        "json": {**_BODY, "stream": True, "stream_options": {"include_usage": True}}
    },
    "chat_stream": {"json": {**_BODY, "stream": True}},
    "chat_tools": {"json": {**_BODY, "tools": _TOOLS}},
    "chat_no_model": {"json": {k: v for k, v in _BODY.items() if k != "model"}},
    "prompt_plus_max_tokens_over_len": {
        "json": {**_BODY, "messages": [{"role": "user", "content": _MID}], "max_tokens": 2000}
    },
    "unknown_model": {"json": {**_BODY, "model": "nope"}},
    "missing_messages": {"json": {"model": MODEL}},
    "messages_not_list": {"json": {"model": MODEL, "messages": "hi"}},
    "empty_messages": {"json": {"model": MODEL, "messages": []}},
    "max_tokens_not_int": {"json": {**_BODY, "max_tokens": "x"}},
    "max_tokens_zero": {"json": {**_BODY, "max_tokens": 0}},
    "max_tokens_negative": {"json": {**_BODY, "max_tokens": -1}},
    "max_tokens_over_len": {"json": {**_BODY, "max_tokens": 5000}},
    "max_completion_tokens_over_len": {"json": {**_BODY, "max_completion_tokens": 5000}},
    "min_tokens_over_max": {"json": {**_BODY, "max_tokens": 3, "min_tokens": 5}},
    "prompt_over_len": {"json": {**_BODY, "messages": [{"role": "user", "content": _LONG}]}},
    "stream_options_without_stream": {"json": {**_BODY, "stream_options": {"include_usage": True}}},
    "malformed_json": {"content": b"{not json"},
    "json_array": {"content": b"[1,2]"},
    "empty_body": {"content": b""},
    "get_chat": {"method": "GET", "path": "/v1/chat/completions"},
    "unknown_route": {"method": "GET", "path": "/nope"},
}


def _capture(client: httpx.Client, case: dict[str, Any]) -> dict[str, Any]:
    method = case.get("method", "POST")
    path = case.get("path", "/v1/chat/completions")
    if "json" in case:
        response = client.request(method, path, json=case["json"])
    elif "content" in case:
        response = client.request(
            method, path, content=case["content"], headers={"content-type": "application/json"}
        )
    else:
        response = client.request(method, path)
    record: dict[str, Any] = {
        "request": {
            "method": method,
            "path": path,
            **({"json": case["json"]} if "json" in case else {}),
            **({"content": case["content"].decode()} if "content" in case else {}),
        },
        "status": response.status_code,
        "content_type": response.headers.get("content-type"),
    }
    try:
        record["json"] = response.json()
    except ValueError:
        record["text"] = response.text
    return record


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8031"
    with httpx.Client(base_url=base, timeout=120) as client:
        captured = {name: _capture(client, case) for name, case in CASES.items()}
    out = Path(__file__).with_name("vllm_cpu_0.32.0_responses.json")
    out.write_text(json.dumps(captured, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({len(captured)} cases)")


if __name__ == "__main__":
    main()
