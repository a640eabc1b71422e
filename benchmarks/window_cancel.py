"""Cost of cancelling queued waiters in ``LocalWindow`` (docs/reliability.md).

Usage: .venv/bin/python benchmarks/window_cancel.py [--waiters 5000 --waiters 50000]

Queues N waiters behind one holder and cancels them last-first (the worst order for a queue
that removes each cancelled waiter at once), then waits for every cancellation to finish.
Prints the wall-clock seconds per N: run it on a quiet machine and report the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from concur_langgraph import LocalWindow


async def _cancel_all(waiters: int) -> float:
    window = LocalWindow(1)
    await window.acquire("holder")
    tasks = [asyncio.create_task(window.acquire(f"agent-{i}")) for i in range(waiters)]
    await asyncio.sleep(0)  # every waiter is queued
    start = time.perf_counter()
    for task in reversed(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - start
    stats = window.statistics()
    assert stats.waiting_new == 0 and stats.holders == 1, stats
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", type=int, action="append", help="default: 5000 and 50000")
    args = parser.parse_args(argv)
    for n in args.waiters or [5000, 50000]:
        if n < 1:
            parser.error(f"--waiters: must be >= 1, got {n}")
        print(f"{n:>7} waiters cancelled last-first: {asyncio.run(_cancel_all(n)):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
