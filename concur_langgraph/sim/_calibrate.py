"""Fit the step-time model to a real vLLM-compatible server, through its OpenAI API only.

Measurements (all with fresh random text, so nothing hits the prefix cache):

* **Prefills**: one request at a time, prompts of several sizes, ``max_tokens=1``: one step
  that prefills ``P`` tokens, plus the server's per-request overhead (HTTP, tokenisation).
  Given the server's token budget per step (``max_num_batched_tokens``), a longer prompt is
  ``ceil(P / budget)`` steps of chunks, each attending what the earlier chunks computed.
* **Decode runs**: ``B`` concurrent requests of ``L`` prompt tokens each, ``ignore_eos`` and
  ``max_tokens=N``, timed from launch to the last answer: one prefill step of the whole batch,
  then ``N - 1`` decode steps of ``B`` sequences over growing contexts.
* **Decode steps** (:func:`measure_decode_steps`): two decode runs of the same batch with
  different ``N``; their difference is a number of pure-decode steps, timed with no model.
  As a sample of its own (:attr:`DecodeStepSample.difference`) it joins a fit with the
  prefill and the per-request overhead cancelled, whatever the context: the way to measure
  how a decode step grows with the context it reads, at contexts too long for one prefill
  step of the batch.

Each measurement's duration is linear in the unknowns: the per-request overhead and the
:class:`CostModel` constants (with a decode knee, the cost per sequence below and above it),
with coefficients that follow from ``usage`` (prompt tokens, cached tokens, completion tokens)
and the formulas of ``_cost.py``. A small non-negative least squares on relative errors
(normal equations, plain Python) fits them, once per candidate knee. The design separates
every constant: the prefill sizes give the quadratic attention term and the linear prefill+KV
term, decode runs at several batch sizes and contexts give the per-sequence and
per-context-token terms, and two output lengths separate the per-step overhead from the
per-request overhead.

Clocks: durations are measured with the running loop's ``time()``, so calibrating a simulator
under virtual time measures exactly what the simulator modelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from concur_langgraph.errors import ConcurError, ConfigError
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._cost import CostModel, chunk_attention_pairs

__all__ = [
    "CalibrationSample",
    "DecodeStepSample",
    "calibrate",
    "calibrated_config",
    "fit_cost_model",
    "measure",
    "measure_decode_steps",
    "prefill_chunks",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationSample:
    """One timed measurement and the model quantities it contains."""

    duration_s: float
    """Measured wall (loop) time of the measurement, in seconds."""
    requests: int
    """HTTP requests it waited for in sequence (1 per measurement: they run concurrently)."""
    steps: int
    """Engine steps it spans."""
    prefill_tokens: int
    """Prompt tokens computed (prompt minus cached)."""
    decode_seqs: int
    """Decode tokens computed, summed over its steps."""
    attention_pairs: int
    """Attention pairs, summed over its steps."""
    kv_tokens_read: int
    """Context tokens read from the KV cache, summed over its steps."""
    batch: int = 0
    """Sequences in each of its decode steps when they cannot be derived (a difference of two
    runs is decode steps only); 0: derived (see :attr:`decode_batch`)."""

    @property
    def decode_batch(self) -> int:
        """Sequences in each decode step: a measurement's decode steps all carry the same batch
        (one prefill step, then ``steps - 1`` decode steps of every request, unless ``batch``
        says otherwise); 0 if none."""
        if self.batch:
            return self.batch
        if self.decode_seqs <= 0 or self.steps <= 1:
            return 0
        return self.decode_seqs // (self.steps - 1)

    def features(self, decode_knee_seqs: int = 0) -> list[float]:
        """Coefficients of the fitted unknowns: per-request overhead, the step overhead,
        prefill, decode up to the knee, decode beyond it, attention, KV reads."""
        below, above = float(self.decode_seqs), 0.0
        batch = self.decode_batch
        if decode_knee_seqs and batch > decode_knee_seqs:
            decode_steps = self.decode_seqs / batch
            below = float(decode_knee_seqs * decode_steps)
            above = float(self.decode_seqs - below)
        return [
            float(self.requests),
            float(self.steps),
            float(self.prefill_tokens),
            below,
            above,
            float(self.attention_pairs),
            float(self.kv_tokens_read),
        ]


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None if singular."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-14:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                if f:
                    for c in range(col, n + 1):
                        m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares with non-negative coefficients (active set: drop the most negative)."""
    n = len(rows[0])
    scale = [max(abs(r[i]) for r in rows) or 1.0 for i in range(n)]
    x = [[r[i] / scale[i] for i in range(n)] for r in rows]
    free = list(range(n))
    beta = [0.0] * n
    while free:
        ata = [[sum(r[i] * r[j] for r in x) for j in free] for i in free]
        aty = [sum(r[i] * yy for r, yy in zip(x, y, strict=True)) for i in free]
        sol = _solve(ata, aty)
        if sol is None:
            # Unidentifiable column (never varied): drop the one with the least signal.
            weakest = min(free, key=lambda i: sum(r[i] * r[i] for r in x))
            free.remove(weakest)
            continue
        worst = min(range(len(free)), key=lambda k: sol[k])
        if sol[worst] < 0:
            free.pop(worst)
            continue
        beta = [0.0] * n
        for k, i in enumerate(free):
            beta[i] = sol[k]
        break
    return [beta[i] / scale[i] for i in range(n)]


