"""The warm start on the real CPU vLLM: does a profile measured there keep the batch open?

Usage: .venv/bin/python benchmarks/warm_start_real.py [--rounds 2] [--url URL]

Starts the CPU vLLM of ``concur_langgraph.testing.vllm_cpu`` (or uses ``--url``). Then, per
round, it runs the ``real-24`` workload three times through the benchmark harness:
* ``AdmitLaw()``, whose :meth:`AdmitLaw.profile` is the profile;
* ``AdmitLaw(warm=profile)``;
* no control.

It prints one JSON line per round: the profile, the warm law's start window (``null`` = open)
and the three makespans. Real time: run it on a quiet machine and report the machine.
"""

from __future__ import annotations

import argparse
import json
from types import MappingProxyType

from concur_langgraph import AdmitLaw
from concur_langgraph.bench import _policies
from concur_langgraph.bench._runner import UrlBackend, run_one
from concur_langgraph.bench._workload import load_workload


def _run_law(law: AdmitLaw, name: str, backend: UrlBackend) -> dict[str, object]:
    saved = _policies.LAWS
    _policies.LAWS = MappingProxyType({**saved, name: lambda: law})  # type: ignore[misc]
    try:
        return run_one(load_workload("real-24"), name, backend)
    finally:
        _policies.LAWS = saved  # type: ignore[misc]


def _rounds(url: str, rounds: int) -> None:
    backend = UrlBackend(url=url)
    for index in range(rounds):
        cold = AdmitLaw()
        cold_record = _run_law(cold, "admit-cold", backend)
        profile = cold.profile()
        warm = AdmitLaw(warm=profile)
        warm_record = _run_law(warm, "admit-warm", backend)
        none_record = run_one(load_workload("real-24"), "none", backend)
        row = {
            "round": index,
            "profile": None if profile is None else profile.to_dict(),
            "start_window": warm.start_window,
            "makespan_s": {
                "admit": round(float(cold_record["makespan_s"]), 1),  # type: ignore[arg-type]
                "admit-warm": round(float(warm_record["makespan_s"]), 1),  # type: ignore[arg-type]
                "none": round(float(none_record["makespan_s"]), 1),  # type: ignore[arg-type]
            },
            "warm_window_peak": warm_record["window_peak"],
            "agents_ok": [r["agents_ok"] for r in (cold_record, warm_record, none_record)],
        }
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--url", help="a running vLLM server; default: start the CPU one")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: must be >= 1, got {args.rounds}")
    if args.url is not None:
        _rounds(args.url, args.rounds)
        return 0
    from concur_langgraph.testing.vllm_cpu import VLLMServer

    with VLLMServer() as server:
        _rounds(server.base_url, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
