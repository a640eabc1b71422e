"""``concur bench ...``: run benchmark workloads, and turn their records into a report.

* ``concur bench --workload FILE|PRESET --policy P [--policy P2 ...]
  [--sim-preset S | --sim-config F | --url U] --json OUT|-`` runs each policy on the workload
  and writes one JSON record per run, one per line (``-``: stdout). Policies: ``none``,
  ``static:K``, ``static-sweep``, and every adaptive law by name (``concur``, ``auto``, ...).
  Without a backend flag the simulator preset ``h100-qwen3-32b-tp2`` is used.
  ``--fault FIELD=VALUE`` (repeatable, simulator only) makes the simulated server misbehave
  as ``concur sim serve --fault`` does (``--fault chat=error --fault chat_status=500``): the
  backend is labelled ``sim:<preset>+faults``.
* ``concur bench report RECORDS.jsonl --out DIR`` writes ``DIR/report.md`` (a markdown table)
  and one PNG per workload and backend.

Exit status of ``concur bench``: 0 when every run completed; 1 when any run had failed agents
(after every record is written and the table printed, so nothing is lost; the failed runs are
marked ``FAILED`` and named on stderr, even with ``--quiet``); 2 for bad settings, including a
workload an agent of which may outgrow the server's ``max_model_len`` (refused before anything
runs), with the message of the :class:`ConfigError`, which names the field. ``concur bench
report`` exits 0 whatever the records hold (they are marked ``FAILED`` in the report). Long
runs show a progress bar on stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from concur_langgraph.errors import ConcurError, ConfigError
from concur_langgraph.extras import require

__all__ = ["register"]

DEFAULT_SIM_PRESET = "h100-qwen3-32b-tp2"


def register(subparsers: Any) -> None:
    """Add ``concur bench`` (and ``concur bench report``) to the ``concur`` command."""
    parser = subparsers.add_parser(
        "bench",
        help="run benchmark workloads (policies x backends) and report them",
        description="Run a benchmark workload under admission policies; write JSON records.",
    )
    parser.add_argument(
        "--workload", help="workload JSON file or preset name (paper-256, light-8, ...)"
    )
    parser.add_argument(
        "--policy",
        action="append",
        default=None,
        help="none | static:K | static-sweep | concur | auto (repeatable)",
    )
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--sim-preset", help=f"simulator preset (default {DEFAULT_SIM_PRESET})")
    backend.add_argument("--sim-config", help="simulator config JSON (see `concur sim serve`)")
    backend.add_argument("--url", help="a real vLLM server's base URL (runs in real time)")
    parser.add_argument("--model", help="served model name for --url (default: the first listed)")
    parser.add_argument(
        "--fault",
        action="append",
        default=None,
        metavar="FIELD=VALUE",
        help="simulator only: a fault of the simulated server, as `concur sim serve --fault` "
        "(repeatable)",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="controller tick and sampling period, s"
    )
    parser.add_argument(
        "--sweep",
        help="windows of static-sweep, comma-separated (default: 2,4,...,128 below the agents)",
    )
    parser.add_argument("--json", dest="json_out", help="where to write the records (- = stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress and no summary table")
    parser.set_defaults(func=_run)

    sub = parser.add_subparsers(dest="bench_command", metavar="report")
    report = sub.add_parser(
        "report",
        help="markdown table and PNG plots from records",
        description="Turn benchmark records (JSON lines) into report.md and PNG plots.",
    )
    report.add_argument("records", help="JSON-lines file written by `concur bench --json`")
    report.add_argument("--out", required=True, help="output folder")
    report.set_defaults(func=_report)


def _fail(message: str) -> int:
    print(f"concur bench: error: {message}", file=sys.stderr)
    return 2


def _backend(args: argparse.Namespace) -> Any:
    from concur_langgraph.bench._runner import SimBackend, UrlBackend

    if args.url is not None:
        if args.fault:
            raise ConfigError("--fault: only used with the simulator (not with --url)")
        return UrlBackend(url=args.url, model=args.model)
    if args.model is not None:
        raise ConfigError("--model: only used with --url")
    from concur_langgraph.sim._cli import faults_from_settings, load_config

    faults = faults_from_settings(args.fault) if args.fault else None
    if args.sim_config is not None:
        config = load_config(None, args.sim_config)
        return SimBackend(config=config, name=args.sim_config, faults=faults)
    preset = SimBackend.preset(args.sim_preset or DEFAULT_SIM_PRESET)
    return SimBackend(config=preset.config, name=preset.name, faults=faults)


def _sweep(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--sweep: expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--sweep: windows must be integers >= 1, got {text!r}")
    return values


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[tuple[Any, Any]]:
    """(on_start, on_row) callbacks drawing a rich progress bar on stderr, or no-ops."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    except ImportError:  # no cli extra: no bar (the table at the end is plain text)
        yield None, None
        return

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield None, None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        auto_refresh=False,
        transient=False,
    )
    current: list[Any] = []

    def on_start(policy: str) -> None:
        current.append(progress.add_task(policy, total=total, info=""))
        progress.refresh()

    def on_row(row: dict[str, Any]) -> None:
        if not current:
            return
        kv = row.get("kv_usage")
        info = f"t={row['t']:.0f}s" + (f" kv={kv:.2f}" if kv is not None else "")
        if row.get("window") is not None:
            info += f" window={row['window']}"
        progress.update(current[-1], completed=row["finished"], info=info)
        progress.refresh()

    with progress:
        yield on_start, on_row


