"""The Redis tier: every test here is marked ``redis`` and runs against a real ``redis-server``.

One server is started per session (``concur_langgraph.testing.redis_server``); tests that
restart Redis start their own. If the server cannot be started the tests fail with the reason
(``apt-get install redis-server``): they never skip, so CI cannot go green without them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from concur_langgraph.testing.redis_server import RedisServer, RedisServerError

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
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
