"""Write the ``/metrics`` page of an SGLang server with SGLang's own metric code.

Writes ``sglang_0.5.23_metrics.txt`` next to this file. A real SGLang server cannot run on the
project's machines (CPU only: PyPI's ``sglang-kernel`` 0.4.10 ships only CUDA builds of its ops,
and SGLang's CPU kernels exist only as source; docs/usage.md, "SGLang"). So this script runs the
code that makes the page, unchanged, from the released package ``sglang==0.5.23`` (PyPI,
``sglang/srt/observability/metrics_collector.py``; in the repository sgl-project/sglang that
file is ``python/sglang/srt/observability/metrics_collector.py``):

* the process-wide config is published as ``python -m sglang.launch_server --model-path DIR
  --served-model-name tiny --device cpu --enable-metrics --max-total-tokens 4096
  --context-length 2048`` publishes it (``runtime_context.publish``);
* ``SchedulerMetricsCollector.init_new`` and ``TokenizerMetricsCollector`` make the series with
  the labels a one-GPU server gives them (``model_name``, ``engine_type``, ``tp_rank``,
  ``pp_rank``, ``moe_ep_rank``);
* the calls the scheduler and the tokenizer manager make while serving are made with the numbers
  of a short agent batch on the 4,096-token cache (``emit_constants`` at start-up, per prefill
  batch ``increment_realtime_tokens`` / ``increment_effective_prefill_tokens`` /
  ``log_stats``, ``increment_retracted_reqs``, per finished request
  ``observe_one_finished_request``);
* the page is rendered the way the server's ``/metrics`` route renders it
  (``sglang.srt.utils.common.add_prometheus_middleware``: a ``CollectorRegistry`` holding a
  ``MultiProcessCollector`` over ``PROMETHEUS_MULTIPROC_DIR``, ``generate_latest``).

Run it with the python of a venv where ``pip install sglang==0.5.23`` went through (no GPU
needed: nothing here loads a kernel)::

    python tests/data/capture_sglang_metrics.py --model-path .cache/vllm-cpu/tiny-model
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

OUT = Path(__file__).with_name("sglang_0.5.23_metrics.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    # SGLang sets this before its processes import prometheus_client; so do we.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sglang-metrics-")

    import sglang
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from sglang.srt.observability.metrics_collector import (
        QueueCount,
        SchedulerMetricsCollector,
        SchedulerStats,
        TokenizerMetricsCollector,
        tokenizer_metric_labels,
    )
    from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank
    from sglang.srt.server_args import ServerArgs

    assert sglang.__version__ == "0.5.23", sglang.__version__
    server_args = ServerArgs(
        model_path=args.model_path,
        served_model_name="tiny",
        device="cpu",
        enable_metrics=True,
        max_total_tokens=4096,
        context_length=2048,
    )
    # As run_scheduler_process publishes it for the one scheduler (tp_rank 0, pp_rank 0).
    publish(
        server_args,
        role="scheduler",
        ranks=SpawnRanks(
            world_rank=spawn_world_rank(server_args, tp_rank=0, pp_rank=0), dp_rank=None
        ),
    )
    context = SchedulerMetricsCollector.init_new(
        server_args=server_args,
        enable_priority_scheduling=False,
        enable_lora=False,
        enable_hierarchical_cache=False,
    )
    scheduler = context.collector
    assert scheduler is not None
    tokenizer = TokenizerMetricsCollector(server_args=server_args, labels=tokenizer_metric_labels())

    scheduler.emit_constants(
        max_total_num_tokens=4096,
        max_total_num_tokens_swa=None,
        weight_memory_usage_gb=0.01,
        kv_cache_memory_usage_gb=0.02,
        graph_memory_usage_gb={},
        max_running_requests_under_SLO=None,
        page_size=1,
        num_pages=4096,
        context_len=2048,
        startup_available_gpu_memory_gb=21.5,
    )
    # Twelve prefill batches of an agent batch: a 600-token prompt each, the shared 200-token
    # system prompt hit from the radix cache after the first; two requests retracted.
    for step in range(12):
        hits = 0 if step == 0 else 200
        scheduler.increment_realtime_tokens(
            dp_cooperation_info=None,
            prefill_compute_tokens=600 - hits,
            prefill_cache_tokens=hits,
        )
        scheduler.increment_effective_prefill_tokens(
            input_tokens=600 - hits, device_hit_tokens=hits, host_hit_tokens=0, storage_hit_tokens=0
        )
        scheduler.increment_realtime_tokens(dp_cooperation_info=None, decode_tokens=64)
    scheduler.increment_retracted_reqs(
        num_retracted_reqs=2, num_retracted_input_tokens=1200, num_retracted_output_tokens=96
    )
    stats = SchedulerStats(
        num_running_reqs=QueueCount(total=5),
        num_queue_reqs=QueueCount(total=7),
        gen_throughput=410.5,
        cache_hit_rate=200 / 600,
        token_usage=0.8125,
        full_token_usage=0.8125,
        num_used_tokens=3328,
        kv_available_tokens=512,
        kv_evictable_tokens=256,
        kv_used_tokens=3328,
        num_retracted_reqs=2,
    )
    scheduler.log_stats(stats)
    labels = dict(tokenizer.labels)
    for _ in range(4):
        tokenizer.observe_one_finished_request(
            labels=labels,
            prompt_tokens=600,
            generation_tokens=64,
            cached_tokens=200,
            e2e_latency=2.5,
            has_grammar=False,
            cached_tokens_details={"device": 200, "host": 0},
        )

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    header = (
        "# sglang 0.5.23 /metrics as its server renders it, made by SGLang's own code: the\n"
        "# wheel sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl (PyPI), file\n"
        "# sglang/srt/observability/metrics_collector.py (sgl-project/sglang:\n"
        "# python/sglang/srt/observability/metrics_collector.py at the v0.5.23 release).\n"
        "# Wheel sha256 00b3cd5b265ac76c64185fbb6b95424f324ddd9f428d0306b77bc9db9d859937.\n"
        "# Written by tests/data/capture_sglang_metrics.py; see its docstring for the calls.\n"
    )
    args.out.write_text(header + generate_latest(registry).decode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