def _run(args: argparse.Namespace) -> int:
    # The agents are ChatOpenAI graphs; the simulator is an ASGI app.
    require("langchain_openai", what="concur bench")
    if args.url is None:
        require("starlette", what="concur bench on the simulator")
    from concur_langgraph.bench._report import failure_text, markdown_table, run_failed
    from concur_langgraph.bench._runner import run_benchmark
    from concur_langgraph.bench._workload import load_workload

    if args.workload is None or not args.policy or args.json_out is None:
        return _fail("give --workload, at least one --policy, and --json OUT (or -)")
    try:
        workload = load_workload(args.workload)
        backend = _backend(args)
        sweep = _sweep(args.sweep)
        with _progress(not args.quiet, workload.agents) as (on_start, on_row):
            records = run_benchmark(
                workload,
                args.policy,
                backend,
                interval_s=args.interval,
                sweep=sweep,
                on_start=on_start,
                on_row=on_row,
            )
    except ConcurError as exc:
        # Bad options (ConfigError) and a URL that is not a usable vLLM (MetricsError).
        return _fail(str(exc))
    if args.json_out == "-":
        _write(records, sys.stdout)
    else:
        with open(args.json_out, "w", encoding="utf-8") as out:
            _write(records, out)
    if not args.quiet:
        print(markdown_table(records), file=sys.stderr, end="")
    failed = [r for r in records if run_failed(r)]
    if failed:
        runs = ", ".join(f"{r['policy']} ({failure_text(r)})" for r in failed)
        first = next((r["errors"][0] for r in failed if r.get("errors")), "(none recorded)")
        print(
            f"concur bench: error: runs with failed agents, not comparable: {runs}. First "
            f'error: {first}. Every record is written (status "failed"); exit status 1.',
            file=sys.stderr,
        )
        return 1
    return 0


def _write(records: list[dict[str, Any]], out: TextIO) -> None:
    for record in records:
        out.write(json.dumps(record, sort_keys=True) + "\n")
    out.flush()


def _report(args: argparse.Namespace) -> int:
    from concur_langgraph.bench._report import load_records, write_report

    try:
        records = load_records(args.records)
        report, figures = write_report(records, args.out)
    except ConfigError as exc:
        return _fail(str(exc))
    print(f"wrote {report}")
    for figure in figures:
        print(f"wrote {figure}")
    return 0
