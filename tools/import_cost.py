"""What importing the package costs: total time and which heavy optional modules it loads.

    python tools/import_cost.py                 # import concur_langgraph
    python tools/import_cost.py --cli           # what `concur --help` imports

Runs ``python -X importtime`` in a fresh interpreter (so nothing is cached in this process),
sums the cumulative time of the top-level imports, and says whether each of rich, starlette,
uvicorn, redis, matplotlib, langchain.agents and aiosqlite was loaded, and whether LangGraph
alone (``import langgraph.graph``) loads it too: a module a dependency loads is not ours to
defer. Import time varies with the machine's load: compare numbers taken back to back.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

HEAVY = (
    "rich",
    "starlette",
    "uvicorn",
    "redis",
    "matplotlib",
    "langchain.agents",
    "aiosqlite",
)
"""Modules a gate does not need (``fcntl`` is not checked: the standard library imports it on
POSIX; tests/test_layers.py checks that the package itself imports it only when locking)."""

_PROBE = """
import sys, io, contextlib
{body}
mods = set(sys.modules)
redis_window = any(m.endswith("redis_window") for m in mods)
print("LOADED " + " ".join([m for m in {heavy!r} if m in mods] + ["redis-window"] * redis_window))
"""


def measure(cli: bool | None) -> tuple[float, list[str]]:
    """(seconds, heavy modules loaded); ``cli=None`` measures ``import langgraph.graph``."""
    body = (
        "import langgraph.graph"
        if cli is None
        else (
            "from concur_langgraph import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        cli.main(['--help'])\n    except SystemExit:\n        pass"
            if cli
            else "import concur_langgraph"
        )
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _PROBE.format(body=body, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    )
    total_us = 0
    for line in done.stderr.splitlines():
        # "import time: self [us] | cumulative | imported package"; nested imports are
        # indented under the name, so a top-level import has exactly one space before it.
        fields = line.split("|")
        if line.startswith("import time:") and len(fields) == 3:
            cumulative, name = fields[1].strip(), fields[2]
            if cumulative.isdigit() and name.startswith(" ") and not name.startswith("  "):
                total_us += int(cumulative)
    loaded = next(x for x in done.stdout.splitlines() if x.startswith("LOADED")).split()[1:]
    return total_us / 1e6, loaded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli", action="store_true", help="measure `concur --help`")
    parser.add_argument("--runs", type=int, default=3, help="fresh interpreters (default 3)")
    args = parser.parse_args()
    times, loaded = [], []
    for _ in range(args.runs):
        seconds, loaded = measure(args.cli)
        times.append(seconds)
    what = "concur --help" if args.cli else "import concur_langgraph"
    times.sort()
    print(f"{what}: {times[len(times) // 2]:.2f} s median of {args.runs} (min {times[0]:.2f})")
    _, by_langgraph = measure(None)
    for name in (*HEAVY, "redis-window"):
        state = "loaded" if name in loaded else "-"
        if name in loaded and name in by_langgraph:
            state += " (by langgraph itself)"
        print(f"  {name:17} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
