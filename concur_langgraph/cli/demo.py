"""``concur demo``: one agent batch on the simulator, without the gate and with it.

It runs the ``demo`` workload (96 LangGraph ReAct agents: ChatOpenAI plus a tool with
latencies, contexts growing to 10-20 thousand tokens) on the simulated
``h100-qwen3-32b-tp2`` engine in virtual time - the whole real client stack, with the clock
jumping over waits, so the batch's minutes of simulated time take seconds - first as a plain
``graph.abatch``, then through ``ConcurGate`` with our default law. It prints a comparison
table (makespan, tokens/s, preemptions, prefix hit rate, prompt tokens computed) and writes a
PNG of KV usage, hit rate, window and active agents over time (default ``out/demo.png``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from concur_langgraph.errors import ConfigError
from concur_langgraph.extras import require

__all__ = ["register", "run_demo"]

DEFAULT_WORKLOAD = "demo"
DEFAULT_PRESET = "h100-qwen3-32b-tp2"
DEFAULT_POLICY = "auto"


def register(subparsers: Any) -> None:
    """Add ``concur demo`` to the ``concur`` command."""
    parser = subparsers.add_parser(
        "demo",
        help="an agent batch on the simulator, without and with the gate",
        description=(
            "Run a LangGraph ReAct agent batch on the simulated vLLM in virtual time, without "
            "admission control and with ConcurGate; print the comparison and plot it."
        ),
    )
    parser.add_argument("--out", default="out", help="folder for demo.png (default: out)")
    parser.add_argument("--workload", default=DEFAULT_WORKLOAD, help="workload preset or JSON file")
    parser.add_argument("--sim-preset", default=DEFAULT_PRESET, help="simulator preset")
    parser.add_argument(
        "--policy", default=DEFAULT_POLICY, help="the gate's policy (auto, concur, static:K)"
    )
    parser.set_defaults(func=_main)


def run_demo(
    *, workload: str, sim_preset: str, policy: str, out: str | Path, console: Any = None
) -> tuple[list[dict[str, Any]], Path]:
    """Run the two batches, print the table, write the plot; the records and the plot path."""
    for module in ("rich", "starlette", "langchain_openai", "matplotlib"):
        require(module, what="concur demo")
    from rich.console import Console

    from concur_langgraph.bench._report import plot_figure
    from concur_langgraph.bench._runner import SimBackend
    from concur_langgraph.bench._workload import load_workload

    con: Console = console if console is not None else Console()
    work = load_workload(workload)
    backend = SimBackend.preset(sim_preset)
    con.print(
        f"[bold]{work.agents} LangGraph ReAct agents[/] on the simulated [bold]{sim_preset}[/] "
        "engine, in virtual time"
    )
    labels = ["no admission control", f"ConcurGate ({policy})"]
    records = [
        _run(con, work, "none", backend, "plain graph.abatch"),
        _run(con, work, policy, backend, labels[1]),
    ]
    _table(con, records, labels[1:])
    path = Path(out) / "demo.png"
    plot_figure(
        records,
        path,
        title=f"{work.name}: {work.agents} agents on sim:{sim_preset}",
        labels=tuple(labels),
    )
    con.print(f"plot: [bold]{path}[/]")
    return records, path


def _run(con: Any, work: Any, policy: Any, backend: Any, label: str) -> dict[str, Any]:
    from concur_langgraph.bench._runner import run_one

    with con.status(f"running {label} ..."):
        record = run_one(work, policy, backend)
    con.print(f"  {label}: {record['makespan_s']:.1f} s simulated, {record['wall_s']:.1f} s wall")
    return record


def _table(con: Any, records: list[dict[str, Any]], gated_labels: list[str]) -> None:
    """Plain abatch, then each gated run with its ratio to plain."""
    from rich.table import Table

    base, gated = records[0], records[1:]
    table = Table(title="without vs with the gate")
    table.add_column("")
    table.add_column("plain abatch", justify="right")
    for label in gated_labels:
        table.add_column(label, justify="right")
        table.add_column("ratio", justify="right")

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    def row(label: str, key: str, fmt: str, higher_is_better: bool) -> None:
        a = base.get(key)
        cells = [label, cell(a, fmt)]
        for record in gated:
            b = record.get(key)
            ratio = f"{(b / a if higher_is_better else a / b):.2f}x" if a and b else ""
            cells += [cell(b, fmt), ratio]
        table.add_row(*cells)

    row("makespan (s)", "makespan_s", "{:,.1f}", False)
    row("tokens/s", "tokens_per_s", "{:,.1f}", True)
    row("prompt tokens computed", "prompt_tokens_computed", "{:,}", False)
    row("prefix hit rate", "prefix_hit_rate", "{:.3f}", True)
    row("preemptions", "preemptions", "{:,}", False)
    outcomes = ["agents ok / failed", f"{base['agents_ok']} / {base['agents_failed']}"]
    for record in gated:
        outcomes += [f"{record['agents_ok']} / {record['agents_failed']}", ""]
    table.add_row(*outcomes)
    con.print(table)
    con.print(
        "ratio: how many times better the gate is (makespan and recompute: plain / gated; "
        "throughput and hit rate: gated / plain)"
    )


def _main(args: argparse.Namespace) -> int:
    try:
        run_demo(
            workload=args.workload, sim_preset=args.sim_preset, policy=args.policy, out=args.out
        )
    except ConfigError as exc:
        print(f"concur demo: error: {exc}", file=sys.stderr)
        return 2
    return 0
