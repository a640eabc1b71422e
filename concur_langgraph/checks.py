"""Checks of option values: one rule per kind of value, every error naming its field.

Every option of the package (session options, law constants, the controller's and the gate's
arguments, the simulator's config, benchmark workloads) is checked with these functions where it
enters, so the same kind of value is held to the same rule and refused with the same words
(``interval_s: must be a number > 0, got 0``). Each returns the value it accepted, normalised
where there is a normal form (a float for a number, a tuple of base URLs for ``vllm_url``), so a
caller stores what it checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, overload
from urllib.parse import urlsplit, urlunsplit

from concur_langgraph.errors import ConfigError

__all__ = [
    "base_url",
    "base_urls",
    "check_count",
    "check_number",
    "check_port",
    "is_count",
    "is_number",
    "metrics_url",
]


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float`` (``bool`` is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: object) -> bool:
    """An ``int`` (``bool`` is not a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _bounds(
    low: float, high: float, low_open: bool, high_open: bool, low_name: str | None = None
) -> str:
    parts = []
    if not math.isinf(low):
        named = f"{low_name} ({low:g})" if low_name is not None else f"{low:g}"
        parts.append(f"{'>' if low_open else '>='} {named}")
    if not math.isinf(high):
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


@overload
def check_number(
    field: str,
    value: object,
    *,
    low: float = ...,
    high: float = ...,
    low_open: bool = ...,
    high_open: bool = ...,
    low_name: str | None = ...,
    optional: Literal[False] = False,
) -> float: ...
@overload
def check_number(
    field: str,
    value: object,
    *,
    low: float = ...,
    high: float = ...,
    low_open: bool = ...,
    high_open: bool = ...,
    low_name: str | None = ...,
    optional: bool,
) -> float | None: ...
def check_number(
    field: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    low_name: str | None = None,
    optional: bool = False,
) -> float | None:
    """``value`` as a float within the bounds (``None`` passes when ``optional``);
    ``low_name`` names where the lower bound comes from (``u_low``), for the message."""
    if value is None and optional:
        return None
    if is_number(value):
        assert isinstance(value, int | float)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if above and below:
            return float(value)
    bounds = _bounds(low, high, low_open, high_open, low_name)
    kind = f"a number {bounds}" if bounds else "a finite number"
    raise ConfigError(f"{field}: must be {'None or ' if optional else ''}{kind}, got {value!r}")


@overload
def check_count(
    field: str,
    value: object,
    *,
    minimum: int = ...,
    maximum: int | None = ...,
    optional: Literal[False] = False,
    minimum_name: str | None = ...,
) -> int: ...
@overload
def check_count(
    field: str,
    value: object,
    *,
    minimum: int = ...,
    maximum: int | None = ...,
    optional: bool,
    minimum_name: str | None = ...,
) -> int | None: ...
def check_count(
    field: str,
    value: object,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    optional: bool = False,
    minimum_name: str | None = None,
) -> int | None:
    """``value`` as an int in ``[minimum, maximum]`` (``None`` passes when ``optional``).

    ``minimum_name`` names where the minimum comes from (``min_window``), for the message.
    """
    if value is None and optional:
        return None
    if is_count(value):
        assert isinstance(value, int)
        if value >= minimum and (maximum is None or value <= maximum):
            return value
    low = f"{minimum_name} ({minimum})" if minimum_name is not None else str(minimum)
    bounds = f">= {low}" + ("" if maximum is None else f" and <= {maximum}")
    raise ConfigError(
        f"{field}: must be {'None or ' if optional else ''}an integer {bounds}, got {value!r}"
    )


def check_port(field: str, port: object) -> int:
    """A TCP port to listen on: 1-65535, or 0 for any free port."""
    if not (is_count(port) and 0 <= port <= 65535):  # type: ignore[operator]
        raise ConfigError(
            f"{field}: must be None, 0 (a free port) or a port number up to 65535, got {port!r}"
        )
    assert isinstance(port, int)
    return port


def base_url(field: str, url: object) -> str:
    """An http(s) server URL in its base form: ``http://host:port`` (and any path prefix a
    proxy puts before vLLM's routes), without a trailing ``/``, ``/v1`` or ``/metrics``.

    Accepts ``http://h:p``, ``http://h:p/``, ``http://h:p/v1`` and ``.../metrics``; refuses a
    missing host, another scheme and a port that is not a number in 1-65535.
    """
    if not isinstance(url, str):
        raise ConfigError(f"{field}: expected a URL string, got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{field}: {url!r} is not an http(s) URL with a host, such as http://localhost:8000"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"{field}: {url!r} has no valid port (a number in 1-65535)")
    path = parts.path.rstrip("/")
    for suffix in ("/metrics", "/v1"):
        if path.endswith(suffix):
            path = path.removesuffix(suffix)
            break
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def base_urls(field: str, value: object) -> tuple[str, ...]:
    """One URL or a sequence of them, as a tuple of distinct :func:`base_url` s."""
    urls = [value] if isinstance(value, str) else value
    if isinstance(urls, bytes) or not isinstance(urls, Sequence) or not urls:
        raise ConfigError(f"{field}: expected a URL or a list of URLs, got {value!r}")
    out = tuple(base_url(field, one) for one in urls)
    if len(set(out)) != len(out):
        raise ConfigError(f"{field}: the same server is listed twice in {list(urls)!r}")
    return out


def metrics_url(base: str) -> str:
    """The Prometheus endpoint of a server given by its :func:`base_url`."""
    return base + "/metrics"
