"""What the simulator engine's unit tests share: a cost model, a small config, a virtual-time
runner and token ids (tests/sim/test_engine.py, tests/sim/test_priority_scheduling.py)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from concur_langgraph import vtime
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._cost import CostModel

T = TypeVar("T")

COST = CostModel(
    step_overhead_s=1e-3,
    prefill_token_s=10e-6,
    decode_seq_s=100e-6,
    attention_pair_s=1e-8,
    kv_bytes_per_token=4096,
    kv_read_bytes_per_s=4.096e11,
)


def config(**kw: Any) -> SimConfig:
    base: dict[str, Any] = {
        "model_name": "m",
        "num_blocks": 64,
        "block_size": 16,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 256,
        "max_model_len": 512,
        "cost": COST,
    }
    base.update(kw)
    return SimConfig(**base)


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()

    return vtime.run(main())


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(16, 30000) for _ in range(n)]
