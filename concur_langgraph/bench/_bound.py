"""A lower bound on the makespan of a workload on a simulated engine.

No schedule can beat either of two limits, so the bound is their maximum:

* **Work.** The engine runs one step at a time and a step's duration is a sum of non-negative
  terms, each linear in a count (see ``sim/_cost.py``). The batch must at least prefill every
  token once (the shared system prompt once for all agents, each agent's task and tool
  observations once: no recompute, perfect prefix caching), decode every output token, and
  pay the attention and KV reads those tokens need at their positions; and it needs at least
  as many steps as the per-step limits (``max_num_seqs`` decodes, ``max_num_batched_tokens``
  tokens) and the KV capacity (below) allow, each paying ``step_overhead_s``. Summing those
  counts times the cost model's constants gives the time of all the work at the engine's best
  efficiency (maximal batches, nothing computed twice).
* **KV capacity** (part of the work limit's step count). A decode token can only be computed
  while its sequence's whole context is resident in the KV cache, and the contexts resident in
  one step fit its capacity (``num_blocks * block_size`` tokens). Agents share only the system
  prompt, so every step holds at most ``capacity`` tokens of the agents' own histories, and
  the batch needs at least ``sum over decode tokens of (own history before it) / capacity``
  steps. This is what makes
  long-context agent batches slow even with no recompute: the cache bounds the decode batch,
  and each step pays ``step_overhead_s`` however few sequences it carries.
* **Critical path.** Each agent runs its steps one after another: per LLM call, one prefill
  step of its new tokens (more if they exceed the step's token budget) that also samples its
  first output token, then one decode step per further output token, each step at least as
  long as its own share; plus every tool latency. The slowest agent bounds the batch.

Both parts undercount on purpose where the exact count depends on the schedule: chat-template
tokens and tool-call JSON are left out, chunked prefills are priced as one chunk, the shared
system prompt is not counted against the capacity, and the capacity only bounds the number of
steps (not which requests can share one). The bound is therefore safe (no run can beat it)
but not always reachable; the ratio ``makespan / lower_bound`` is how far a policy is from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from concur_langgraph.bench._workload import AgentPlan, Workload
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._cost import chunk_attention_pairs

__all__ = ["LowerBound", "agent_steps", "lower_bound"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LowerBound:
    """The two limits on a workload's makespan and the bound they give."""

    work_s: float
    """All work at best efficiency, no recompute (seconds)."""
    critical_path_s: float
    """The slowest agent alone: its steps and tool calls back to back (seconds)."""
    prefill_tokens: int
    """Tokens that must be prefilled at least once."""
    decode_tokens: int
    """Output tokens produced by decode steps (a call's first token comes from its prefill)."""
    resident_tokens: int
    """Sum over decode tokens of the agent's own history resident while it is computed (the
    context before it minus the shared system prompt)."""
    min_steps: int
    """Fewest engine steps: the most of the per-step limits (``max_num_seqs`` decodes,
    ``max_num_batched_tokens`` tokens) and of the KV capacity (``resident_tokens /
    capacity``)."""

    @property
    def bound_s(self) -> float:
        """``max(work_s, critical_path_s)``."""
        return max(self.work_s, self.critical_path_s)


def agent_steps(plan: AgentPlan, system: int) -> list[tuple[int, int, int]]:
    """Per LLM call: (context already computed, new prompt tokens, output tokens)."""
    out: list[tuple[int, int, int]] = []
    context = system
    new = plan.task_prompt_tokens
    for k, produced in enumerate(plan.output_tokens):
        out.append((context, new, produced))
        context += new + produced
        new = plan.observation_tokens[k] if k < len(plan.observation_tokens) else 0
    return out


def lower_bound(workload: Workload, config: SimConfig) -> LowerBound:
    """The makespan bound of ``workload`` on an engine configured by ``config``."""
    cost = config.cost
    system = workload.system_prompt_tokens
    budget = config.max_num_batched_tokens

    # The shared system prompt is computed once, by whoever comes first.
    prefill_tokens = system
    decode_tokens = 0
    resident = 0
    pairs_total = chunk_attention_pairs(0, system)
    reads_total = system
    critical = 0.0
    for plan in workload.plans():
        path = sum(plan.tool_latency_s)
        for context, new, produced in agent_steps(plan, system):
            pairs = chunk_attention_pairs(context, new)
            reads = context + new
            decodes = produced - 1
            # Decode j (1-based) attends (and reads) the prompt, the j tokens before it, itself.
            decode_ctx = decodes * (context + new) + decodes * (decodes + 1) // 2
            # Decode j sees context + new + j - 1 computed tokens, all resident.
            resident += decodes * (context + new - system) + decodes * (decodes - 1) // 2
            prefill_tokens += new
            decode_tokens += decodes
            pairs_total += pairs + decode_ctx
            reads_total += reads + decode_ctx
            path += (
                math.ceil(max(new, 1) / budget) * cost.step_overhead_s
                + cost.prefill_token_s * new
                + cost.attention_pair_s * (pairs + decode_ctx)
                + cost.kv_read_token_s * (reads + decode_ctx)
                + decodes * (cost.step_overhead_s + cost.decode_seq_s)
            )
        critical = max(critical, path)
    capacity = config.num_blocks * config.block_size
    # A cost model with a decode knee charges some sequences less than decode_seq_s; the work
    # bound must use the cheapest marginal sequence (the simulator's CostModel says which).
    decode_seq_s = cost.min_decode_seq_s
    min_steps = math.ceil(
        max(
            decode_tokens / config.max_num_seqs,
            (prefill_tokens + decode_tokens) / budget,
            resident / capacity,
        )
    )
    work = (
        min_steps * cost.step_overhead_s
        + cost.prefill_token_s * prefill_tokens
        + decode_seq_s * decode_tokens
        + cost.attention_pair_s * pairs_total
        + cost.kv_read_token_s * reads_total
    )
    return LowerBound(
        work_s=work,
        critical_path_s=critical,
        prefill_tokens=prefill_tokens,
        decode_tokens=decode_tokens,
        resident_tokens=resident,
        min_steps=min_steps,
    )
