"""One simulator server (the real-time sim) for every end-to-end test of ``concur run``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from concur_langgraph.testing.sim_process import served_simulator


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    with served_simulator("--preset", "test-tiny") as sim:
        yield sim.url
