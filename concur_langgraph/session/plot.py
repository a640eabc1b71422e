"""A PNG of one batch over time: the window, KV usage, prefix hit rate, and agents.

Drawn with matplotlib's object API (a ``Figure`` of its own, no ``pyplot``): nothing changes
for the rest of the process, so a notebook keeps its backend. matplotlib is the ``plot``
extra, imported here only, when a plot is asked for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from concur_langgraph.core.window import OPEN
from concur_langgraph.extras import require

__all__ = ["new_figure", "plot_timeline", "plot_timelines"]


def new_figure(rows: int, *, height: float = 2.2) -> tuple[Any, Any]:
    """A figure with ``rows`` stacked axes sharing the time axis (matplotlib's object API)."""
    require("matplotlib", what="plots")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, height * rows))
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return figure, axes


def _values(column: Sequence[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in column]


def plot_timeline(
    timeline: Mapping[str, Sequence[Any]], path: str | os.PathLike[str], *, title: str
) -> Path:
    """Write ``timeline`` (a session's, columns as :meth:`Controller.timeline`) to ``path``.

    Panels: KV usage and prefix hit rate (0..1), the window (an open window is drawn at the
    agents' count, the most it can admit) with the agents admitted and queued, and the
    server's running and waiting requests.
    """
    figure, (signals, gate, server) = new_figure(3)
    _draw(timeline, signals, gate, server)
    return _save(figure, path, title)


def _draw(timeline: Mapping[str, Sequence[Any]], signals: Any, gate: Any, server: Any) -> None:
    t = list(timeline["t"])
    admitted = _values(timeline["admitted"])
    queued = _values(timeline["queued"])
    agents = [a + q for a, q in zip(admitted, queued, strict=True) if not math.isnan(a + q)]
    ceiling = max(agents, default=0.0)
    window = [
        (ceiling if ceiling else math.nan) if w is not None and w >= OPEN else _values([w])[0]
        for w in timeline["window"]
    ]
    signals.plot(t, _values(timeline["kv_usage"]), label="KV usage", color="C0")
    signals.plot(t, _values(timeline["hit_rate"]), label="prefix hit rate", color="C1")
    signals.set_ylim(0, 1.05)
    signals.set_ylabel("fraction")
    gate.step(t, window, where="post", label="window (open: all agents)", color="C3")
    gate.plot(t, admitted, label="agents admitted", color="C2")
    gate.plot(t, queued, label="agents queued at the gate", color="C7")
    gate.set_ylabel("agents")
    server.plot(t, _values(timeline["running"]), label="requests running", color="C4")
    server.plot(t, _values(timeline["waiting"]), label="requests waiting", color="C5")
    server.set_ylabel("requests")
    server.set_xlabel("time since the batch started (s)")
    for ax in (signals, gate, server):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")


def plot_timelines(
    timelines: Sequence[tuple[str, Mapping[str, Sequence[Any]]]],
    path: str | os.PathLike[str],
    *,
    title: str,
) -> Path:
    """Several windows' timelines side by side (one column per replica, each titled with its
    name), the panels of :func:`plot_timeline` in each column, sharing the time axis."""
    require("matplotlib", what="plots")
    from matplotlib.figure import Figure

    columns = len(timelines)
    figure = Figure(figsize=(5 * columns, 6.6))
    axes = figure.subplots(3, columns, sharex=True, squeeze=False)
    for column, (name, timeline) in enumerate(timelines):
        _draw(timeline, axes[0, column], axes[1, column], axes[2, column])
        axes[0, column].set_title(name, fontsize="medium")
    return _save(figure, path, title)


def _save(figure: Any, path: str | os.PathLike[str], title: str) -> Path:
    figure.suptitle(title)
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out
