"""Every session option has its row in docs/usage.md's options table (what it does, why its
default), so a new option cannot land undocumented."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from concur_langgraph import SessionOptions

USAGE = Path(__file__).resolve().parents[2] / "docs" / "usage.md"


def test_every_option_has_a_row_in_the_usage_table() -> None:
    rows = {
        line.split("|")[1].strip().strip("`")
        for line in USAGE.read_text().splitlines()
        if line.startswith("| `")
    }
    missing = [f.name for f in fields(SessionOptions) if f.name not in rows]
    assert not missing, f"docs/usage.md has no options-table row for {missing}"