def fit_cost_model(
    samples: Sequence[CalibrationSample],
    *,
    kv_bytes_per_token: float = 1.0,
    decode_knees: Sequence[int] = (0,),
) -> CostModel:
    """Fit the :class:`CostModel` constants to measurements (non-negative least squares).

    The fit minimises *relative* errors (each measurement is weighted by one over its
    duration): on a shared machine the noise is multiplicative (other jobs stretch every step
    alike), and an absolute fit would let the longest measurements decide every constant.

    ``decode_knees``: candidate knees of the decode term (0: linear); each is fitted and the
    one with the smallest residual wins. A knee is only a candidate when some measurement has
    more decode sequences than it (otherwise nothing measures the cost beyond it).

    The fit measures seconds per context token read; it is expressed as a bandwidth for
    ``kv_bytes_per_token`` bytes per token (:func:`calibrated_config` rescales it to the base
    config's value). The per-request overhead is fitted and dropped: the simulator's server
    adds none.
    """
    if len(samples) < 6:
        raise ConfigError(f"samples: need at least 6 measurements to fit, got {len(samples)}")
    for knee in decode_knees:
        if isinstance(knee, bool) or not isinstance(knee, int) or knee < 0:
            raise ConfigError(f"decode_knees: each must be an integer >= 0, got {knee!r}")
    if any(s.duration_s <= 0 for s in samples):
        raise ConfigError("samples: every duration_s must be > 0")
    biggest = max(s.decode_batch for s in samples)
    knees = [k for k in decode_knees if k == 0 or k < biggest]
    if not knees:
        raise ConfigError(
            f"decode_knees: no candidate below the largest measured decode batch ({biggest})"
        )
    y = [1.0] * len(samples)
    best: tuple[float, int, list[float]] | None = None
    for knee in knees:
        rows = [[f / s.duration_s for f in s.features(knee)] for s in samples]
        coef = _nnls(rows, y)
        residual = sum((sum(c * f for c, f in zip(coef, r, strict=True)) - 1.0) ** 2 for r in rows)
        if best is None or residual < best[0]:
            best = (residual, knee, coef)
    assert best is not None
    _residual, knee, coef = best
    _request, overhead, prefill, decode, above, attention, kv = coef
    return CostModel(
        step_overhead_s=overhead,
        prefill_token_s=prefill,
        decode_seq_s=decode,
        attention_pair_s=attention,
        kv_bytes_per_token=kv_bytes_per_token,
        kv_read_bytes_per_s=kv_bytes_per_token / kv if kv > 0 else math.inf,
        decode_knee_seqs=knee,
        decode_seq_above_knee_s=above if knee else 0.0,
    )


def calibrated_config(base: SimConfig, cost: CostModel) -> SimConfig:
    """``base`` with fitted time constants, keeping its KV bytes per token."""
    bytes_per_token = base.cost.kv_bytes_per_token
    per_token_s = cost.kv_read_token_s
    fitted = dataclasses.replace(
        cost,
        kv_bytes_per_token=bytes_per_token,
        kv_read_bytes_per_s=bytes_per_token / per_token_s if per_token_s > 0 else math.inf,
    )
    return dataclasses.replace(base, cost=fitted)


