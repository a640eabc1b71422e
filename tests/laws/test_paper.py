"""Control laws: CONCUR's Eq. 1 sample by sample, FixedLaw, validation."""

from __future__ import annotations

from typing import Any

import pytest

from concur_langgraph import ConcurLaw, ConfigError, ControlLaw, FixedLaw, Sample


def sample(usage: float, hit_rate: float | None, *, time: float = 0.0) -> Sample:
    queries = 0 if hit_rate is None else 1000
    return Sample(
        time=time,
        kv_usage=usage,
        prefix_hit_rate=hit_rate,
        prefix_queries=queries,
        prefix_hits=0 if hit_rate is None else round(hit_rate * queries),
        preemptions=0,
        prompt_tokens=queries,
        generation_tokens=0,
        running=0,
        waiting=0,
        waiting_capacity=0,
        kv_capacity_tokens=None,
        interval_s=1.0,
    )


LAW = ConcurLaw()


def test_defaults_are_the_papers_constants() -> None:
    assert (LAW.alpha, LAW.beta, LAW.u_low, LAW.u_high, LAW.h_thresh) == (2, 0.5, 0.2, 0.5, 0.2)
    assert LAW.no_queries == "hold"


def test_laws_follow_the_protocol() -> None:
    assert isinstance(LAW, ControlLaw)
    assert isinstance(FixedLaw(3), ControlLaw)


# -- Eq. 1, one sample one assertion ------------------------------------------------------------


def test_low_usage_adds_alpha() -> None:
    assert LAW.next_window(4, sample(0.1, 0.9)) == 6


def test_low_usage_adds_alpha_even_with_a_low_hit_rate() -> None:
    assert LAW.next_window(4, sample(0.1, 0.0)) == 6


def test_low_usage_adds_alpha_with_no_queries() -> None:
    assert LAW.next_window(4, sample(0.0, None)) == 6


def test_usage_exactly_u_low_holds() -> None:
    assert LAW.next_window(4, sample(0.2, 0.0)) == 4


def test_dead_band_holds_with_a_low_hit_rate() -> None:
    assert LAW.next_window(8, sample(0.35, 0.0)) == 8


def test_usage_exactly_u_high_holds_even_with_a_low_hit_rate() -> None:
    assert LAW.next_window(8, sample(0.5, 0.0)) == 8


def test_high_usage_and_low_hit_rate_halves() -> None:
    assert LAW.next_window(8, sample(0.51, 0.19)) == 4


def test_high_usage_and_hit_rate_exactly_h_thresh_holds() -> None:
    assert LAW.next_window(8, sample(0.9, 0.2)) == 8


def test_high_usage_and_high_hit_rate_holds() -> None:
    assert LAW.next_window(8, sample(1.0, 0.8)) == 8


def test_decrease_of_an_odd_window_rounds_down() -> None:
    assert LAW.next_window(7, sample(0.9, 0.1)) == 3


def test_decrease_of_one_gives_zero_for_the_controller_to_clamp() -> None:
    assert LAW.next_window(1, sample(0.9, 0.1)) == 0


def test_high_usage_with_no_queries_holds_by_default() -> None:
    assert LAW.next_window(8, sample(0.9, None)) == 8


def test_high_usage_with_no_queries_decreases_when_asked() -> None:
    assert ConcurLaw(no_queries="decrease").next_window(8, sample(0.9, None)) == 4


def test_no_queries_option_does_not_touch_the_dead_band() -> None:
    assert ConcurLaw(no_queries="decrease").next_window(8, sample(0.4, None)) == 8


def test_custom_constants_are_used() -> None:
    law = ConcurLaw(alpha=5, beta=0.75, u_low=0.3, u_high=0.8, h_thresh=0.5)
    assert [
        law.next_window(8, sample(0.29, 0.0)),
        law.next_window(8, sample(0.81, 0.49)),
        law.next_window(8, sample(0.8, 0.0)),
        law.next_window(8, sample(0.81, 0.5)),
    ] == [13, 6, 8, 8]


def test_a_trajectory_follows_eq1_step_by_step() -> None:
    """Warm-up growth, dead band, thrashing, recovery: Eq. 1 applied by hand at each step."""
    trace = [
        (0.05, 0.9, 6),  # U < 0.2: +2
        (0.15, 0.8, 8),
        (0.30, 0.7, 8),  # dead band
        (0.60, 0.5, 8),  # high usage, but hits healthy
        (0.95, 0.1, 4),  # thrashing: x0.5
        (0.90, 0.15, 2),
        (0.45, 0.3, 2),
        (0.10, None, 4),  # usage low, no queries: the increase does not need H
    ]
    window = 4
    for usage, hit_rate, expected in trace:
        window = LAW.next_window(window, sample(usage, hit_rate))
        assert window == expected


def test_fixed_law_ignores_the_signals() -> None:
    law = FixedLaw(64)
    assert [law.next_window(w, sample(u, h)) for w, u, h in [(4, 0.0, None), (100, 1.0, 0.0)]] == [
        64,
        64,
    ]


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0}, "alpha: must be an integer >= 1"),
        ({"alpha": 1.5}, "alpha: must be an integer >= 1"),
        ({"alpha": True}, "alpha: must be an integer >= 1"),
        ({"beta": 0}, "beta: must be a number > 0 and < 1"),
        ({"beta": 1}, "beta: must be a number > 0 and < 1"),
        ({"beta": float("nan")}, "beta: must be a number > 0 and < 1"),
        ({"u_low": 0}, "u_low: must be a number > 0"),
        ({"u_low": 0.5}, "u_high: must be a number > u_low"),
        ({"u_high": 1.01}, "u_high: must be a number > u_low"),
        ({"u_high": 0.1}, "u_high: must be a number > u_low (0.2) and <= 1, got 0.1"),
        ({"h_thresh": -0.1}, "h_thresh: must be a number >= 0 and <= 1"),
        ({"h_thresh": 1.5}, "h_thresh: must be a number >= 0 and <= 1"),
        ({"h_thresh": "0.2"}, "h_thresh: must be a number >= 0 and <= 1"),
        ({"no_queries": "shrink"}, "no_queries: must be 'hold' or 'decrease'"),
    ],
)
def test_bad_constants_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ConcurLaw(**kwargs)
    assert str(info.value).startswith(message)


def test_edge_constants_are_accepted() -> None:
    law = ConcurLaw(u_high=1.0, h_thresh=0.0, alpha=1, beta=0.01)
    assert law.next_window(100, sample(1.0, 0.0)) == 100  # U > 1 impossible: never decreases


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_fixed_law_validates_k(bad: object) -> None:
    with pytest.raises(ConfigError, match="k: must be an integer >= 1"):
        FixedLaw(bad)  # type: ignore[arg-type]


def test_laws_are_immutable_values() -> None:
    with pytest.raises(AttributeError):
        LAW.alpha = 3  # type: ignore[misc]
    assert ConcurLaw(alpha=2) == LAW
