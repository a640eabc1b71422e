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