class _Client:
    """The few OpenAI calls calibration needs, timed on the loop clock."""

    def __init__(self, client: httpx.AsyncClient, root: str, model: str | None) -> None:
        self.http = client
        self.root = root
        self.model = model or ""
        self.rng = random.Random(0)

    async def get_model(self) -> tuple[str, int | None]:
        data = await self._request("GET", "/v1/models", None)
        cards = data.get("data") or []
        if not cards:
            raise ConcurError(f"{self.root}/v1/models lists no model")
        card = cards[0]
        return str(card["id"]), card.get("max_model_len")

    def text(self, words: int) -> str:
        # Random pseudo-words: no two prompts share a prefix beyond the chat template.
        letters = "bcdfghjklmnprstvz"
        vowels = "aeiou"
        rng = self.rng
        return " ".join(
            "".join(rng.choice(letters) + rng.choice(vowels) for _ in range(3))
            for _ in range(words)
        )

    async def chat(self, words: int, max_tokens: int) -> tuple[int, int, int]:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.text(words)}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
        }
        data = await self._request("POST", "/v1/chat/completions", body)
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return (
            int(usage["prompt_tokens"]),
            int(details.get("cached_tokens") or 0),
            int(usage["completion_tokens"]),
        )

    async def _request(self, method: str, path: str, body: Any) -> dict[str, Any]:
        try:
            resp = await self.http.request(method, f"{self.root}{path}", json=body)
        except httpx.HTTPError as exc:
            raise ConcurError(f"calibration request to {self.root}{path} failed: {exc}") from exc
        if resp.status_code != 200:
            raise ConcurError(
                f"calibration request to {self.root}{path} answered {resp.status_code}: "
                f"{resp.text[:200]}"
            )
        result: dict[str, Any] = resp.json()
        return result


def _root(base_url: str) -> str:
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base_url must be an http(s) URL, got {base_url!r}")
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return root


def prefill_chunks(cached: int, computed: int, budget: int | None) -> list[tuple[int, int]]:
    """The ``(start, tokens)`` chunks in which a lone request prefills ``computed`` tokens
    after ``cached`` ones, ``budget`` tokens per step at most (``None``: one chunk)."""
    if computed <= 0:
        return [(cached, 0)]
    step = computed if budget is None else budget
    return [(cached + i, min(step, computed - i)) for i in range(0, computed, step)]


