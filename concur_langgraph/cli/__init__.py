"""The ``concur`` command line.

Each command group lives next to its concept and registers itself: a module exposing
``register(subparsers)``, imported only when the program starts so that ``concur --help`` stays
fast and optional extras are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

_GROUPS: tuple[str, ...] = (
    "concur_langgraph.sim._cli",
    "concur_langgraph.cli.demo",
    "concur_langgraph.bench._cli",
    "concur_langgraph.cli.watch",
    "concur_langgraph.cli.run",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concur",
        description="Admission control for LangGraph agent batches on vLLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int | None = args.func(args)
    except ImportError as exc:
        # An optional part that is not installed: its message says what to pip install.
        if "pip install 'concur-langgraph[" not in str(exc):
            raise
        print(f"concur {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0 if result is None else int(result)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
