"""The simulated engine: scheduling, prefix caching, preemption, timing, determinism.

Every test runs on the virtual-time loop (``vtime.run``): simulated seconds cost no wall time
and timelines are exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from typing import Any

import pytest
from engine_support import COST, config, run, tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from concur_langgraph import ConfigError
from concur_langgraph.sim._cost import CostModel
from concur_langgraph.sim._engine import EngineMetrics, SimEngine
from concur_langgraph.sim._presets import PRESETS, get_preset
from concur_langgraph.sim._tokenizer import EOS_TOKEN_ID

KNEE_COST = dataclasses.replace(COST, decode_knee_seqs=3, decode_seq_above_knee_s=20e-6)


def hit_rate(m: EngineMetrics) -> float:
    return m.prefix_cache_hits / m.prefix_cache_queries


# ---- prefix caching ------------------------------------------------------------------------


def test_repeated_prefix_hits_and_loses_its_hits_after_eviction() -> None:
    async def main() -> tuple[int, int, int, EngineMetrics]:
        engine = SimEngine(config())
        prefix = tokens(1, 100)  # 6 full blocks of 16
        first = await engine.add_request(prefix, max_tokens=4, ignore_eos=True).result()
        second = await engine.add_request(
            [*prefix, *tokens(2, 10)], max_tokens=4, ignore_eos=True
        ).result()
        # Unrelated requests that together need every block evict the cached prefix.
        fillers = [
            engine.add_request(tokens(100 + i, 250), max_tokens=4, ignore_eos=True)
            for i in range(4)
        ]
        for f in fillers:
            await f.result()
        third = await engine.add_request(
            [*prefix, *tokens(3, 10)], max_tokens=4, ignore_eos=True
        ).result()
        m = engine.metrics()
        await engine.aclose()
        return first.cached_tokens, second.cached_tokens, third.cached_tokens, m

    first, second, third, m = run(main)
    assert first == 0
    assert second == 96  # 6 whole blocks; the partial 7th is not cached
    assert third == 0
    assert m.prefix_cache_hits == 96
    assert m.prompt_tokens_cached == 96
    assert m.prefix_cache_queries == 100 + 110 + 4 * 250 + 110
    assert m.kv_evictions > 0


def test_the_last_prompt_token_is_always_computed() -> None:
    async def main() -> int:
        engine = SimEngine(config())
        prompt = tokens(1, 64)  # exactly 4 blocks
        await engine.add_request(prompt, max_tokens=2, ignore_eos=True).result()
        again = await engine.add_request(prompt, max_tokens=2, ignore_eos=True).result()
        await engine.aclose()
        return again.cached_tokens

    assert run(main) == 48  # 3 blocks: the 4th holds the token that must be recomputed


def test_generated_tokens_are_cached_for_the_next_turn() -> None:
    async def main() -> tuple[int, int]:
        engine = SimEngine(config())
        prompt = tokens(1, 40)
        out = await engine.add_request(prompt, max_tokens=40, ignore_eos=True).result()
        follow = [*prompt, *out.output_token_ids, *tokens(2, 5)]
        nxt = await engine.add_request(follow, max_tokens=1, ignore_eos=True).result()
        await engine.aclose()
        return nxt.cached_tokens, len(prompt) + len(out.output_token_ids)

    cached, history = run(main)
    # Every full block of prompt + output is a hit except the block holding the last output
    # token, whose KV was never computed (the sampled token is not fed back).
    assert cached == ((history - 1) // 16) * 16


def test_without_reuse_of_generated_blocks_the_next_turn_hits_only_the_prompt() -> None:
    # A random-weight model's answer re-tokenizes to other ids on a real server: the next turn
    # hits the full blocks of the previous *prompt* only.
    async def main() -> int:
        engine = SimEngine(config(reuse_generated_blocks=False))
        prompt = tokens(1, 40)
        out = await engine.add_request(prompt, max_tokens=40, ignore_eos=True).result()
        follow = [*prompt, *out.output_token_ids, *tokens(2, 5)]
        nxt = await engine.add_request(follow, max_tokens=1, ignore_eos=True).result()
        await engine.aclose()
        return nxt.cached_tokens

    assert run(main) == (40 // 16) * 16  # 2 full blocks of the prompt; the third holds output


def test_prefix_caching_off_gives_no_hits() -> None:
    async def main() -> EngineMetrics:
        engine = SimEngine(config(enable_prefix_caching=False))
        prompt = tokens(1, 100)
        await engine.add_request(prompt, max_tokens=2, ignore_eos=True).result()
        await engine.add_request(prompt, max_tokens=2, ignore_eos=True).result()
        m = engine.metrics()
        await engine.aclose()
        return m

    m = run(main)
    assert m.prefix_cache_hits == 0
    assert m.prompt_tokens_computed == 200


# ---- usage ----------------------------------------------------------------------------------


def test_usage_counts_live_requests_only() -> None:
    async def main() -> tuple[float, float, int]:
        engine = SimEngine(config())
        req = engine.add_request(tokens(1, 100), max_tokens=50, ignore_eos=True)
        await asyncio.sleep(0.01)  # mid-decode
        during = engine.metrics().kv_cache_usage
        await req.result()
        after = engine.metrics().kv_cache_usage
        again = await engine.add_request(tokens(1, 100), max_tokens=1).result()
        await engine.aclose()
        return during, after, again.cached_tokens

    during, after, cached = run(main)
    assert during == 7 / 63  # 7 blocks of 63 usable (block 0 is vLLM's null block)
    assert after == 0.0  # the finished request's blocks are cached but free
    assert cached == 96  # ... and still give hits


# ---- preemption -----------------------------------------------------------------------------


def test_preempts_the_most_recently_admitted_request() -> None:
    # 6 usable blocks of 16 (7 minus vLLM's null block). A (32 tokens) fills 2 blocks; B and C
    # (17 tokens) take 2 each: the cache is full after admission, and A's first decode needs a
    # third block.
    cfg = config(num_blocks=7, max_model_len=96)

    async def main() -> tuple[list[int], list[int], EngineMetrics, list[int]]:
        engine = SimEngine(cfg)
        a = engine.add_request(tokens(1, 32), max_tokens=20, ignore_eos=True)
        b = engine.add_request(tokens(2, 17), max_tokens=10, ignore_eos=True)
        c = engine.add_request(tokens(3, 17), max_tokens=10, ignore_eos=True)
        outs = [await r.result() for r in (a, b, c)]
        m = engine.metrics()
        await engine.aclose()
        return (
            [o.num_preemptions for o in outs],
            [len(o.output_token_ids) for o in outs],
            m,
            [o.cached_tokens for o in outs],
        )

    preemptions, lengths, m, _cached = run(main)
    assert preemptions[0] == 0 and preemptions[1] == 0
    assert preemptions[2] >= 1  # C, the last admitted, is the victim
    assert lengths == [20, 10, 10]  # the victim still produces all its tokens
    assert m.num_preemptions == sum(preemptions)
    assert dict(m.finished_by_preemptions) == {0: 2, preemptions[2]: 1}
    # Re-prefills after a preemption are left out of the prefix-cache and prompt counters...
    assert m.prefix_cache_queries == 32 + 17 + 17
    assert m.prompt_tokens == 32 + 17 + 17
    # ... but the engine counts the recomputation.
    assert m.prompt_tokens_computed > 32 + 17 + 17


def test_a_preempting_step_admits_nothing() -> None:
    # As above; D (one block) arrives while C, the victim, heads the waiting queue. In the
    # step that preempts C nothing is admitted; D, queued behind C, runs only after C.
    cfg = config(num_blocks=7, max_model_len=96)

    async def main() -> list[float]:
        engine = SimEngine(cfg)
        a = engine.add_request(tokens(1, 32), max_tokens=20, ignore_eos=True)
        engine.add_request(tokens(2, 17), max_tokens=10, ignore_eos=True)
        c = engine.add_request(tokens(3, 17), max_tokens=10, ignore_eos=True)
        await asyncio.sleep(1e-9)  # step 0 (admits A, B, C) is in flight
        d = engine.add_request(tokens(4, 3), max_tokens=1, ignore_eos=True)
        await asyncio.sleep(engine.metrics().busy_time_s + 0.01)
        m = engine.metrics()
        assert m.num_preemptions >= 1
        assert m.num_requests_waiting_capacity == m.num_requests_waiting == 2
        outs = [await r.result() for r in (a, c, d)]
        await engine.aclose()
        return [o.first_token_time or 0.0 for o in outs[1:]]

    c_first, d_first = run(main)
    assert c_first < d_first  # FCFS: the preempted request goes back to the FRONT


def test_max_num_seqs_limits_the_running_batch() -> None:
    async def main() -> EngineMetrics:
        engine = SimEngine(config(max_num_seqs=2, max_num_batched_tokens=256))
        reqs = [engine.add_request(tokens(i, 20), max_tokens=5, ignore_eos=True) for i in range(4)]
        await asyncio.sleep(1e-9)
        m = engine.metrics()
        for r in reqs:
            await r.result()
        await engine.aclose()
        return m

    m = run(main)
    assert m.num_requests_running == 2
    assert m.num_requests_waiting == 2
    # vLLM files its whole main waiting queue under "capacity"; "deferred" is for LoRA / KV
    # transfer holds, which the simulator does not have.
    assert m.num_requests_waiting_capacity == 2
    assert m.num_requests_waiting_deferred == 0


def test_token_budget_chunks_a_long_prefill() -> None:
    cfg = config(max_num_batched_tokens=64)

    async def main() -> float:
        engine = SimEngine(cfg)
        out = await engine.add_request(tokens(1, 200), max_tokens=1, ignore_eos=True).result()
        await engine.aclose()
        assert out.first_token_time is not None
        return out.first_token_time - out.arrival_time

    expected = 0.0
    for start, n in ((0, 64), (64, 64), (128, 64), (192, 8)):
        expected += COST.prefill_time(n, start=start)
    assert run(main) == pytest.approx(expected, rel=1e-12)


def test_decode_timing_follows_the_cost_model() -> None:
    async def main() -> float:
        engine = SimEngine(config())
        out = await engine.add_request(tokens(1, 20), max_tokens=30, ignore_eos=True).result()
        await engine.aclose()
        return out.finish_time - out.arrival_time

    # One prefill step (20 tokens) producing token 1, then 29 decode steps of one sequence.
    expected = COST.prefill_time(20) + COST.decode_run_time(seqs=1, context_sum=20, steps=29)
    assert run(main) == pytest.approx(expected, rel=1e-9)


def test_budget_is_shared_between_decodes_and_prefill_chunks() -> None:
    cfg = config(max_num_batched_tokens=32, max_num_seqs=8)

    async def main() -> list[float]:
        engine = SimEngine(cfg)
        decoders = [
            engine.add_request(tokens(i, 8), max_tokens=40, ignore_eos=True) for i in range(2)
        ]
        await asyncio.sleep(0.005)
        big = engine.add_request(tokens(9, 100), max_tokens=1, ignore_eos=True)
        out = await big.result()
        for d in decoders:
            await d.result()
        await engine.aclose()
        assert out.first_token_time is not None
        return [out.first_token_time - out.arrival_time]

    (ttft,) = run(main)
    # 100 tokens at 30 tokens per step (2 go to the decoders) need 4 steps; alone they take 4
    # steps of 32 too, so compare with the decode-free time of 4 chunks of 30 instead:
    solo = sum(COST.prefill_time(n, start=s) for s, n in ((0, 30), (30, 30), (60, 30), (90, 10)))
    assert ttft > solo  # each step also carries the two decodes


# ---- outputs --------------------------------------------------------------------------------


def test_outputs_stream_and_respect_eos_settings() -> None:
    async def main() -> tuple[list[int], tuple[int, ...], list[tuple[str, int]]]:
        engine = SimEngine(config(eos_mean_tokens=8.0))
        req = engine.add_request(tokens(1, 10), max_tokens=30, ignore_eos=True)
        streamed = [t async for t in req.stream()]
        out = await req.result()
        ends = []
        for i in range(20):
            r = await engine.add_request(tokens(50 + i, 10), max_tokens=60, min_tokens=5).result()
            ends.append((r.finish_reason, len(r.output_token_ids)))
            if r.finish_reason == "stop":
                assert r.output_token_ids[-1] == EOS_TOKEN_ID
                assert EOS_TOKEN_ID not in r.output_token_ids[:-1]
        await engine.aclose()
        return streamed, out.output_token_ids, ends

    streamed, output, ends = run(main)
    assert streamed == list(output)
    assert len(output) == 30
    assert EOS_TOKEN_ID not in output
    assert all(n >= 5 for _, n in ends)
    assert any(reason == "stop" for reason, _ in ends)


TAIL = (901, 902, 903, 904)


@pytest.mark.parametrize(
    ("max_tokens", "min_tokens", "ignore_eos", "expected"),
    [
        # The tail, then EOS: no free tokens, whatever the EOS draw says.
        (30, 0, False, ([*TAIL, EOS_TOKEN_ID], "stop", 0)),
        # min_tokens holds EOS back: free tokens before the tail.
        (30, 8, False, ([-1, -1, -1, *TAIL, EOS_TOKEN_ID], "stop", 3)),
        # ignore_eos: exactly max_tokens, the tail last, no EOS.
        (10, 0, True, ([-1] * 6 + list(TAIL), "length", 6)),
        # Room for the tail but not for EOS.
        (4, 0, False, (list(TAIL), "length", 0)),
        # Too little room: the tail's head, cut.
        (3, 0, False, (list(TAIL[:3]), "length", 0)),
        (2, 0, True, (list(TAIL[:2]), "length", 0)),
    ],
)
def test_an_output_tail_ends_the_output(
    max_tokens: int, min_tokens: int, ignore_eos: bool, expected: tuple[list[int], str, int]
) -> None:
    async def main() -> tuple[list[int], tuple[int, ...], str, int | None, EngineMetrics]:
        engine = SimEngine(config(eos_mean_tokens=1000.0), fast_forward=False)
        req = engine.add_request(
            tokens(3, 40),
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
            output_tail=TAIL,
        )
        streamed = [t async for t in req.stream()]
        out = await req.result()
        metrics = engine.metrics()
        await engine.aclose()
        return streamed, out.output_token_ids, out.finish_reason, req.output_tail_start, metrics

    streamed, output, reason, start, metrics = run(main)
    ids, want_reason, want_start = expected
    assert streamed == list(output)
    assert len(output) == len(ids)
    assert all(want in (-1, got) for want, got in zip(ids, output, strict=True))
    assert EOS_TOKEN_ID not in output[: len(ids) - 1]
    assert (reason, start) == (want_reason, want_start)
    assert metrics.generation_tokens == len(ids)


def test_an_output_tail_is_cached_for_the_next_turn_and_checked() -> None:
    async def main() -> tuple[int, int]:
        engine = SimEngine(config())
        prompt = tokens(4, 40)
        first = await engine.add_request(prompt, max_tokens=20, output_tail=TAIL).result()
        again = [*prompt, *first.output_token_ids, *tokens(5, 20)]
        second = await engine.add_request(again, max_tokens=4, ignore_eos=True).result()
        with pytest.raises(ConfigError, match="output_tail"):
            engine.add_request(prompt, max_tokens=4, output_tail=(1 << 20,))
        await engine.aclose()
        return len(prompt) + len(first.output_token_ids), second.cached_tokens

    computed, cached = run(main)
    # Prompt and answer (tail and EOS) were computed but for the last token: their full blocks
    # are the next turn's hits, so the tail's ids were the request's own.
    assert cached == (computed - 1) // 16 * 16


def test_a_stream_gets_tokens_step_by_step_even_mid_fast_forward() -> None:
    async def main() -> list[float]:
        # Blocks of 128: without the cut, one fast-forwarded run would last to the finish.
        engine = SimEngine(config(block_size=128, num_blocks=8))
        req = engine.add_request(tokens(1, 20), max_tokens=60, ignore_eos=True)
        await asyncio.sleep(0.0123)  # ~10 steps into that run
        loop = asyncio.get_running_loop()
        times = [loop.time() async for _ in req.stream()]
        await engine.aclose()
        return times

    times = run(main)
    assert len(times) == 60
    groups = [times.count(t) for t in sorted(set(times))]
    # What was known at once (the prefill's token), the fast-forwarded steps up to the one in
    # flight together at its end, then one token per step, each at its own step's end.
    assert groups[0] == 1
    assert 1 < groups[1] < 20  # the run was cut at the step in flight
    assert groups[2:] == [1] * (60 - 1 - groups[1])


def test_abort_frees_the_request() -> None:
    async def main() -> tuple[str, int, EngineMetrics]:
        engine = SimEngine(config())
        req = engine.add_request(tokens(1, 100), max_tokens=400, ignore_eos=True)
        await asyncio.sleep(0.02)
        engine.abort(req.request_id)
        engine.abort(req.request_id)  # idempotent
        out = await req.result()
        m = engine.metrics()
        await engine.aclose()
        return out.finish_reason, len(out.output_token_ids), m

    reason, n, m = run(main)
    assert reason == "abort"
    assert 0 < n < 400
    assert m.kv_cache_usage == 0.0
    assert m.num_requests_aborted == 1
    assert m.num_requests_running == 0
    assert dict(m.request_success) == {}


def test_bad_requests_are_refused_with_the_field_named() -> None:
    async def main() -> None:
        engine = SimEngine(config())
        with pytest.raises(ConfigError, match="max_tokens"):
            engine.add_request(tokens(1, 500), max_tokens=20)
        with pytest.raises(ConfigError, match="prompt_token_ids"):
            engine.add_request(tokens(1, 600), max_tokens=1)
        with pytest.raises(ConfigError, match="prompt_token_ids"):
            engine.add_request([], max_tokens=1)
        with pytest.raises(ConfigError, match="min_tokens"):
            engine.add_request([20], max_tokens=1, min_tokens=2)
        engine.add_request([20], max_tokens=1, request_id="x")
        with pytest.raises(ConfigError, match="request_id"):
            engine.add_request([20], max_tokens=1, request_id="x")
        await engine.aclose()

    run(main)


# ---- the thrashing scenario -----------------------------------------------------------------


async def agents(
    engine: SimEngine, *, n: int, steps: int, concurrent: bool, seed: int = 7
) -> list[tuple[int, int, float, int, int, tuple[int, ...]]]:
    """ReAct-like agents: a shared system prompt, growing context, tool pauses between calls."""
    system = tokens(seed, 48)
    log: list[tuple[int, int, float, int, int, tuple[int, ...]]] = []

    async def agent(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        ctx = [*system, *tokens(seed * 100 + i, 24)]
        for s in range(steps):
            out = await engine.add_request(
                ctx, max_tokens=rng.randrange(16, 40), ignore_eos=True
            ).result()
            log.append(
                (
                    i,
                    s,
                    out.finish_time,
                    out.cached_tokens,
                    out.num_preemptions,
                    out.output_token_ids,
                )
            )
            ctx = [*ctx, *out.output_token_ids, *tokens(rng.randrange(1 << 30), 24)]
            await asyncio.sleep(rng.uniform(0.02, 0.2))  # the tool call

    if concurrent:
        await asyncio.gather(*(agent(i) for i in range(n)))
    else:
        for i in range(n):
            await agent(i)
    return log


THRASH = config(num_blocks=48, max_model_len=512, max_num_seqs=32)


def test_many_agents_thrash_while_one_at_a_time_does_not() -> None:
    async def scenario(concurrent: bool) -> tuple[EngineMetrics, list[Any]]:
        engine = SimEngine(THRASH)
        log = await agents(engine, n=16, steps=8, concurrent=concurrent)
        m = engine.metrics()
        await engine.aclose()
        return m, log

    together, log = run(lambda: scenario(True))
    alone, _ = run(lambda: scenario(False))

    # One at a time: every call re-uses the agent's whole history; nothing is preempted.
    assert alone.num_preemptions == 0
    assert hit_rate(alone) > 0.8
    # All at once: the contexts outgrow the cache (16 x ~500 tokens vs 768), the hit rate
    # collapses and requests are preempted.
    assert together.num_preemptions > 0
    assert hit_rate(together) < 0.5 * hit_rate(alone)
    assert together.prompt_tokens_computed > 2 * alone.prompt_tokens_computed

    # Mid-run collapse: late steps hit the cache less than the first follow-up calls.
    def step_hit(step: int) -> float:
        rows = [r for r in log if r[1] == step]
        return sum(r[3] for r in rows) / len(rows)

    assert step_hit(1) > step_hit(7)


# ---- determinism and fast-forward -----------------------------------------------------------


def test_same_requests_give_the_same_timeline() -> None:
    async def once() -> tuple[list[Any], EngineMetrics]:
        engine = SimEngine(THRASH)
        log = await agents(engine, n=10, steps=5, concurrent=True, seed=3)
        m = engine.metrics()
        await engine.aclose()
        return log, m

    first = run(once)
    second = run(once)
    assert first == second


def test_fast_forward_gives_the_single_step_timeline() -> None:
    async def once(fast: bool) -> tuple[list[Any], EngineMetrics, list[EngineMetrics]]:
        engine = SimEngine(THRASH, fast_forward=fast)
        scrapes: list[EngineMetrics] = []

        async def scrape() -> None:
            while True:
                await asyncio.sleep(0.0471)
                scrapes.append(dataclasses.replace(engine.metrics(), busy_time_s=0.0))

        scraper = asyncio.create_task(scrape())
        log = await agents(engine, n=12, steps=6, concurrent=True, seed=5)
        scraper.cancel()
        m = engine.metrics()
        await engine.aclose()
        return log, m, scrapes

    fast_log, fast_m, fast_scrapes = run(lambda: once(True))
    slow_log, slow_m, slow_scrapes = run(lambda: once(False))
    # A /metrics scrape mid-run sees the same counters in both modes.
    assert fast_scrapes == slow_scrapes
    assert len({s.generation_tokens for s in fast_scrapes}) > 20
    assert [r[:2] + r[3:] for r in fast_log] == [r[:2] + r[3:] for r in slow_log]
    for f, s in zip(fast_log, slow_log, strict=True):
        assert f[2] == pytest.approx(s[2], rel=1e-12, abs=1e-12)
    assert fast_m.num_steps == slow_m.num_steps
    assert fast_m.num_preemptions == slow_m.num_preemptions > 0
    assert dataclasses.replace(fast_m, busy_time_s=0.0) == dataclasses.replace(
        slow_m, busy_time_s=0.0
    )
    assert fast_m.busy_time_s == pytest.approx(slow_m.busy_time_s, rel=1e-12)


# ---- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"block_size": -16}, "block_size"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"num_blocks": 4, "max_model_len": 512}, "max_model_len"),
        ({"max_num_batched_tokens": 8, "max_num_seqs": 16}, "max_num_batched_tokens"),
        ({"model_name": " "}, "model_name"),
        ({"eos_mean_tokens": 0.0}, "eos_mean_tokens"),
        ({"vocab_size": 10}, "vocab_size"),
        ({"request_overhead_s": -0.1}, "request_overhead_s"),
        ({"request_overhead_s": math.nan}, "request_overhead_s"),
        ({"request_overhead_s": math.inf}, "request_overhead_s"),
        ({"request_overhead_per_request_s": -1e-3}, "request_overhead_per_request_s"),
        ({"request_overhead_per_request_s": "0.1"}, "request_overhead_per_request_s"),
        ({"request_overhead_after_share": 1.5}, "request_overhead_after_share"),
        ({"request_overhead_after_share": -0.1}, "request_overhead_after_share"),
        ({"request_overhead_after_share": True}, "request_overhead_after_share"),
        ({"tool_call_turns": (2, 1)}, "tool_call_turns"),
        ({"tool_call_turns": (-1, 1)}, "tool_call_turns"),
        ({"tool_call_turns": (1,)}, "tool_call_turns"),
        ({"tool_call_turns": 2}, "tool_call_turns"),
        ({"tool_call_turns": (True, 2)}, "tool_call_turns"),
    ],
)
def test_bad_config_is_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        config(**changes)


def test_request_overhead_grows_with_requests_in_flight_and_splits_around_the_engine() -> None:
    cfg = config(
        request_overhead_s=0.1,
        request_overhead_per_request_s=0.02,
        request_overhead_after_share=0.25,
    )
    before, after = cfg.request_overhead(0)
    assert (before, after) == pytest.approx((0.075, 0.025))
    before, after = cfg.request_overhead(10)
    assert before + after == pytest.approx(0.3)
    assert after == pytest.approx(0.075)
    # The default costs nothing, whatever the load: GPU presets and test configs are unchanged.
    assert config().request_overhead(50) == (0.0, 0.0)
    for preset in ("h100-qwen3-32b-tp2", "test-tiny"):
        assert get_preset(preset).request_overhead(50) == (0.0, 0.0)


@pytest.mark.parametrize(
    "name",
    [
        "step_overhead_s",
        "prefill_token_s",
        "decode_seq_s",
        "attention_pair_s",
        "decode_seq_above_knee_s",
        "decode_knee_seqs",
    ],
)
def test_bad_cost_is_refused_naming_the_field(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        dataclasses.replace(COST, **{name: -1.0})


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="h100-qwen3-32b-tp2") as info:
        get_preset("a100")
    assert "cpu-tiny" in str(info.value)
    assert "'a100'" in str(info.value)


def test_presets_follow_their_derivations() -> None:
    h100 = get_preset("h100-qwen3-32b-tp2")
    assert h100.cost.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2 == 256 * 1024
    assert h100.block_size == 16 and h100.max_num_seqs == 1024
    assert h100.max_num_batched_tokens == 8192
    # ~41.7 GB of KV per GPU at 128 KiB/token/GPU: ~318k tokens.
    assert 300_000 < h100.kv_capacity_tokens < 330_000
    # One decode step of one short sequence: weights read at 80% of 2 x 3.35 TB/s + overhead.
    assert 0.012 < h100.cost.decode_step_time(seqs=1, context_sum=0) < 0.016
    tiny = get_preset("cpu-tiny")
    assert (tiny.num_blocks, tiny.block_size, tiny.kv_capacity_tokens) == (32, 128, 4096)
    assert tiny.max_model_len == 2048
    assert tiny.cost.kv_bytes_per_token == 4096
    for cfg in PRESETS.values():
        assert cfg.kv_capacity_tokens >= cfg.max_model_len


@pytest.mark.parametrize("cost", [COST, KNEE_COST], ids=["linear", "knee"])
def test_decode_run_closed_form_matches_step_sum(cost: CostModel) -> None:
    total = 0.0
    for j in range(37):
        total += cost.decode_step_time(seqs=5, context_sum=1000 + 5 * j)
    assert cost.decode_run_time(seqs=5, context_sum=1000, steps=37) == pytest.approx(total)


def test_decode_cost_bends_at_the_knee() -> None:
    # 3 sequences at 100 us each, every further one at 20 us.
    assert KNEE_COST.decode_time(2) == pytest.approx(200e-6)
    assert KNEE_COST.decode_time(3) == pytest.approx(300e-6)
    assert KNEE_COST.decode_time(10) == pytest.approx(300e-6 + 7 * 20e-6)
    assert KNEE_COST.min_decode_seq_s == 20e-6
    assert COST.decode_time(10) == pytest.approx(10 * COST.decode_seq_s)
    assert COST.min_decode_seq_s == COST.decode_seq_s


def test_a_knee_needs_its_count() -> None:
    with pytest.raises(ConfigError, match="decode_knee_seqs is 0"):
        dataclasses.replace(COST, decode_seq_above_knee_s=1e-6)


def test_the_engine_times_a_big_batch_with_the_knee() -> None:
    batch = 6

    async def main() -> float:
        engine = SimEngine(config(cost=KNEE_COST))
        reqs = [
            engine.add_request(tokens(i, 10), max_tokens=20, ignore_eos=True) for i in range(batch)
        ]
        outs = [await r.result() for r in reqs]
        await engine.aclose()
        return max(o.finish_time for o in outs)

    # One step prefills the six prompts together, then 19 decode steps of six sequences.
    prefill = KNEE_COST.step_time(
        prefill_tokens=batch * 10,
        attention_pairs=batch * (10 * 11 // 2),
        kv_tokens_read=batch * 10,
    )
    decode = KNEE_COST.decode_run_time(seqs=batch, context_sum=batch * 10, steps=19)
    assert run(main) == pytest.approx(prefill + decode, rel=1e-9)
    # Beyond the knee the six-sequence decode is cheaper than the linear model's.
    assert decode < COST.decode_run_time(seqs=batch, context_sum=batch * 10, steps=19)


def test_cpu_tiny_does_not_reuse_generated_blocks() -> None:
    # The real server's random-weight model never serves an answer's blocks from the cache.
    assert get_preset("cpu-tiny").reuse_generated_blocks is False
    assert get_preset("h100-qwen3-32b-tp2").reuse_generated_blocks is True


# ---- invariants over random workloads -------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    num_blocks=st.integers(min_value=32, max_value=60),
    max_num_seqs=st.integers(min_value=1, max_value=8),
    budget=st.integers(min_value=8, max_value=96),
    requests=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=100),  # prompt length
            st.integers(min_value=1, max_value=27),  # max_tokens
            st.integers(min_value=0, max_value=3),  # shared-prefix group
            st.floats(min_value=0.0, max_value=0.05),  # arrival delay
            st.booleans(),  # ignore_eos
            st.booleans(),  # aborted
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_random_workloads_finish_cleanly_and_fast_forward_is_exact(
    num_blocks: int,
    max_num_seqs: int,
    budget: int,
    requests: list[tuple[int, int, int, float, bool, bool]],
) -> None:
    cfg = config(
        num_blocks=num_blocks,
        block_size=4,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(budget, max_num_seqs),
        max_model_len=128,
        eos_mean_tokens=6.0,
    )

    async def once(fast: bool) -> tuple[list[Any], EngineMetrics]:
        engine = SimEngine(cfg, fast_forward=fast)

        async def one(i: int, spec: tuple[int, int, int, float, bool, bool]) -> Any:
            plen, max_tokens, group, delay, ignore_eos, aborted = spec
            # Distinct arrival times: the order of two timers due at the very same instant is
            # up to the event loop's heap, which the engine's own timers shape differently in
            # the two modes.
            await asyncio.sleep(delay + i * 1e-7)
            prompt = [*tokens(group, 40), *tokens(1000 + i, 100)][-plen:]
            req = engine.add_request(prompt, max_tokens=max_tokens, ignore_eos=ignore_eos)
            if aborted:
                await asyncio.sleep(0.003)
                engine.abort(req.request_id)
            out = await req.result()
            if out.finish_reason == "length":
                assert len(out.output_token_ids) == max_tokens
            elif out.finish_reason == "stop":
                assert len(out.output_token_ids) <= max_tokens
                assert out.output_token_ids[-1] == EOS_TOKEN_ID
            else:
                assert aborted
            return out

        outs = await asyncio.gather(*(one(i, spec) for i, spec in enumerate(requests)))
        await asyncio.sleep(0.01)
        m = engine.metrics()
        await engine.aclose()
        return outs, m

    fast_outs, fast_m = run(lambda: once(True))
    slow_outs, slow_m = run(lambda: once(False))
    # Nothing leaks: every block is free again, nothing is left queued.
    assert fast_m.kv_cache_usage == 0.0
    assert fast_m.num_requests_running == fast_m.num_requests_waiting == 0
    assert sum(fast_m.request_success.values()) + fast_m.num_requests_aborted == len(requests)
    assert fast_m.prefix_cache_hits <= fast_m.prefix_cache_queries
    # Fast-forward changes nothing but the wall time.
    assert [dataclasses.replace(o, finish_time=0.0, first_token_time=None) for o in fast_outs] == [
        dataclasses.replace(o, finish_time=0.0, first_token_time=None) for o in slow_outs
    ]
    for f, s in zip(fast_outs, slow_outs, strict=True):
        assert f.finish_time == pytest.approx(s.finish_time, rel=1e-12, abs=1e-12)
    assert dataclasses.replace(fast_m, busy_time_s=0.0) == dataclasses.replace(
        slow_m, busy_time_s=0.0
    )
