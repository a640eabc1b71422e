"""Calibration: the least-squares fit, and recovering a simulator's own constants."""

from __future__ import annotations

import dataclasses
import math
import random

import httpx
import pytest

from concur_langgraph import ConcurError, ConfigError, vtime
from concur_langgraph.sim._calibrate import (
    CalibrationSample,
    calibrate,
    calibrated_config,
    fit_cost_model,
)
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._cost import CostModel, chunk_attention_pairs
from concur_langgraph.sim._presets import get_preset

TRUE = CostModel(
    step_overhead_s=8e-3,
    prefill_token_s=50e-6,
    decode_seq_s=0.5e-3,
    attention_pair_s=0.4e-9,
    kv_bytes_per_token=4096,
    kv_read_bytes_per_s=10e9,
)
FIELDS = ("step_overhead_s", "prefill_token_s", "decode_seq_s", "attention_pair_s")
ROOMY = dataclasses.replace(
    get_preset("cpu-tiny"),
    num_blocks=128,
    max_num_batched_tokens=4096,
    # The preset's time outside the engine grows with the requests in flight, which the
    # step-time fit does not model; the tests of the fit measure the engine alone.
    request_overhead_s=0.0,
    request_overhead_per_request_s=0.0,
)


def synthetic(cost: CostModel, *, request_s: float, noise: float = 0.0) -> list[CalibrationSample]:
    """Measurements a server following ``cost`` exactly would give (with optional noise)."""
    rng = random.Random(1)
    out: list[CalibrationSample] = []

    def add(steps: int, prefill: int, decode: int, pairs: int, kv: int) -> None:
        t = (
            request_s
            + cost.step_overhead_s * steps
            + cost.step_time(
                prefill_tokens=prefill, decode_seqs=decode, attention_pairs=pairs, kv_tokens_read=kv
            )
            - cost.step_overhead_s
        )
        t *= 1 + rng.uniform(-noise, noise)
        out.append(
            CalibrationSample(
                duration_s=t,
                requests=1,
                steps=steps,
                prefill_tokens=prefill,
                decode_seqs=decode,
                attention_pairs=pairs,
                kv_tokens_read=kv,
            )
        )

    for p in (64, 256, 512, 1024, 1536):
        add(1, p, 0, chunk_attention_pairs(0, p), p)
    for batch in (1, 4, 8):
        for ctx in (48, 192):
            for n in (8, 32):
                total = batch * ctx
                d = n - 1
                dctx = d * total + batch * d * (d + 1) // 2
                add(n, total, batch * d, batch * chunk_attention_pairs(0, ctx) + dctx, total + dctx)
    return out


def assert_close(fitted: CostModel, expected: CostModel, rel: float) -> None:
    for name in FIELDS:
        assert getattr(fitted, name) == pytest.approx(getattr(expected, name), rel=rel), name
    assert fitted.kv_read_token_s == pytest.approx(expected.kv_read_token_s, rel=rel)


def test_fit_recovers_exact_constants() -> None:
    fitted = fit_cost_model(synthetic(TRUE, request_s=2e-3), kv_bytes_per_token=4096)
    assert_close(fitted, TRUE, rel=1e-6)
    assert fitted.kv_bytes_per_token == 4096


def test_fit_tolerates_measurement_noise() -> None:
    fitted = fit_cost_model(synthetic(TRUE, request_s=2e-3, noise=0.02), kv_bytes_per_token=4096)
    # The big terms are well determined even with 2% noise on every measurement.
    assert fitted.step_overhead_s == pytest.approx(TRUE.step_overhead_s, rel=0.15)
    assert fitted.decode_seq_s == pytest.approx(TRUE.decode_seq_s, rel=0.15)
    for name in FIELDS:
        assert getattr(fitted, name) >= 0