async def measure(
    base_url: str,
    *,
    client: httpx.AsyncClient | None = None,
    model: str | None = None,
    prefill_sizes: Sequence[int] = (64, 256, 512, 1024),
    batch_sizes: Sequence[int] = (1, 4, 8),
    contexts: Sequence[int] = (48, 192),
    output_tokens: Sequence[int] = (8, 32),
    repeats: int = 2,
    max_num_batched_tokens: int | None = None,
) -> list[CalibrationSample]:
    """Run the calibration measurements (module docstring) and return them.

    ``max_num_batched_tokens``: the server's token budget per step (vLLM's default is 2048 on
    CPU, 8192 on large GPUs); prefills longer than it are modelled as consecutive chunks.
    ``None``: every prefill is one step. The decode runs prefill their whole batch in one step,
    so ``max(batch_sizes) * max(contexts)`` must stay within the budget (checked when given;
    use :func:`measure_decode_steps` for longer contexts).
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if max_num_batched_tokens is not None:
        if isinstance(max_num_batched_tokens, bool) or max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be an integer >= 1, got {max_num_batched_tokens!r}"
            )
        if batch_sizes and contexts and max(batch_sizes) * max(contexts) > max_num_batched_tokens:
            raise ConfigError(
                f"contexts: a decode run of {max(batch_sizes)} x {max(contexts)} prompt tokens "
                f"does not prefill in one step of max_num_batched_tokens="
                f"{max_num_batched_tokens}; use smaller batch_sizes or contexts"
            )
    own = client is None
    http = client or httpx.AsyncClient(timeout=600.0)
    loop = asyncio.get_running_loop()
    try:
        api = _Client(http, _root(base_url), model)
        served, max_len = await api.get_model()
        api.model = model or served
        limit = (max_len or 1 << 30) - max(output_tokens) - 8
        per_word, fixed = await _tokens_per_word(api)

        def words_for(tokens: int) -> int:
            return max(1, round((min(tokens, limit) - fixed) / per_word))

        samples: list[CalibrationSample] = []
        for _ in range(repeats):
            for size in prefill_sizes:
                start = loop.time()
                prompt, cached, _out = await api.chat(words_for(size), 1)
                duration = loop.time() - start
                computed = prompt - cached
                chunks = prefill_chunks(cached, computed, max_num_batched_tokens)
                samples.append(
                    CalibrationSample(
                        duration_s=duration,
                        requests=1,
                        steps=len(chunks),
                        prefill_tokens=computed,
                        decode_seqs=0,
                        attention_pairs=sum(chunk_attention_pairs(s, n) for s, n in chunks),
                        kv_tokens_read=sum(s + n for s, n in chunks),
                    )
                )
            for batch in batch_sizes:
                for ctx in contexts:
                    for n_out in output_tokens:
                        samples.append(await _decode_run(api, loop, batch, words_for(ctx), n_out))
        return samples
    finally:
        if own:
            await http.aclose()


async def _decode_run(
    api: _Client, loop: asyncio.AbstractEventLoop, batch: int, words: int, n_out: int
) -> CalibrationSample:
    start = loop.time()
    results = await asyncio.gather(*(api.chat(words, n_out) for _ in range(batch)))
    duration = loop.time() - start
    prompts = [p for p, _, _ in results]
    total_prompt = sum(prompts)
    steps = max(out for _, _, out in results)
    decode_steps = steps - 1
    # Decode step j (from 0) attends and reads sum(P) + batch * (j + 1) context tokens.
    decode_ctx = decode_steps * total_prompt + batch * decode_steps * (decode_steps + 1) // 2
    return CalibrationSample(
        duration_s=duration,
        requests=1,
        steps=steps,
        prefill_tokens=sum(p - c for p, c, _ in results),
        decode_seqs=batch * decode_steps,
        attention_pairs=sum(chunk_attention_pairs(c, p - c) for p, c, _ in results) + decode_ctx,
        kv_tokens_read=total_prompt + decode_ctx,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeStepSample:
    """The duration of one decode step of ``batch`` sequences, from two timed decode runs.

    Two runs of the same batch that differ only in their output length share the prefill and
    the per-request overhead, so the difference of their durations over the difference of
    their steps is the time of a pure-decode step, with no model assumed.
    """

    short: CalibrationSample
    """The run with fewer output tokens."""
    long: CalibrationSample
    """The same batch with more output tokens."""

    @property
    def batch(self) -> int:
        """Concurrent requests: the sequences in every decode step."""
        return self.long.decode_batch

    @property
    def step_s(self) -> float:
        """Seconds per decode step: the difference of durations over the difference of steps."""
        return (self.long.duration_s - self.short.duration_s) / (self.long.steps - self.short.steps)

    @property
    def difference(self) -> CalibrationSample:
        """The extra decode steps of the long run as one measurement: duration and every
        feature of the long run minus the short one's (the prefill and the per-request
        overhead cancel), its decode batch explicit. Exact in the additive model whatever
        the prompt length, so long-context decodes can join a fit. ``ValueError`` when the
        long run was not the longer one (a stalled short run on a shared machine): such a pair
        measures nothing."""
        long, short = self.long, self.short
        duration = long.duration_s - short.duration_s
        if duration <= 0 or long.steps <= short.steps:
            raise ValueError(
                f"the long run ({long.duration_s:.3f} s, {long.steps} steps) is not longer than "
                f"the short one ({short.duration_s:.3f} s, {short.steps} steps)"
            )
        return CalibrationSample(
            duration_s=duration,
            requests=0,
            steps=long.steps - short.steps,
            prefill_tokens=long.prefill_tokens - short.prefill_tokens,
            decode_seqs=long.decode_seqs - short.decode_seqs,
            attention_pairs=long.attention_pairs - short.attention_pairs,
            kv_tokens_read=long.kv_tokens_read - short.kv_tokens_read,
            batch=self.batch,
        )


async def measure_decode_steps(
    base_url: str,
    *,
    client: httpx.AsyncClient | None = None,
    model: str | None = None,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 24, 32),
    context_tokens: int = 64,
    output_tokens: tuple[int, int] = (16, 256),
) -> list[DecodeStepSample]:
    """Time a pure-decode step at each batch size (one :class:`DecodeStepSample` each).

    The server's KV cache must hold ``max(batch_sizes)`` sequences of ``context_tokens +
    output_tokens[1]`` tokens, or preemptions spoil the long run. Longer runs average out the
    start and end of each run (HTTP, the prefill step) over more steps.
    """
    short, long = output_tokens
    if not 1 <= short < long:
        raise ConfigError(
            f"output_tokens must be (short, long) with 1 <= short < long, got {output_tokens!r}"
        )
    own = client is None
    http = client or httpx.AsyncClient(timeout=600.0)
    loop = asyncio.get_running_loop()
    try:
        api = _Client(http, _root(base_url), model)
        served, _max_len = await api.get_model()
        api.model = model or served
        per_word, fixed = await _tokens_per_word(api)
        words = max(1, round((context_tokens - fixed) / per_word))
        out: list[DecodeStepSample] = []
        for batch in batch_sizes:
            first = await _decode_run(api, loop, batch, words, short)
            second = await _decode_run(api, loop, batch, words, long)
            out.append(DecodeStepSample(short=first, long=second))
        return out
    finally:
        if own:
            await http.aclose()


async def _tokens_per_word(api: _Client) -> tuple[float, float]:
    """(tokens per word, fixed template tokens) of the server's tokenizer on our text."""
    p1, _, _ = await api.chat(50, 1)
    p2, _, _ = await api.chat(150, 1)
    per_word = max((p2 - p1) / 100, 1e-3)
    return per_word, p1 - 50 * per_word


