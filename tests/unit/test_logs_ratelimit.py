"""The log rate limit: one event per key per interval, the rest counted and reported."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from splicerelay.ops.ratelimit import RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_event_passes_and_the_next_within_the_interval_are_held_back() -> None:
    clock = Clock()
    limit: RateLimit[str] = RateLimit(10.0, clock)
    assert limit.admit("a") == 0
    for step in (0.0, 1.0, 9.999):
        clock.now = 1000.0 + step
        assert limit.admit("a") is None


def test_the_first_event_after_the_interval_reports_how_many_were_held_back() -> None:
    clock = Clock()
    limit: RateLimit[str] = RateLimit(10.0, clock)
    assert limit.admit("a") == 0
    for _ in range(7):
        assert limit.admit("a") is None
    clock.now += 10.0
    assert limit.admit("a") == 7
    # A new window began with it: the count starts again.
    assert limit.admit("a") is None
    clock.now += 10.0
    assert limit.admit("a") == 1
    clock.now += 10.0
    assert limit.admit("a") == 0


def test_keys_are_limited_separately() -> None:
    clock = Clock()
    limit: RateLimit[tuple[str, str]] = RateLimit(10.0, clock)
    assert limit.admit(("web", "10.0.0.1:80")) == 0
    assert limit.admit(("web", "10.0.0.2:80")) == 0
    assert limit.admit(("api", "10.0.0.1:80")) == 0
    assert limit.admit(("web", "10.0.0.1:80")) is None
    assert limit.admit(("web", "10.0.0.2:80")) is None


def test_the_window_runs_from_the_event_that_passed_not_from_the_last_held_back() -> None:
    clock = Clock()
    limit: RateLimit[str] = RateLimit(10.0, clock)
    assert limit.admit("a") == 0
    clock.now += 9.0
    assert limit.admit("a") is None
    clock.now += 1.0  # 10 s after the one that passed, 1 s after the last held back
    assert limit.admit("a") == 1


def test_expired_keys_are_forgotten_when_there_are_too_many() -> None:
    clock = Clock()
    limit: RateLimit[int] = RateLimit(10.0, clock, max_keys=3)
    for key in range(3):
        assert limit.admit(key) == 0
    clock.now += 5.0
    assert limit.admit(3) == 0  # nothing expired yet: kept all the same
    assert len(limit) == 4
    clock.now += 5.0  # 0, 1 and 2 have expired; 3 has not
    assert limit.admit(4) == 0
    assert len(limit) == 2
    assert limit.admit(3) is None  # its window still runs


@given(st.lists(st.tuples(st.sampled_from("ab"), st.floats(0.0, 30.0)), max_size=60))
def test_passed_plus_held_back_accounts_for_every_event_and_passes_are_spaced(
    events: list[tuple[str, float]],
) -> None:
    """Against a model: per key, passes are at least `interval` apart, and each pass
    reports exactly the events held back since the previous pass."""
    clock = Clock()
    limit: RateLimit[str] = RateLimit(10.0, clock)
    last_pass: dict[str, float] = {}
    held: dict[str, int] = {}
    for key, advance in events:
        clock.now += advance
        result = limit.admit(key)
        if key in last_pass and clock.now - last_pass[key] < 10.0:
            assert result is None
            held[key] += 1
        else:
            assert result == held.get(key, 0)
            last_pass[key] = clock.now
            held[key] = 0