def test_fit_clamps_terms_the_server_does_not_have() -> None:
    no_attention = dataclasses.replace(TRUE, attention_pair_s=0.0, kv_read_bytes_per_s=math.inf)
    exact = fit_cost_model(synthetic(no_attention, request_s=0.0))
    assert exact.attention_pair_s == pytest.approx(0.0, abs=1e-15)
    assert exact.kv_read_token_s == pytest.approx(0.0, abs=1e-15)
    assert exact.decode_seq_s == pytest.approx(TRUE.decode_seq_s, rel=1e-6)
    # With noise the unconstrained solution would go negative on some runs; never here.
    for seed_noise in (0.01, 0.03, 0.05):
        noisy = fit_cost_model(synthetic(no_attention, request_s=0.0, noise=seed_noise))
        assert all(getattr(noisy, name) >= 0 for name in FIELDS)
        assert noisy.kv_read_token_s >= 0


def test_fit_needs_enough_samples() -> None:
    with pytest.raises(ConfigError, match="samples"):
        fit_cost_model(synthetic(TRUE, request_s=0.0)[:3])


def test_calibrated_config_keeps_the_kv_geometry() -> None:
    base = get_preset("cpu-tiny")
    fitted = fit_cost_model(synthetic(TRUE, request_s=1e-3))  # 1 byte per token
    cfg = calibrated_config(base, fitted)
    assert cfg.cost.kv_bytes_per_token == base.cost.kv_bytes_per_token
    assert cfg.cost.kv_read_token_s == pytest.approx(TRUE.kv_read_token_s, rel=1e-6)
    assert (cfg.num_blocks, cfg.block_size, cfg.max_model_len) == (32, 128, 2048)


def test_calibrating_the_simulator_recovers_its_constants() -> None:
    from concur_langgraph.sim._server import SimServer

    # A roomy cache and budget so that every batch prefills in one step, as calibrate assumes.
    cfg = dataclasses.replace(ROOMY, cost=TRUE)

    async def main() -> CostModel:
        async with SimServer(cfg) as server, server.http_client() as client:
            return await calibrate(server.base_url, client=client, kv_bytes_per_token=4096)

    assert_close(vtime.run(main()), TRUE, rel=1e-6)


def test_a_fixed_time_outside_the_engine_is_fitted_apart_from_the_step_constants() -> None:
    from concur_langgraph.sim._server import SimServer

    # 60 ms per call outside the engine, a fifth of it after: calibration's per-request term
    # takes it, and the step constants come out as without it.
    cfg = dataclasses.replace(
        ROOMY, cost=TRUE, request_overhead_s=0.06, request_overhead_after_share=0.2
    )

    async def main() -> CostModel:
        async with SimServer(cfg) as server, server.http_client() as client:
            return await calibrate(server.base_url, client=client, kv_bytes_per_token=4096)

    assert_close(vtime.run(main()), TRUE, rel=1e-6)


def test_calibrate_reports_a_failing_server() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="boom")

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await calibrate("http://server:8000/v1", client=client)

    with pytest.raises(ConcurError, match="500"):
        vtime.run(main())


def test_calibrate_refuses_a_bad_url() -> None:
    async def main() -> None:
        await calibrate("server:8000")

    with pytest.raises(ConfigError, match="base_url"):
        vtime.run(main())


def test_config_type_is_checked() -> None:
    with pytest.raises(ConfigError, match="cost"):
        SimConfig(
            model_name="m",
            num_blocks=8,
            block_size=16,
            max_num_seqs=4,
            max_num_batched_tokens=64,
            max_model_len=64,
            cost="fast",  # type: ignore[arg-type]
        )


KNEE = dataclasses.replace(
    TRUE, attention_pair_s=0.0, decode_knee_seqs=8, decode_seq_above_knee_s=0.1e-3
)


