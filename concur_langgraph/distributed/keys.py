"""What every Redis part of a shared window agrees on: key names, batch ids, the client import,
and the Lua scripts in ``lua/``. No redis import here: it is imported lazily, by
:func:`import_redis`, so an install without the ``redis`` extra can still check options.
"""

from __future__ import annotations

import sys
from importlib import resources
from typing import Any

from concur_langgraph.errors import ConfigError
from concur_langgraph.extras import require

__all__ = [
    "batch_key",
    "check_batch_id",
    "import_redis",
    "is_redis_window",
    "lua_script",
    "replica_batch_id",
]


def import_redis() -> Any:
    """``redis.asyncio``, or an ImportError saying how to install it."""
    return require(
        "redis.asyncio", what="a window shared across processes (redis_url, RedisWindow)"
    )


def batch_key(batch_id: str, name: str) -> str:
    """The Redis key ``name`` of batch ``batch_id`` (hash-tagged: one cluster slot per batch)."""
    return f"concur:{{{batch_id}}}:{name}"


def replica_batch_id(batch_id: str, replica: int) -> str:
    """The batch id of replica ``replica``'s window in batch ``batch_id`` (several replicas:
    one window, one leader and one set of accounts per replica, each under its own id)."""
    return f"{batch_id}/replica-{replica}"


def check_batch_id(batch_id: object) -> str:
    """``batch_id`` if it can name a batch's keys; else a :class:`ConfigError` naming it."""
    if not isinstance(batch_id, str) or not batch_id:
        raise ConfigError(f"batch_id must be a non-empty string, got {batch_id!r}")
    if "{" in batch_id or "}" in batch_id:
        raise ConfigError(f"batch_id must not contain '{{' or '}}', got {batch_id!r}")
    return batch_id


def lua_script(name: str) -> str:
    """The text of ``lua/NAME.lua``."""
    return (resources.files("concur_langgraph.distributed") / "lua" / f"{name}.lua").read_text()


def is_redis_window(window: object) -> bool:
    """Whether ``window`` is a :class:`RedisWindow`, without importing its module: a window
    of that class exists only once the module was imported."""
    module = sys.modules.get("concur_langgraph.distributed.redis_window")
    return module is not None and isinstance(window, module.RedisWindow)
