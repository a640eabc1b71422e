"""The simulator's tokenizer: word counts, stable ids, round trips, the chat template."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from concur_langgraph.sim._tokenizer import (
    EOS_TOKEN_ID,
    FIRST_WORD_ID,
    GENERATION_PROMPT_TOKENS,
    IM_END_ID,
    IM_START_ID,
    MESSAGE_OVERHEAD,
    Tokenizer,
    message_text,
)

TOK = Tokenizer()


def test_one_token_per_whitespace_separated_word() -> None:
    assert len(TOK.encode("the  quick\tbrown\nfox ")) == 4
    assert TOK.encode("") == []
    assert TOK.count("a b  c") == 3


def test_ids_are_stable_across_processes_and_avoid_special_ids() -> None:
    words = ["hello", "world", "Hello", "naïve", '{"x":', "1}"]
    here = TOK.encode(" ".join(words))
    code = (
        "from concur_langgraph.sim._tokenizer import Tokenizer;"
        f"print(Tokenizer().encode({' '.join(words)!r}))"
    )
    # A fresh interpreter with another hash seed: ids must not depend on hash().
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout
    assert out.strip() == str(here)
    assert all(FIRST_WORD_ID <= i < TOK.vocab_size for i in here)
    assert here[0] != here[2]  # case matters


@given(st.lists(st.integers(min_value=FIRST_WORD_ID, max_value=31_999), max_size=50))
def test_generated_ids_round_trip_exactly(ids: list[int]) -> None:
    text = TOK.decode(ids)
    assert len(text.split()) == len(ids)
    assert TOK.encode(text) == ids


@given(st.lists(st.integers(min_value=FIRST_WORD_ID, max_value=999), max_size=20))
def test_round_trip_holds_for_small_vocabularies(ids: list[int]) -> None:
    small = Tokenizer(vocab_size=1000)
    assert small.encode(small.decode(ids)) == ids


def test_special_ids_decode_to_nothing_and_out_of_range_ids_are_refused() -> None:
    word = TOK.token_text(FIRST_WORD_ID + 7)
    assert TOK.decode([FIRST_WORD_ID + 7, EOS_TOKEN_ID]) == word
    assert TOK.decode([IM_START_ID, FIRST_WORD_ID + 7]) == word
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.token_text(TOK.vocab_size)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer(vocab_size=FIRST_WORD_ID)


def test_pseudo_words_are_pronounceable_and_distinct() -> None:
    words = [TOK.token_text(i) for i in range(FIRST_WORD_ID, FIRST_WORD_ID + 500)]
    assert len(set(words)) == 500
    assert all(len(w) == 6 and w.isalpha() and w.islower() for w in words)


def test_chat_template_adds_fixed_overhead_per_message() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is a KV cache?"},
    ]
    ids = TOK.apply_chat_template(messages)
    content_tokens = 3 + 5
    assert len(ids) == content_tokens + 2 * MESSAGE_OVERHEAD + GENERATION_PROMPT_TOKENS
    assert ids[0] == IM_START_ID
    assert ids[-2] == IM_START_ID
    assert ids[-1] == TOK.word_id("assistant")
    assert ids.count(IM_END_ID) == 2
    without_prompt = TOK.apply_chat_template(messages, add_generation_prompt=False)
    assert without_prompt == ids[:-GENERATION_PROMPT_TOKENS]


def test_multipart_content_tool_calls_and_tool_messages_tokenize() -> None:
    multipart = {
        "role": "user",
        "content": [{"type": "text", "text": "hello there"}, {"type": "text", "text": "world"}],
    }
    assert message_text(multipart) == "hello there world"
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "search", "arguments": '{"q": "kv cache"}'},
            }
        ],
    }
    same_call_other_id = {
        **call,
        "tool_calls": [{**call["tool_calls"][0], "id": "call_xyz"}],  # type: ignore[index]
    }
    tool = {"role": "tool", "tool_call_id": "call_abc", "content": "42 results"}
    ids = TOK.apply_chat_template([multipart, call, tool])
    # The random call id does not change the tokens, so a resent history stays a prefix.
    assert ids == TOK.apply_chat_template([multipart, same_call_other_id, tool])
    assert len(ids) == (
        3 + len(message_text(call).split()) + 2 + 3 * MESSAGE_OVERHEAD + GENERATION_PROMPT_TOKENS
    )
    assert "search" in message_text(call)


def test_tools_are_a_shared_leading_segment() -> None:
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    plain = TOK.apply_chat_template([{"role": "user", "content": "hi"}])
    with_tools = TOK.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools)
    assert with_tools[-len(plain) :] == plain
    assert with_tools[0] == IM_START_ID
    assert len(with_tools) > len(plain) + MESSAGE_OVERHEAD


def test_assistant_reply_resent_extends_the_prompt_exactly() -> None:
    # The next turn's prompt starts with the previous prompt plus the generated ids: what the
    # prefix cache needs to cover a conversation across turns.
    history = [{"role": "user", "content": "plan the task"}]
    prompt = TOK.apply_chat_template(history)
    generated = [FIRST_WORD_ID + 3, FIRST_WORD_ID + 900, FIRST_WORD_ID + 31_000]
    history += [
        {"role": "assistant", "content": TOK.decode(generated)},
        {"role": "user", "content": "next"},
    ]
    next_prompt = TOK.apply_chat_template(history)
    assert next_prompt[: len(prompt) + len(generated)] == prompt + generated
    assert next_prompt[len(prompt) + len(generated)] == EOS_TOKEN_ID


def test_message_without_role_is_refused() -> None:
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        TOK.apply_chat_template([{"role": "user", "content": "x"}, {"content": "y"}])


def test_text_memo_is_bounded_and_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    import concur_langgraph.sim._tokenizer as module

    monkeypatch.setattr(module, "_MAX_CACHED_TOKENS", 100)
    memo = Tokenizer()
    texts = [" ".join(f"word{i}-{j}" for j in range(30)) for i in range(10)]
    for _ in range(2):
        for text in texts:
            assert memo.encode(text) == Tokenizer().encode(text)
    assert memo._cached_tokens <= 100
    assert sum(len(ids) for ids in memo._texts.values()) == memo._cached_tokens