def knee_samples(cost: CostModel) -> list[CalibrationSample]:
    """Prefills and decode runs of 1-32 sequences timed on a server following ``cost``
    (per-step costs summed step by step, so a knee applies to each step's batch)."""
    request_s = 1e-3
    out: list[CalibrationSample] = []
    for p in (64, 256, 512, 1024):
        out.append(
            CalibrationSample(
                duration_s=request_s + cost.prefill_time(p),
                requests=1,
                steps=1,
                prefill_tokens=p,
                decode_seqs=0,
                attention_pairs=chunk_attention_pairs(0, p),
                kv_tokens_read=p,
            )
        )
    for batch in (1, 4, 8, 12, 16, 24, 32):
        for ctx in (48, 64):
            for n in (16, 64):
                total, d = batch * ctx, n - 1
                dctx = d * total + batch * d * (d + 1) // 2
                prefill_pairs = batch * chunk_attention_pairs(0, ctx)
                t = (
                    request_s
                    + cost.step_time(
                        prefill_tokens=total, attention_pairs=prefill_pairs, kv_tokens_read=total
                    )
                    + cost.decode_run_time(seqs=batch, context_sum=total, steps=d)
                )
                out.append(
                    CalibrationSample(
                        duration_s=t,
                        requests=1,
                        steps=n,
                        prefill_tokens=total,
                        decode_seqs=batch * d,
                        attention_pairs=prefill_pairs + dctx,
                        kv_tokens_read=total + dctx,
                    )
                )
    return out


def test_fit_finds_the_decode_knee() -> None:
    fitted = fit_cost_model(knee_samples(KNEE), kv_bytes_per_token=4096, decode_knees=(0, 4, 8, 16))
    assert fitted.decode_knee_seqs == 8
    assert fitted.decode_seq_above_knee_s == pytest.approx(KNEE.decode_seq_above_knee_s, rel=1e-6)
    assert_close(fitted, KNEE, rel=1e-6)


def test_a_linear_server_gets_a_model_that_predicts_linearly() -> None:
    linear = dataclasses.replace(TRUE, attention_pair_s=0.0)
    fitted = fit_cost_model(knee_samples(linear), decode_knees=(0, 8, 16))
    # Whatever knee wins, the model must predict the linear server's decode steps.
    for batch in (1, 8, 9, 16, 32):
        assert fitted.decode_time(batch) == pytest.approx(linear.decode_time(batch), rel=1e-6)


def test_knees_beyond_the_measured_batches_are_not_candidates() -> None:
    samples = synthetic(TRUE, request_s=0.0)  # decode batches up to 8
    fitted = fit_cost_model(samples, decode_knees=(0, 8, 16))
    assert fitted.decode_knee_seqs == 0
    with pytest.raises(ConfigError, match="decode_knees"):
        fit_cost_model(samples, decode_knees=(16,))
    with pytest.raises(ConfigError, match="decode_knees"):
        fit_cost_model(samples, decode_knees=(-1,))


def test_decode_batch_of_a_measurement() -> None:
    prefill, decode = knee_samples(KNEE)[0], knee_samples(KNEE)[-1]
    assert prefill.decode_batch == 0
    assert decode.decode_batch == 32


def test_decode_steps_measured_on_the_simulator_are_its_step_times() -> None:
    from concur_langgraph.sim._calibrate import measure_decode_steps
    from concur_langgraph.sim._server import SimServer

    # Room for 32 sequences of 64 + 256 tokens, and a batch that prefills in one step.
    cfg = dataclasses.replace(ROOMY, cost=KNEE)
    no_context = dataclasses.replace(KNEE, kv_read_bytes_per_s=math.inf)
    cfg = dataclasses.replace(cfg, cost=no_context)

    async def main() -> list[float]:
        async with SimServer(cfg) as server, server.http_client() as client:
            got = await measure_decode_steps(server.base_url, client=client)
            return [s.step_s for s in got]

    measured = vtime.run(main())
    batches = (1, 2, 4, 8, 16, 24, 32)
    expected = [no_context.decode_step_time(seqs=b, context_sum=0) for b in batches]
    assert measured == pytest.approx(expected, rel=1e-9)
    # The knee is visible in the measurement: each sequence beyond 8 costs less.
    assert measured[-1] - measured[-2] < measured[3] - measured[2]


