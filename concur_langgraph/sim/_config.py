"""Settings of one simulated vLLM engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from concur_langgraph.checks import check_count, check_number, is_count
from concur_langgraph.errors import ConfigError
from concur_langgraph.sim._cost import CostModel

__all__ = ["SCHEDULING_POLICIES", "SimConfig"]

SCHEDULING_POLICIES: Final = ("fcfs", "priority")
"""vLLM's ``--scheduling-policy`` values (``SchedulerPolicy`` in vllm/config/scheduler.py)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """A simulated vLLM V1 engine: KV cache geometry, scheduler limits, timing, outputs."""

    model_name: str
    """Served model name (``--served-model-name``): the ``model`` clients must send."""
    num_blocks: int
    """KV-cache blocks (vLLM's ``num_gpu_blocks``)."""
    block_size: int
    """Tokens per KV block (16 on GPU, 128 on CPU by default)."""
    max_num_seqs: int
    """Most requests in the running batch (``--max-num-seqs``)."""
    max_num_batched_tokens: int
    """Token budget of one step, decode and prefill chunks together (chunked prefill)."""
    max_model_len: int
    """Longest sequence, prompt plus output (``--max-model-len``)."""
    cost: CostModel
    """Step-time model."""
    enable_prefix_caching: bool = True
    """Reuse cached full blocks across requests (``--enable-prefix-caching``)."""
    reuse_generated_blocks: bool = True
    """Whether a block holding generated tokens can be a prefix-cache hit for a later prompt.
    True for real models, whose answers re-tokenize to the ids they were generated as, so an
    agent's next turn hits its previous answer. False models a random-weight test model (the
    tiny Llama of the real tier): its output text re-tokenizes to other ids, and the real
    server's ``cached_tokens`` on turn k+1 are exactly the full blocks of turn k's *prompt*."""
    vocab_size: int = 32_000
    """Generated ids lie in ``[16, vocab_size)`` (see ``sim/_tokenizer.py``); EOS is id 2."""
    eos_mean_tokens: float = 256.0
    """Mean output length when a request does not set ``ignore_eos``: the EOS position is a
    deterministic exponential draw with this mean, never before ``min_tokens``."""
    seed: int = 0
    """Mixed into generated token ids and EOS draws; same seed, same outputs."""
    request_overhead_s: float = 0.0
    """Time a chat completion spends outside the engine (client SDK, HTTP, the API server's
    request and response handling) when it is the only request in flight. The server holds
    each completion that long in total, on the event loop's clock (the engine keeps stepping
    meanwhile): ``1 - request_overhead_after_share`` of it before the request reaches the
    engine, the rest after it finishes. 0 (the default) for GPU servers, where it is
    milliseconds against steps of tens of milliseconds; measured for ``cpu-tiny``."""
    request_overhead_per_request_s: float = 0.0
    """Added to ``request_overhead_s`` for each other request in flight at the server when a
    completion arrives (in the engine or in its own overhead): on a small CPU machine the
    client and the API server share the cores with the engine, so every call's handling waits
    for the others' (measured: the overhead grows about linearly with concurrent calls)."""
    request_overhead_after_share: float = 0.0
    """Part of a completion's overhead spent after the engine finished it (response building,
    transfer, client-side parsing); the rest is spent before it reaches the engine."""
    tool_call_turns: tuple[int, int] = (0, 0)
    """``(least, most)`` tool-calling turns per user request when the request binds tools
    with ``tool_choice`` ``"auto"`` (or none given): the server answers that many turns with a
    tool call, then with text. Each conversation's count is drawn in this range from a hash of
    ``seed`` and its last user message (docs/simulator.md, "Tool calls"). The default ``(0,
    0)`` never calls a tool unasked, as the random-weight model of the real tier does;
    ``"required"`` or a named function always gets a call whatever this says."""

    scheduling_policy: str = "fcfs"
    """vLLM's ``--scheduling-policy``. ``"fcfs"`` (vLLM's default): the waiting queue in
    arrival order, preempted requests back at its front, the most recently admitted running
    request preempted first; a request's ``priority`` is accepted and ignored. ``"priority"``:
    the waiting queue ordered by ``(priority, arrival)`` (lower first), preempted requests
    re-queued by that key, and the running request with the largest ``(priority, arrival)``
    preempted first (docs/simulator.md, "Priority scheduling")."""

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ConfigError(
                f"SimConfig.model_name must be a non-empty string, got {self.model_name!r}"
            )
        for name in (
            "num_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
        ):
            check_count(f"SimConfig.{name}", getattr(self, name), minimum=1)
        if not isinstance(self.cost, CostModel):
            raise ConfigError(f"SimConfig.cost must be a CostModel, got {type(self.cost).__name__}")
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ConfigError(
                f"SimConfig.num_blocks x block_size = {self.num_blocks * self.block_size} tokens "
                f"is smaller than max_model_len = {self.max_model_len}: the KV cache must hold "
                "one request of the maximum length"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            # As vLLM: otherwise a full batch of decodes could not fit in one step.
            raise ConfigError(
                f"SimConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(
                "SimConfig.enable_prefix_caching must be a bool, "
                f"got {self.enable_prefix_caching!r}"
            )
        check_count("SimConfig.vocab_size", self.vocab_size, minimum=17)
        check_number("SimConfig.eos_mean_tokens", self.eos_mean_tokens, low=0, low_open=True)
        if not is_count(self.seed):
            raise ConfigError(f"SimConfig.seed: must be an integer, got {self.seed!r}")
        for name in ("request_overhead_s", "request_overhead_per_request_s"):
            check_number(f"SimConfig.{name}", getattr(self, name), low=0)
        check_number(
            "SimConfig.request_overhead_after_share",
            self.request_overhead_after_share,
            low=0,
            high=1,
        )

        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(
                "SimConfig.scheduling_policy must be one of "
                f"{', '.join(map(repr, SCHEDULING_POLICIES))} (vLLM's --scheduling-policy), "
                f"got {self.scheduling_policy!r}"
            )

        turns = self.tool_call_turns
        if isinstance(turns, list):
            # A JSON config file (config_to_json writes tuples as lists).
            turns = tuple(turns)
            object.__setattr__(self, "tool_call_turns", turns)
        if not (
            isinstance(turns, tuple)
            and len(turns) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in turns)
            and turns[0] <= turns[1]
        ):
            raise ConfigError(
                "SimConfig.tool_call_turns must be a (least, most) pair of integers with "
                f"0 <= least <= most, got {turns!r}"
            )

    def request_overhead(self, in_flight: int) -> tuple[float, float]:
        """Seconds a completion spends outside the engine, before and after it, when
        ``in_flight`` other requests are at the server as it arrives."""
        total = self.request_overhead_s + self.request_overhead_per_request_s * in_flight
        after = total * self.request_overhead_after_share
        return total - after, after

    @property
    def kv_capacity_tokens(self) -> int:
        """KV capacity in tokens: ``num_blocks * block_size``."""
        return self.num_blocks * self.block_size
