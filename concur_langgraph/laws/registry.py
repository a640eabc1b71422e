"""Laws by name: the one registry ``concur run --law`` and ``concur bench --policy`` read.

* ``fit``: :class:`FitLaw`, the default (:data:`DEFAULT`): what ``law=None`` means;
* ``admit``: :class:`AdmitLaw`, the previous default (a warm start from a previous batch's
  profile is its own);
* ``concur``: :class:`ConcurLaw`, the paper's Eq. 1 with its constants;
* ``static:K``: :class:`FixedLaw` ``(K)``, a fixed window of K agents.

A name maps to a factory: laws keep history, so every batch gets a fresh object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from concur_langgraph.core.law import ControlLaw
from concur_langgraph.errors import ConfigError
from concur_langgraph.laws.admit import AdmitLaw
from concur_langgraph.laws.fit import FitLaw
from concur_langgraph.laws.fixed import FixedLaw
from concur_langgraph.laws.paper import ConcurLaw

__all__ = ["DEFAULT", "DEFAULT_LAW", "LAWS", "law_names", "parse_law"]

LAWS: Final[Mapping[str, Callable[[], ControlLaw]]] = MappingProxyType(
    {"fit": FitLaw, "admit": AdmitLaw, "concur": ConcurLaw}
)
"""Adaptive law name -> factory."""

DEFAULT: Final = "fit"
"""The name of the law a session uses when it is given none."""

DEFAULT_LAW: Final[Callable[[], ControlLaw]] = LAWS[DEFAULT]
"""The factory of the default law."""

_STATIC = "static:"


def law_names() -> list[str]:
    """Every name :func:`parse_law` takes (``static:K`` as such)."""
    return [*sorted(LAWS), f"{_STATIC}K"]


def parse_law(text: str | None, *, field: str = "law") -> ControlLaw | None:
    """The law ``text`` names; ``None`` for the default law (``None`` or :data:`DEFAULT`,
    which the session makes fresh per batch). Raises :class:`ConfigError` naming ``field``."""
    if text is None or text == DEFAULT:
        return None
    if text.startswith(_STATIC):
        raw = text.removeprefix(_STATIC)
        if raw.isdigit() and int(raw) >= 1:
            return FixedLaw(int(raw))
        raise ConfigError(f"{field}: static:K needs an integer K >= 1, got {text!r}")
    factory = LAWS.get(text)
    if factory is None:
        raise ConfigError(f"{field}: expected one of {', '.join(law_names())}, got {text!r}")
    return factory()
