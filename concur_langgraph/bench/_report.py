"""Benchmark records -> a markdown table and one PNG figure per workload and backend.

The table shows, per run: makespan, its ratio to the simulator's lower bound (``x LB``), the
speed-up over ``none`` on the same workload and backend (``none`` makespan / this makespan),
throughput, prompt tokens computed (recompute included on the simulator), prefix hit rate,
preemptions, the window (peak / mean) and agents ok / failed.

A failed run (``status`` ``"failed"``: an agent failed) is never compared: its makespan cell
reads ``FAILED 8/8 agents``, its ``x LB``, speed-up and tokens/s are ``-``, no run gets a
speed-up over a failed ``none``, and a note under the table gives each failed run's first
error. In the figures its lines are dashed and its legend says ``FAILED``.

The figures follow the paper's: KV usage, prefix hit rate (per interval), window and active
agents over time, one line per policy. matplotlib is imported only here (the ``plot`` extra),
with the Agg backend: no display needed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from concur_langgraph.errors import ConfigError
from concur_langgraph.session.plot import new_figure

__all__ = [
    "FAILED",
    "OK",
    "failure_text",
    "load_records",
    "markdown_table",
    "plot_figure",
    "plot_records",
    "run_failed",
    "write_report",
]

OK: Final = "ok"
"""A record's ``status`` when every agent finished."""
FAILED: Final = "failed"
"""A record's ``status`` when an agent failed (for a ``static-sweep`` summary: when every
window had failed agents). Its numbers compare to nothing: no ratio, speed-up or best is
computed from it."""

