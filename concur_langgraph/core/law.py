"""What the controller asks of a control law: the :class:`ControlLaw` protocol, every hook.

A law is a pure object (Netflix concurrency-limits' ``Limit``): a :class:`Sample` and the
current window in, the next window out; no I/O, no clock, no asyncio. The controller owns time
and enforcement, clamps the result to ``[min_window, max_window]``, and never calls a law on a
stale sample. Besides ``next_window`` a law answers four questions, each with a default in
:class:`LawDefaults` that the package's laws inherit:

* ``starts_open``: should the batch start with every agent admitted (window ``OPEN``)?
* ``start_window``: a start window the law knows better (a warm start), or ``None``;
* ``follows_demand``: may the controller cap growth at the agents that want a slot? (a probe
  of capacity yes; an explicit target such as a fixed window no);
* ``explain(window, sample)``: why the last ``next_window`` with these arguments returned what
  it did, in words (logged with each window change and kept in ``statistics()``).

A law of your own may implement the protocol fully, inherit :class:`LawDefaults`, or define
``next_window`` alone: :func:`as_control_law` gives it the defaults, in one place.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from concur_langgraph.core.signals import Sample

__all__ = ["ControlLaw", "LawDefaults", "WindowLaw", "as_control_law", "describe"]


class WindowLaw(Protocol):
    """The least a law must do: decide the next window."""

    def next_window(self, window: int, sample: Sample) -> int:
        """The next window (the controller clamps it to ``[min_window, max_window]``)."""
        ...


@runtime_checkable
class ControlLaw(Protocol):
    """Decides the next window from the current one and the latest sample (module docstring
    for the hooks)."""

    @property
    def starts_open(self) -> bool:
        """Whether the batch starts with every agent admitted."""
        ...

    @property
    def start_window(self) -> int | None:
        """A start window chosen by the law (a warm start), or ``None``."""
        ...

    @property
    def follows_demand(self) -> bool:
        """Whether the controller may cap growth at the agents that want a slot."""
        ...

    def next_window(self, window: int, sample: Sample) -> int:
        """The next window (the controller clamps it to ``[min_window, max_window]``)."""
        ...

    def explain(self, window: int, sample: Sample) -> str:
        """Why ``next_window(window, sample)``, just called, returned what it did."""
        ...


def describe(law: object, sample: Sample) -> str:
    """The facts, for a law that gives no reasons of its own: its name and the signals."""
    hit = sample.prefix_hit_rate
    return (
        f"{type(law).__name__} (no reasons given): KV usage {sample.kv_usage:.2f}, hit rate "
        f"{'-' if hit is None else f'{hit:.2f}'}, {sample.waiting} waiting, "
        f"{sample.preemptions} preemptions"
    )


class LawDefaults:
    """The hooks' defaults: a restricted start, growth capped at demand, no warm start, and
    an explanation made of the law's name and the signals."""

    __slots__ = ()

    # Plain class attributes: a law overrides them as a dataclass field or a class attribute.
    starts_open = False
    follows_demand = True

    @property
    def start_window(self) -> int | None:
        """No start window of the law's own."""
        return None

    def next_window(self, window: int, sample: Sample) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def explain(self, window: int, sample: Sample) -> str:
        """The law's name and the signals (a law with reasons of its own overrides this)."""
        return describe(self, sample)


class _WithDefaults(LawDefaults):
    """A law that defines ``next_window`` alone, with the other hooks' defaults."""

    __slots__ = ("law",)

    def __init__(self, law: WindowLaw) -> None:
        self.law = law

    def next_window(self, window: int, sample: Sample) -> int:
        return self.law.next_window(window, sample)

    def explain(self, window: int, sample: Sample) -> str:
        return describe(self.law, sample)


def as_control_law(law: WindowLaw) -> ControlLaw:
    """``law`` itself when it implements :class:`ControlLaw`, else ``law`` with the defaults."""
    if isinstance(law, ControlLaw):
        return law
    return _WithDefaults(law)
