"""The Redis tier: every test here is marked ``redis`` and runs against a real ``redis-server``.

The server and its fixtures are in tests/conftest.py (the window conformance suite in
tests/core uses them too).
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.redis)