_PANELS = (
    ("kv_usage", "KV usage"),
    ("hit_rate", "prefix hit rate"),
    ("window", "window (agents)"),
    ("active", "active agents"),
)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a JSON-lines file (one record per line), or a JSON list."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"records: file {str(file)!r} does not exist") from None
    stripped = text.strip()
    if not stripped:
        return []
    try:
        if stripped.startswith("["):
            data = json.loads(stripped)
            records = list(data)
        else:
            records = [json.loads(line) for line in stripped.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not JSON lines: {exc}") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not {"workload", "policy", "makespan_s"} <= set(record):
            raise ConfigError(f"{file}: record {index} is not a benchmark record")
    return records


def run_failed(record: dict[str, Any]) -> bool:
    """Whether ``record`` is a failed run (a record without ``status``, written before it
    existed: whether any agent failed)."""
    if "status" in record:
        return bool(record["status"] == FAILED)
    return bool(record.get("agents_failed"))


def failure_text(record: dict[str, Any]) -> str:
    """What a failed run shows instead of its numbers: ``FAILED 8/8 agents`` (a sweep whose
    every window failed: ``FAILED 3/3 windows``)."""
    if record.get("policy") == "static-sweep" and record.get("best_k") is None:
        windows = len(record.get("sweep") or {})
        return f"FAILED {windows}/{windows} windows"
    failed, agents = record.get("agents_failed"), record.get("agents")
    return f"FAILED {_fmt(failed)}/{_fmt(agents)} agents"


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _policy_label(record: dict[str, Any]) -> str:
    if record["policy"] == "static-sweep" and record.get("best_k") is not None:
        return f"static-sweep (best K={record['best_k']})"
    return str(record["policy"])


def _groups(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        key = (str(record["workload"]), str(record.get("backend", "?")))
        groups.setdefault(key, []).append(record)
    return groups


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One markdown table of every record, grouped by workload and backend.

    Failed runs show :func:`failure_text` and no ratio; a note under the table lists them
    with their first error.
    """
    header = (
        "| workload | backend | policy | makespan (s) | x LB | speed-up vs none | tokens/s "
        "| prompt tokens computed | hit rate | preemptions | window peak / mean | ok / failed |"
    )
    lines = [header, "|" + "---|" * 12]
    failed: list[str] = []
    for (workload, backend), group in _groups(records).items():
        none = next((r for r in group if r["policy"] == "none"), None)
        if none is not None and run_failed(none):
            none = None  # a failed baseline gives no speed-up to anyone
        for r in group:
            makespan = r["makespan_s"]
            bound = r.get("lower_bound_s")
            hit = r.get("prefix_hit_rate")
            peak, mean = r.get("window_peak"), r.get("window_mean")
            window = "-" if peak is None else f"{peak} / {_fmt(mean)}"
            if run_failed(r):
                outcome, x_lb, speedup, rate = failure_text(r), "-", "-", "-"
                errors = r.get("errors") or ["(no error recorded)"]
                failed.append(f"- {workload} on {backend}, {_policy_label(r)}: {errors[0]}")
            else:
                outcome = _fmt(makespan)
                x_lb = _fmt(makespan / bound if bound and makespan else None, 2)
                speedup = _fmt(
                    none["makespan_s"] / makespan if none is not None and makespan else None, 2
                )
                rate = _fmt(r.get("tokens_per_s"))
            lines.append(
                f"| {workload} | {backend} | {_policy_label(r)} | {outcome} "
                f"| {x_lb} | {speedup} | {rate} "
                f"| {_fmt(r.get('prompt_tokens_computed'))} "
                f"| {'-' if hit is None else f'{hit:.3f}'} | {_fmt(r.get('preemptions'))} "
                f"| {window} | {_fmt(r.get('agents_ok'))} / {_fmt(r.get('agents_failed'))} |"
            )
    if failed:
        lines += [
            "",
            "FAILED: runs with failed agents. Their makespans are not compared (no x LB, no "
            "speed-up, never the best window), nor is any run compared with a failed `none`. "
            "First error of each:",
            "",
            *failed,
        ]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def plot_figure(
    records: Sequence[dict[str, Any]], path: str | Path, *, title: str, labels: Sequence[str] = ()
) -> Path:
    """One PNG at ``path``: KV usage, hit rate, window and active agents of each record.

    ``labels`` (optional) names each record's lines; by default its policy.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # matplotlib's object API: no pyplot, no global backend switch in the caller's process.
    fig, axes = new_figure(len(_PANELS), height=9 / len(_PANELS))
    for index, record in enumerate(records):
        series = record["series"]
        t = series["t"]
        label = labels[index] if index < len(labels) else _policy_label(record)
        style = "-"
        if run_failed(record):
            label, style = f"{label} ({failure_text(record)})", "--"
        for ax, (key, _name) in zip(axes, _PANELS, strict=True):
            values = [math.nan if v is None else float(v) for v in series.get(key, [])]
            if values and not all(math.isnan(v) for v in values):
                # One colour per record on every panel, even where a record has no line
                # (no window without a gate), so the legend holds for all panels.
                ax.plot(
                    t,
                    values,
                    label=label,
                    linewidth=1.2,
                    linestyle=style,
                    color=f"C{index % 10}",
                )
    for ax, (_key, name) in zip(axes, _PANELS, strict=True):
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylim(0, 1.05)
    axes[-1].set_xlabel("time (s)")
    axes[0].legend(loc="upper right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_records(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per (workload, backend) with the time series of each policy; their paths."""
    out = Path(out_dir)
    paths: list[Path] = []
    for (workload, backend), group in _groups(records).items():
        # With a sweep, its best run stands for the static windows (the others would clutter);
        # a sweep whose every window failed has no best, and its failed windows are shown.
        swept = any(r["policy"] == "static-sweep" and r.get("series") for r in group)
        shown = [
            r
            for r in group
            if r.get("series") and not (swept and str(r["policy"]).startswith("static:"))
        ]
        if shown:
            path = out / f"{_slug(workload)}__{_slug(backend)}.png"
            paths.append(plot_figure(shown, path, title=f"{workload} on {backend}"))
    return paths


def write_report(records: Sequence[dict[str, Any]], out_dir: str | Path) -> tuple[Path, list[Path]]:
    """``report.md`` (the table, with links to the figures) and the figures in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_records(records, out)
    text = "# Benchmark report\n\n" + markdown_table(records)
    if figures:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    report = out / "report.md"
    report.write_text(text, encoding="utf-8")
    return report, figures
