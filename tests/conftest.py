"""Project-wide test setup.

`@virtual_time` (from concur_langgraph.testing.vtime_fixtures) runs an async test and its async
fixtures on the virtual-time loop. The real Redis of the ``redis`` tier is started here, once
per session and only when a test asks for it (tests/distributed, and the Redis half of the
window conformance suite in tests/core); the real vLLM tier starts its server in
tests/real_vllm.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from concur_langgraph.testing.redis_server import RedisServer, RedisServerError

pytest_plugins = ["concur_langgraph.testing.vtime_fixtures"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server. If it cannot be started the test fails with the reason (``apt-get
    install redis-server``): the tier never skips, so CI cannot go green without it."""
    try:
        server = RedisServer()
        server.start()
    except RedisServerError as exc:
        pytest.fail(f"the redis tier needs a real redis-server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def batch_id() -> str:
    """A fresh namespace per test, so tests sharing the server never see each other."""
    return f"test-{uuid.uuid4().hex[:12]}"
