"""The simulator's tokenizer: cheap, deterministic, and honest about lengths.

The simulator does not run a model, so it does not need a real tokenizer; it needs one that
makes prompt lengths and shared prefixes behave like a real server's:

* **One token per whitespace-separated word.** ``text.split()`` gives the words. A word's id is
  ``FIRST_WORD_ID + zlib.crc32(word) % (vocab_size - FIRST_WORD_ID)``: stable across processes
  and Python versions (unlike ``hash()``), and never one of the reserved special ids below.
* **Generated words round-trip exactly.** :meth:`Tokenizer.decode` spells each generated id as
  a pronounceable pseudo-word of three consonant-vowel syllables (``"kobamu"``), and
  :meth:`Tokenizer.encode` maps such a word back to that very id. So the assistant turn a client
  sends back in its next request re-enters the prompt as the same token ids the engine
  generated, and the prefix cache covers whole conversations across turns, as it does on a real
  server with a real tokenizer.
* **A ChatML-like chat template** (the template of the tiny model in the real-vLLM recipe): each
  message is ``<|im_start|>`` + one role token + the content tokens + ``<|im_end|>``, i.e. its
  content plus :data:`MESSAGE_OVERHEAD` = 3 tokens; the generation prompt
  ``<|im_start|> assistant`` adds :data:`GENERATION_PROMPT_TOKENS` = 2 tokens at the end. A
  request's ``tools`` are rendered first as a pseudo-message with role ``tools`` whose content is
  the tools' JSON (as real templates put tool schemas at the top of the system prompt, so they
  are a shared prefix). Structured parts are tokenized deterministically: the text parts of a
  multi-part content list; any other part as its sorted-key JSON; an assistant message's
  ``tool_calls`` as the sorted-key JSON of each call's ``function`` (name and arguments, not the
  random call id, so resending a conversation gives the same tokens).

The end-of-sequence token is ``<|im_end|>`` (:data:`EOS_TOKEN_ID`), as in ChatML models: a reply
that ends with it and is sent back inside a conversation lines up with the template's own
``<|im_end|>`` after the assistant message. Special ids decode to nothing.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "EOS_TOKEN_ID",
    "FIRST_WORD_ID",
    "GENERATION_PROMPT_TOKENS",
    "IM_END_ID",
    "IM_START_ID",
    "MESSAGE_OVERHEAD",
    "PAD_ID",
    "Tokenizer",
    "message_text",
]

PAD_ID: Final = 0
"""Reserved; never produced by :meth:`Tokenizer.encode`."""
IM_START_ID: Final = 1
"""``<|im_start|>``: opens every message of the chat template."""
IM_END_ID: Final = 2
"""``<|im_end|>``: closes every message; also the end-of-sequence token."""
EOS_TOKEN_ID: Final = IM_END_ID
"""End of sequence, as in ChatML models."""
FIRST_WORD_ID: Final = 16
"""Ids below this are reserved for special tokens (a few spare ones for future use)."""
MESSAGE_OVERHEAD: Final = 3
"""Tokens the template adds to each message: ``<|im_start|>``, the role, ``<|im_end|>``."""
GENERATION_PROMPT_TOKENS: Final = 2
"""Tokens of the generation prompt at the end of a chat prompt: ``<|im_start|> assistant``."""

_SPECIALS: Final = {PAD_ID: "<pad>", IM_START_ID: "<|im_start|>", IM_END_ID: "<|im_end|>"}
_CONSONANTS: Final = "bdfghjklmnprstvz"
_VOWELS: Final = "aeiou"
_SYLLABLES: Final = tuple(c + v for c in _CONSONANTS for v in _VOWELS)
_SYLLABLE_INDEX: Final = {s: i for i, s in enumerate(_SYLLABLES)}
_WORD_SYLLABLES: Final = 3
_MAX_CACHED_WORDS: Final = 1 << 20
_MAX_CACHED_TOKENS: Final = 1 << 23
"""Bound of the text memo, in token ids held (8 Mi ids: 64 MiB of pointers)."""
_MIN_CACHED_TEXT: Final = 64
"""Shorter texts are cheaper to split than to keep."""
_PSEUDO_WORD_SPACE: Final = len(_SYLLABLES) ** _WORD_SYLLABLES
_PSEUDO_WORD_LEN: Final = 2 * _WORD_SYLLABLES


class Tokenizer:
    """Word-level tokenizer with a ChatML-like chat template (see the module docstring).

    ``vocab_size`` bounds the ids: every id is in ``[0, vocab_size)``, the special ids are below
    :data:`FIRST_WORD_ID`. The default matches common 32k vocabularies; the value only changes
    which ids words get, never how many.
    """

    __slots__ = ("_cached_tokens", "_ids", "_texts", "_word_space", "vocab_size")

    def __init__(self, vocab_size: int = 32_000) -> None:
        if not FIRST_WORD_ID < vocab_size <= FIRST_WORD_ID + _PSEUDO_WORD_SPACE:
            raise ValueError(
                f"vocab_size must be in ({FIRST_WORD_ID}, {FIRST_WORD_ID + _PSEUDO_WORD_SPACE}],"
                f" got {vocab_size}"
            )
        self.vocab_size = vocab_size
        self._word_space = vocab_size - FIRST_WORD_ID
        # Agents resend their whole history every turn, so the same words and the same message
        # texts come back again and again: memoise both (the server re-tokenises every prompt).
        self._ids = _WordIds(self._compute_word_id)
        self._texts: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._cached_tokens = 0

    # -- words ---------------------------------------------------------------------------
    def word_id(self, word: str) -> int:
        """The id of one word (no whitespace inside)."""
        return self._ids[word]

    def _compute_word_id(self, word: str) -> int:
        if len(word) == _PSEUDO_WORD_LEN:
            pseudo = _parse_pseudo_word(word)
            if pseudo is not None and pseudo < self._word_space:
                return FIRST_WORD_ID + pseudo
        return FIRST_WORD_ID + zlib.crc32(word.encode("utf-8")) % self._word_space

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: one per whitespace-separated word."""
        return list(self._encode_cached(text))

    def _encode_cached(self, text: str) -> tuple[int, ...]:
        texts = self._texts
        ids = texts.get(text)
        if ids is None:
            ids = tuple(map(self._ids.__getitem__, text.split()))
            self._remember(text, ids)
        elif len(texts) > 1:
            texts.move_to_end(text)
        return ids

    def _remember(self, text: str, ids: tuple[int, ...]) -> None:
        texts = self._texts
        if len(text) < _MIN_CACHED_TEXT or len(ids) > _MAX_CACHED_TOKENS or text in texts:
            return
        texts[text] = ids
        self._cached_tokens += len(ids)
        while self._cached_tokens > _MAX_CACHED_TOKENS:
            self._cached_tokens -= len(texts.popitem(last=False)[1])

    def count(self, text: str) -> int:
        """Number of tokens of ``text`` (no hashing)."""
        return len(text.split())

    def token_text(self, token_id: int) -> str:
        """The pseudo-word of one generated id; ``""`` for a special id."""
        if token_id in _SPECIALS or 0 <= token_id < FIRST_WORD_ID:
            return ""
        if not FIRST_WORD_ID <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        value = token_id - FIRST_WORD_ID
        syllables = []
        for _ in range(_WORD_SYLLABLES):
            value, index = divmod(value, len(_SYLLABLES))
            syllables.append(_SYLLABLES[index])
        return "".join(syllables)

    def decode(self, token_ids: Iterable[int]) -> str:
        """Text of generated ids: one pseudo-word per non-special id, joined by single spaces.

        ``encode(decode(ids)) == ids`` for every list of non-special ids.
        """
        ids = [i for i in token_ids if not 0 <= i < FIRST_WORD_ID]
        words = list(map(self.token_text, ids))
        text = " ".join(words)
        # The client will send this text back in its next request: remember its ids now.
        word_ids = self._ids
        if len(word_ids) < _MAX_CACHED_WORDS:
            word_ids.update(zip(words, ids, strict=True))
        self._remember(text, tuple(ids))
        return text

    # -- chat template ---------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of a chat prompt (OpenAI message dicts), as described in the module doc.

        Raises ``ValueError`` (with a message fit for a 400 answer) for a message without a
        string ``role``.
        """
        ids: list[int] = []
        if tools:
            ids.append(IM_START_ID)
            ids.append(self.word_id("tools"))
            ids.extend(self._encode_cached(_canonical_json(list(tools))))
            ids.append(IM_END_ID)
        for index, message in enumerate(messages):
            role = message.get("role")
            if not isinstance(role, str):
                raise ValueError(f"messages[{index}] has no string 'role'")
            ids.append(IM_START_ID)
            # A role is one token even if it is not one word (odd, but legal).
            ids.append(self.word_id(role))
            ids.extend(self._encode_cached(message_text(message)))
            ids.append(IM_END_ID)
        if add_generation_prompt:
            ids.append(IM_START_ID)
            ids.append(self.word_id("assistant"))
        return ids


class _WordIds(dict[str, int]):
    """word -> id, computed on first sight."""

    __slots__ = ("_compute",)

    def __init__(self, compute: Callable[[str], int]) -> None:
        super().__init__()
        self._compute = compute

    def __missing__(self, word: str) -> int:
        value = self._compute(word)
        if len(self) < _MAX_CACHED_WORDS:
            self[word] = value
        return value


def message_text(message: Mapping[str, Any]) -> str:
    """The text the template tokenizes for one message's body (content, then tool calls)."""
    pieces: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        pieces.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                pieces.append(str(part.get("text", "")))
            else:
                pieces.append(_canonical_json(part))
    elif content is not None:
        pieces.append(_canonical_json(content))
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            function = call.get("function", call) if isinstance(call, Mapping) else call
            pieces.append(_canonical_json(function))
    return " ".join(pieces)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _parse_pseudo_word(word: str) -> int | None:
    if len(word) != _PSEUDO_WORD_LEN:
        return None
    value = 0
    for position in range(_WORD_SYLLABLES - 1, -1, -1):
        index = _SYLLABLE_INDEX.get(word[2 * position : 2 * position + 2])
        if index is None:
            return None
        value = value * len(_SYLLABLES) + index
    return value