def test_measure_decode_steps_checks_output_tokens() -> None:
    from concur_langgraph.sim._calibrate import measure_decode_steps

    async def main() -> None:
        await measure_decode_steps("http://server:8000", output_tokens=(32, 16))

    with pytest.raises(ConfigError, match="output_tokens"):
        vtime.run(main())


# -- chunked prefill and long contexts (the medium model's server) ---------------------------


def test_prefill_chunks() -> None:
    from concur_langgraph.sim._calibrate import prefill_chunks

    assert prefill_chunks(0, 3000, 2048) == [(0, 2048), (2048, 952)]
    assert prefill_chunks(128, 4096, 2048) == [(128, 2048), (2176, 2048)]
    assert prefill_chunks(0, 3000, None) == [(0, 3000)]
    assert prefill_chunks(256, 0, 2048) == [(256, 0)]


# A budget of 512 tokens per step: prefills of 1024 and 1536 tokens take 2 and 3 steps.
CHUNKED = dataclasses.replace(ROOMY, cost=TRUE, max_num_batched_tokens=512)
CHUNKED_PLAN: dict[str, object] = {
    "prefill_sizes": (64, 256, 1024, 1536),
    "contexts": (40, 56),  # 8 x 56 prompt tokens still prefill in one step
}


def _calibrate_sim(cfg: SimConfig, **kwargs: object) -> CostModel:
    from concur_langgraph.sim._server import SimServer

    async def main() -> CostModel:
        async with SimServer(cfg) as server, server.http_client() as client:
            return await calibrate(
                server.base_url,
                client=client,
                kv_bytes_per_token=4096,
                **kwargs,  # type: ignore[arg-type]
            )

    return vtime.run(main())


def test_prefills_longer_than_the_budget_are_fitted_as_chunks() -> None:
    fitted = _calibrate_sim(CHUNKED, max_num_batched_tokens=512, **CHUNKED_PLAN)
    assert_close(fitted, TRUE, rel=1e-6)
    # Read as one step each, the same prefills mislead the fit: the attention term (which
    # chunking reduces) and the per-step cost come out wrong.
    naive = _calibrate_sim(CHUNKED, **CHUNKED_PLAN)
    errors = [abs(getattr(naive, f) / getattr(TRUE, f) - 1) for f in FIELDS]
    assert max(errors) > 0.05


def test_long_context_decode_steps_join_the_fit() -> None:
    # Decode steps at 600-900 tokens of context, where attention and KV reads weigh.
    fitted = _calibrate_sim(
        dataclasses.replace(ROOMY, cost=TRUE),
        long_contexts=((1, 900), (2, 600)),
        long_output_tokens=(8, 40),
    )
    assert_close(fitted, TRUE, rel=1e-6)


def test_decode_runs_must_prefill_in_one_step() -> None:
    from concur_langgraph.sim._calibrate import measure

    async def main() -> None:
        await measure("http://server:8000", contexts=(48, 192), max_num_batched_tokens=1024)

    with pytest.raises(ConfigError, match="contexts: a decode run of 8 x 192"):
        vtime.run(main())


def test_a_difference_of_two_decode_runs_is_decode_steps_only() -> None:
    from concur_langgraph.sim._calibrate import DecodeStepSample

    short = CalibrationSample(
        duration_s=0.5,
        requests=1,
        steps=16,
        prefill_tokens=4000,
        decode_seqs=4 * 15,
        attention_pairs=10_000,
        kv_tokens_read=70_000,
    )
    long = dataclasses.replace(
        short,
        duration_s=2.5,
        steps=176,
        decode_seqs=4 * 175,
        attention_pairs=90_000,
        kv_tokens_read=800_000,
    )
    diff = DecodeStepSample(short=short, long=long).difference
    assert (diff.duration_s, diff.requests, diff.steps) == (2.0, 0, 160)
    assert (diff.prefill_tokens, diff.decode_seqs, diff.decode_batch) == (0, 640, 4)
    assert (diff.attention_pairs, diff.kv_tokens_read) == (80_000, 730_000)
    with pytest.raises(ValueError, match="not longer"):
        _ = DecodeStepSample(short=long, long=short).difference


