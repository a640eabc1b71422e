"""pytest plugin: run marked pytest-asyncio tests on a virtual-time event loop.

Load it once, in the root ``tests/conftest.py``::

    pytest_plugins = ["concur_langgraph.testing.vtime_fixtures"]

then mark a test, a class or a module (``pytestmark = virtual_time``)::

    from concur_langgraph.testing.vtime_fixtures import virtual_time

    @virtual_time
    async def test_sleep_is_free() -> None:
        await asyncio.sleep(3600)
        assert asyncio.get_running_loop().time() == 3600.0

``virtual_time`` is ``pytest.mark.asyncio(loop_factories=["virtual"])``: pytest-asyncio (>= 1.5)
asks this plugin's ``pytest_asyncio_loop_factories`` hook for the loops a test may run on, and
the marker picks the ``"virtual"`` one, a strict :class:`~concur_langgraph.vtime.VirtualEventLoop`
starting at 0. Async fixtures the test uses run on the same loop when they share its loop scope
(the default, function scope). Unmarked tests get pytest-asyncio's usual loop, unchanged.

Tests in a directory whose conftest does not load the plugin can always use the plain form:
a sync test that calls :func:`concur_langgraph.vtime.run`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

from concur_langgraph.vtime import new_virtual_loop

__all__ = ["VIRTUAL", "pytest_asyncio_loop_factories", "virtual_time"]

VIRTUAL = "virtual"
"""The loop-factory name that selects a virtual-time loop in ``loop_factories=[...]``."""

_DEFAULT = "asyncio"

virtual_time = pytest.mark.asyncio(loop_factories=[VIRTUAL])
"""Marker: run this async test (class, module) on a fresh virtual-time event loop."""


def _default_loop() -> asyncio.AbstractEventLoop:
    return asyncio.new_event_loop()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Offer the virtual loop only to tests that ask for it, so others are not run twice.

    pytest-asyncio parametrises a test over every factory this returns unless its marker
    names a subset, hence one factory per test: the virtual loop when the closest
    ``asyncio`` marker lists :data:`VIRTUAL`, the policy's ordinary loop otherwise.
    """
    marker = item.get_closest_marker("asyncio")
    wanted = marker.kwargs.get("loop_factories") if marker is not None else None
    if wanted is not None and VIRTUAL in wanted:
        factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {VIRTUAL: new_virtual_loop}
        if _DEFAULT in wanted:
            factories[_DEFAULT] = _default_loop
        return factories
    return {_DEFAULT: _default_loop}