async def calibrate(
    base_url: str,
    *,
    client: httpx.AsyncClient | None = None,
    model: str | None = None,
    kv_bytes_per_token: float = 1.0,
    prefill_sizes: Sequence[int] = (64, 256, 512, 1024),
    batch_sizes: Sequence[int] = (1, 4, 8),
    contexts: Sequence[int] = (48, 192),
    output_tokens: Sequence[int] = (8, 32),
    repeats: int = 2,
    decode_knees: Sequence[int] = (0,),
    max_num_batched_tokens: int | None = None,
    long_contexts: Sequence[tuple[int, int]] = (),
    long_output_tokens: tuple[int, int] = (16, 128),
) -> CostModel:
    """Measure a vLLM-compatible server at ``base_url`` and fit a :class:`CostModel`.

    ``client`` (e.g. a ``SimServer.http_client()``) replaces the default ``httpx`` client;
    ``model`` defaults to the first model ``/v1/models`` lists. Use
    :func:`calibrated_config` to put the result into a preset. ``decode_knees``: candidate
    knees of the decode term (see :func:`fit_cost_model`; only knees below the largest of
    ``batch_sizes`` can win). ``max_num_batched_tokens``: the server's token budget per step,
    for prefills longer than it (see :func:`measure`).

    ``long_contexts``: ``(batch, context tokens)`` pairs at which decode steps are timed too
    (:func:`measure_decode_steps` with ``long_output_tokens``, ``repeats`` times, joining the
    fit as :attr:`DecodeStepSample.difference`): where a step's cost grows with the context it
    reads (attention and KV reads), which short calibration contexts cannot show. The server's
    KV cache must hold ``batch x (context + long_output_tokens[1])`` tokens.
    """
    samples = await measure(
        base_url,
        client=client,
        model=model,
        prefill_sizes=prefill_sizes,
        batch_sizes=batch_sizes,
        contexts=contexts,
        output_tokens=output_tokens,
        repeats=repeats,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    for _ in range(repeats if long_contexts else 0):
        for batch, context in long_contexts:
            steps = await measure_decode_steps(
                base_url,
                client=client,
                model=model,
                batch_sizes=(batch,),
                context_tokens=context,
                output_tokens=long_output_tokens,
            )
            for step in steps:
                with contextlib.suppress(ValueError):  # a pair spoilt by a stall: skipped
                    samples.append(step.difference)
    return fit_cost_model(samples, kv_bytes_per_token=kv_bytes_per_token, decode_knees=decode_knees)