def test_calibration_plan_of_a_preset_and_its_flags() -> None:
    import argparse

    from concur_langgraph.sim._cli import CALIBRATION_PLANS, calibration_plan

    def args(**kw: object) -> argparse.Namespace:
        base: dict[str, object] = dict.fromkeys(
            ("prefill_sizes", "batch_sizes", "contexts", "knees", "long_contexts", "repeats")
        )
        return argparse.Namespace(**{**base, "preset": "cpu-medium", **kw})

    plan = calibration_plan(args())
    assert plan == CALIBRATION_PLANS["cpu-medium"]
    # Every measurement fits the medium server: decode batches prefill in one step of its
    # budget, long contexts and their outputs fit its max_model_len and cache.
    medium = get_preset("cpu-medium")
    assert max(plan["batch_sizes"]) * max(plan["contexts"]) <= medium.max_num_batched_tokens
    for batch, context in plan["long_contexts"]:
        assert context + 128 <= medium.max_model_len
        assert batch * -(-(context + 128 + 16) // medium.block_size) < medium.num_blocks
    custom = calibration_plan(args(prefill_sizes="128,4000", long_contexts="2x1000", repeats=1))
    assert custom["prefill_sizes"] == (128, 4000)
    assert custom["long_contexts"] == ((2, 1000),)
    assert custom["repeats"] == 1
    assert calibration_plan(args(preset="cpu-tiny"))["prefill_sizes"] == (64, 256, 512, 1024)
    with pytest.raises(ConfigError, match="--long-contexts"):
        calibration_plan(args(long_contexts="4x"))
    with pytest.raises(ConfigError, match="--knees"):
        calibration_plan(args(knees="a"))


def test_calibrate_cli_refuses_a_bad_plan(capsys: pytest.CaptureFixture[str]) -> None:
    from concur_langgraph.cli import main

    argv = ["sim", "calibrate", "--url", "http://127.0.0.1:1", "--preset", "cpu-medium"]
    assert main([*argv, "--long-contexts", "x"]) == 2
    assert "--long-contexts: expected BATCHxCONTEXT pairs" in capsys.readouterr().err


def test_cpu_medium_preset_is_the_medium_server() -> None:
    from concur_langgraph.testing.vllm_cpu import MODELS, VLLMServerConfig

    preset, server = get_preset("cpu-medium"), VLLMServerConfig(model="medium")
    assert preset.kv_capacity_tokens == server.kv_cache_tokens == 8192
    assert preset.max_model_len == server.resolved_max_model_len()
    assert preset.cost.kv_bytes_per_token == MODELS["medium"].kv_bytes_per_token
    assert preset.model_name == "medium"
    assert preset.reuse_generated_blocks is False


def test_the_cpu_medium_plan_recovers_the_presets_constants() -> None:
    from concur_langgraph.sim._cli import CALIBRATION_PLANS

    # What `concur sim calibrate --preset cpu-medium` measures, on a simulator of the medium
    # server: it fits (no plan error, no preemption spoiling a run) and finds its constants.
    # Not exactly: a batch of long prompts is chunked over several steps, and two runs of a
    # decode-step pair differ by a few prompt tokens, which the difference only nearly cancels.
    medium = dataclasses.replace(
        get_preset("cpu-medium"), request_overhead_s=0.0, request_overhead_per_request_s=0.0
    )
    fitted = _calibrate_sim(
        medium,
        max_num_batched_tokens=medium.max_num_batched_tokens,
        **CALIBRATION_PLANS["cpu-medium"],
    )
    assert fitted.decode_knee_seqs == medium.cost.decode_knee_seqs
    for name in (*FIELDS, "decode_seq_above_knee_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(medium.cost, name), rel=0.02), name
    assert fitted.kv_read_token_s == pytest.approx(medium.cost.kv_read_token_s, rel=0.1)
