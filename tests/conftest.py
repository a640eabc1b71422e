"""Project-wide test setup.

`@virtual_time` (from concur_langgraph.testing.vtime_fixtures) runs an async test and its async
fixtures on the virtual-time loop; tiers that need real servers (tests/real_vllm, tests/redis)
start them in their own conftest.
"""

pytest_plugins = ["concur_langgraph.testing.vtime_fixtures"]
