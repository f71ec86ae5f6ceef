"""Balancer: health state and the four strategies, as pure functions of their inputs."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.protocol.balancer import (
    STRATEGIES,
    HealthState,
    SmoothRoundRobin,
    SourceHash,
    Strategy,
    make_strategy,
)

PROPERTY = settings(max_examples=300, database=None, derandomize=True, deadline=None)

FIVE = ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80", "10.0.0.5:80")


def client_keys(count: int) -> list[str]:
    """`count` distinct client addresses, IPv4 and IPv6 mixed."""
    keys = []
    for number in range(count):
        if number % 2:
            keys.append(f"2001:db8::{number:x}")
        else:
            keys.append(f"192.0.{number >> 8 & 0xFF}.{number & 0xFF}")
    return keys


def all_up(count: int) -> list[bool]:
    return [True] * count


def first_choices(
    strategy: Strategy,
    calls: int,
    up: Sequence[bool],
    active: Sequence[int],
    key: str | None = None,
) -> list[int]:
    return [strategy.attempt_order(key, up, active)[0] for _ in range(calls)]


def first_choices_by_key(strategy: Strategy, keys: Sequence[str], up: Sequence[bool]) -> list[int]:
    return [strategy.attempt_order(key, up, [0] * len(up))[0] for key in keys]


def longest_run(sequence: Sequence[int]) -> int:
    longest = run = 0
    previous: int | None = None
    for item in sequence:
        run = run + 1 if item == previous else 1
        previous = item
        longest = max(longest, run)
    return longest


# ----- HealthState ----------------------------------------------------------------------

# (rise, fall, starts up, events: S = success / F = failure, `up` after each, changed flags)
HEALTH_CASES = [
    (2, 3, True, "FFF", "TTF", "..!"),
    (2, 3, True, "FFSFF", "TTTTT", "....."),  # a success resets the failure streak
    (2, 3, True, "FFSFFF", "TTTTTF", ".....!"),
    (2, 3, True, "SSSS", "TTTT", "...."),  # successes while up change nothing
    (2, 3, False, "SS", "FT", ".!"),
    (2, 3, False, "SFS", "FFF", "..."),  # a failure resets the success streak
    (2, 3, False, "SFSS", "FFFT", "...!"),
    (2, 3, False, "FFFF", "FFFF", "...."),  # failures while down change nothing
    (1, 1, True, "FSFS", "FTFT", "!!!!"),
    (3, 2, True, "FFSSSFF", "TFFFTTF", ".!..!.!"),
    # streaks start over after a transition: the failures that took it down don't count
    (2, 2, True, "FFSFSS", "TFFFFT", ".!...!"),
    (1, 3, True, "FFFS", "TTFT", "..!!"),
]


@pytest.mark.parametrize(("rise", "fall", "initial", "events", "ups", "changes"), HEALTH_CASES)
def test_health_state_transitions(
    rise: int, fall: int, initial: bool, events: str, ups: str, changes: str
) -> None:
    state = HealthState(rise=rise, fall=fall, up=initial)
    assert state.up is initial
    for event, expected_up, expected_change in zip(events, ups, changes, strict=True):
        changed = state.record_success() if event == "S" else state.record_failure()
        assert changed is (expected_change == "!"), (events, event)
        assert state.up is (expected_up == "T"), (events, event)


def test_health_state_defaults_to_up() -> None:
    state = HealthState(2, 3)
    assert state.up is True
    assert (state.rise, state.fall) == (2, 3)


def test_health_state_up_is_read_only() -> None:
    state = HealthState(2, 3)
    with pytest.raises(AttributeError):
        state.up = False  # type: ignore[misc]


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 3), (0, 0)])
def test_health_state_rejects_counts_below_one(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HealthState(rise, fall)


# ----- make_strategy --------------------------------------------------------------------


def test_strategy_names() -> None:
    assert STRATEGIES == ("round_robin", "least_connections", "random", "source_hash")


@pytest.mark.parametrize(
    ("name", "names", "weights", "message"),
    [
        ("weighted", ["a"], [1], "unknown balance strategy"),
        ("", ["a"], [1], "unknown balance strategy"),
        ("round_robin", [], [], "at least one upstream"),
        ("round_robin", ["a", "b"], [1], "2 upstream names for 1 weights"),
        ("source_hash", ["a"], [1, 1], "1 upstream names for 2 weights"),
        ("least_connections", ["a", "b"], [1, 0], "positive integers"),
        ("random", ["a"], [-2], "positive integers"),
        ("round_robin", ["a"], [1.5], "positive integers"),
        ("round_robin", ["a"], [True], "positive integers"),
    ],
)
def test_make_strategy_rejects(
    name: str, names: list[str], weights: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_strategy(name, names, weights)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize(("up", "active"), [([True, True], [0, 0, 0]), ([True] * 3, [0, 0])])
def test_attempt_order_rejects_wrong_lengths(name: str, up: list[bool], active: list[int]) -> None:
    strategy = make_strategy(name, FIVE[:3], [1, 1, 1])
    with pytest.raises(ValueError, match="expected 3"):
        strategy.attempt_order("192.0.2.1", up, active)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("key", ["192.0.2.1", None])
def test_all_down_gives_empty_order(name: str, key: str | None) -> None:
    strategy = make_strategy(name, FIVE[:3], [2, 1, 1], random.Random(0))
    for _ in range(3):
        assert strategy.attempt_order(key, [False] * 3, [0, 0, 0]) == []


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize(
    "up",
    [
        [True, True, True, True],
        [True, False, True, True],
        [False, False, False, True],
        [False, True, False, True],
    ],
)
def test_failover_lists_every_up_upstream_once(name: str, up: list[bool]) -> None:
    strategy = make_strategy(name, FIVE[:4], [3, 1, 2, 1], random.Random(0))
    expected = [index for index, is_up in enumerate(up) if is_up]
    for call in range(20):
        order = strategy.attempt_order(f"198.51.100.{call}", up, [call % 3, 1, 0, 2])
        assert sorted(order) == expected


@pytest.mark.parametrize("name", STRATEGIES)
def test_single_upstream(name: str) -> None:
    strategy = make_strategy(name, ["only:1"], [7], random.Random(0))
    assert strategy.attempt_order("192.0.2.1", [True], [5]) == [0]
    assert strategy.attempt_order(None, [True], [0]) == [0]
    assert strategy.attempt_order("192.0.2.1", [False], [0]) == []


# ----- round_robin ----------------------------------------------------------------------


def test_round_robin_2_1_1_interleaves() -> None:
    strategy = make_strategy("round_robin", FIVE[:3], [2, 1, 1])
    picks = first_choices(strategy, 40, all_up(3), [0, 0, 0])
    assert picks[:8] == [0, 1, 2, 0, 0, 1, 2, 0]
    assert Counter(picks) == {0: 20, 1: 10, 2: 10}
    assert longest_run(picks) == 2


@pytest.mark.parametrize(
    ("weights", "cycle"),
    [
        ([1, 1, 1], [0, 1, 2]),
        ([5, 1, 1], [0, 0, 1, 0, 2, 0, 0]),  # nginx's documented example: a a b a c a a
        ([3, 2], [0, 1, 0, 1, 0]),
        ([1, 3], [1, 0, 1, 1]),
        ([4], [0, 0, 0, 0]),
    ],
)
def test_round_robin_sequences(weights: list[int], cycle: list[int]) -> None:
    strategy = make_strategy("round_robin", FIVE[: len(weights)], weights)
    picks = first_choices(strategy, 3 * len(cycle), all_up(len(weights)), [0] * len(weights))
    # the sequence repeats with a period of the total weight
    assert picks == cycle * 3


def test_round_robin_ignores_key_and_active_counts() -> None:
    strategy = make_strategy("round_robin", FIVE[:3], [2, 1, 1])
    picks = [
        strategy.attempt_order(f"192.0.2.{n}", all_up(3), [n, 100 - n, 7])[0] for n in range(8)
    ]
    assert picks == [0, 1, 2, 0, 0, 1, 2, 0]


def test_round_robin_skips_a_down_upstream() -> None:
    strategy = make_strategy("round_robin", FIVE[:3], [2, 1, 1])
    up = [True, False, True]
    picks = first_choices(strategy, 30, up, [0, 0, 0])
    assert picks[:6] == [0, 2, 0, 0, 2, 0]
    assert Counter(picks) == {0: 20, 2: 10}
    assert longest_run(picks) == 2


def test_round_robin_down_mid_rotation_keeps_proportions() -> None:
    strategy = make_strategy("round_robin", FIVE[:3], [2, 1, 1])
    assert first_choices(strategy, 5, all_up(3), [0, 0, 0]) == [0, 1, 2, 0, 0]
    picks = first_choices(strategy, 30, [True, False, True], [0, 0, 0])
    assert Counter(picks) == {0: 20, 2: 10}
    # when it comes back, all three share again in proportion 2:1:1
    picks = first_choices(strategy, 40, all_up(3), [0, 0, 0])
    assert Counter(picks) == {0: 20, 1: 10, 2: 10}
    assert longest_run(picks) == 2


@pytest.mark.parametrize(
    ("up", "orders"),
    [
        ([True, True, True, True], [[0, 1, 2, 3], [2, 3, 0, 1], [1, 2, 3, 0], [3, 0, 1, 2]]),
        ([True, False, True, True], [[0, 2, 3], [2, 3, 0], [3, 0, 2], [0, 2, 3]]),
        ([False, True, False, True], [[1, 3], [3, 1], [1, 3], [3, 1]]),
    ],
)
def test_round_robin_failover_walks_on_from_the_pick(
    up: list[bool], orders: list[list[int]]
) -> None:
    strategy = make_strategy("round_robin", FIVE[:4], [2, 1, 2, 1])
    assert [strategy.attempt_order(None, up, [0] * 4) for _ in orders] == orders


def test_smooth_round_robin_pick() -> None:
    rotation = SmoothRoundRobin([2, 1, 1])
    assert [rotation.pick() for _ in range(4)] == [0, 1, 2, 0]
    assert [rotation.pick([False, True, True]) for _ in range(4)] == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="no upstream is up"):
        rotation.pick([False, False, False])
    with pytest.raises(ValueError, match="positive integers"):
        SmoothRoundRobin([1, 0])


# ----- least_connections ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "up", "active", "order"),
    [
        ([1, 1, 1], [True, True, True], [5, 2, 9], [1, 0, 2]),
        ([1, 1, 1], [True, True, True], [0, 0, 1], [0, 1, 2]),
        ([1, 1, 1], [True, False, True], [5, 0, 9], [0, 2]),
        ([1, 1, 1, 1], [True, True, True, True], [3, 1, 2, 0], [3, 1, 2, 0]),
        # relative to weight: 3/2 < 2/1
        ([2, 1], [True, True], [3, 2], [0, 1]),
        # 5/2 > 2/1, though 5 is not the highest count that matters
        ([2, 1, 4], [True, True, True], [5, 2, 9], [1, 2, 0]),
        ([10, 1], [True, True], [9, 1], [0, 1]),
        # 4/2 == 2/1: a tie, broken by rotation (first call starts at index 0)
        ([2, 1], [True, True], [4, 2], [0, 1]),
    ],
)
def test_least_connections_order(
    weights: list[int], up: list[bool], active: list[int], order: list[int]
) -> None:
    strategy = make_strategy("least_connections", FIVE[: len(weights)], weights)
    assert strategy.attempt_order("192.0.2.1", up, active) == order


def test_least_connections_rotates_ties() -> None:
    strategy = make_strategy("least_connections", FIVE[:3], [1, 1, 1])
    orders = [strategy.attempt_order(None, all_up(3), [4, 4, 4]) for _ in range(4)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_least_connections_rotates_ties_among_up_upstreams() -> None:
    strategy = make_strategy("least_connections", FIVE[:4], [1, 1, 1, 1])
    firsts = first_choices(strategy, 6, [True, False, True, True], [0, 0, 0, 0])
    assert firsts == [0, 2, 3, 0, 2, 3]


def test_least_connections_rotates_only_among_the_least_loaded() -> None:
    strategy = make_strategy("least_connections", FIVE[:4], [1, 1, 1, 1])
    orders = [strategy.attempt_order(None, all_up(4), [1, 0, 1, 0]) for _ in range(4)]
    assert orders == [[1, 3, 0, 2], [1, 3, 2, 0], [3, 1, 2, 0], [3, 1, 0, 2]]


def test_least_connections_respects_weights_as_connections_grow() -> None:
    strategy = make_strategy("least_connections", FIVE[:3], [2, 1, 1])
    active = [0, 0, 0]
    for _ in range(40):
        active[strategy.attempt_order(None, all_up(3), active)[0]] += 1
    assert active == [20, 10, 10]


# ----- random (power of two choices) ----------------------------------------------------


def test_random_prefers_the_idle_upstream() -> None:
    strategy = make_strategy("random", FIVE[:3], [1, 1, 1], random.Random(1234))
    counts = Counter(first_choices(strategy, 10_000, all_up(3), [0, 100, 100]))
    # upstream 0 wins whenever it is one of the two drawn: 2/3 of the time
    assert 6400 <= counts[0] <= 6950
    assert 1500 <= counts[1] <= 1850
    assert 1500 <= counts[2] <= 1850


def test_random_never_picks_the_more_loaded_of_its_two() -> None:
    strategy = make_strategy("random", FIVE, [1, 2, 1, 3, 1], random.Random(99))
    load_rng = random.Random(7)
    weights = [1, 2, 1, 3, 1]
    for _ in range(2000):
        active = [load_rng.randrange(50) for _ in range(5)]
        first, second, *_ = strategy.attempt_order("192.0.2.1", all_up(5), active)
        assert active[first] * weights[second] <= active[second] * weights[first]


def test_random_never_first_chooses_the_most_loaded() -> None:
    strategy = make_strategy("random", FIVE[:3], [1, 1, 1], random.Random(5))
    counts = Counter(first_choices(strategy, 10_000, all_up(3), [0, 50, 100]))
    assert counts[2] == 0
    assert 6400 <= counts[0] <= 6950
    assert 3050 <= counts[1] <= 3600


def test_random_draws_by_weight() -> None:
    # with equal loads the first drawn wins, and it is drawn in proportion to weight
    strategy = make_strategy("random", FIVE[:2], [3, 1], random.Random(1234))
    counts = Counter(first_choices(strategy, 10_000, all_up(2), [0, 0]))
    assert 7300 <= counts[0] <= 7700


def test_random_skips_down_upstreams() -> None:
    strategy = make_strategy("random", FIVE[:4], [1, 1, 1, 1], random.Random(3))
    up = [False, True, False, True]
    counts = Counter(first_choices(strategy, 1000, up, [0, 0, 0, 0]))
    assert set(counts) == {1, 3}
    assert strategy.attempt_order(None, [False, False, True, False], [0, 0, 0, 0]) == [2]


def test_random_is_deterministic_for_a_seed() -> None:
    first = make_strategy("random", FIVE, [1, 2, 3, 4, 5], random.Random(42))
    second = make_strategy("random", FIVE, [1, 2, 3, 4, 5], random.Random(42))
    active = [3, 1, 4, 1, 5]
    orders = [first.attempt_order(None, all_up(5), active) for _ in range(100)]
    assert orders == [second.attempt_order(None, all_up(5), active) for _ in range(100)]


def test_random_failover_tail_is_shuffled() -> None:
    strategy = make_strategy("random", FIVE, [1] * 5, random.Random(11))
    tails = {tuple(strategy.attempt_order(None, all_up(5), [0] * 5)[2:]) for _ in range(200)}
    assert len(tails) > 10


# ----- source_hash ----------------------------------------------------------------------


def test_source_hash_is_stable() -> None:
    strategy = make_strategy("source_hash", FIVE, [1] * 5)
    other = make_strategy("source_hash", FIVE, [1] * 5)
    for key in client_keys(200):
        order = strategy.attempt_order(key, all_up(5), [0] * 5)
        assert strategy.attempt_order(key, all_up(5), [9, 0, 3, 1, 2]) == order
        assert other.attempt_order(key, all_up(5), [0] * 5) == order


@pytest.mark.parametrize(
    ("key", "order"),
    [
        # pinned: a change here moves every client of every deployment
        ("10.0.0.1", [4, 0, 3, 1, 2]),
        ("2001:db8::1", [3, 0, 2, 1, 4]),
    ],
)
def test_source_hash_known_orders(key: str, order: list[int]) -> None:
    strategy = make_strategy("source_hash", "abcde", [1] * 5)
    assert strategy.attempt_order(key, all_up(5), [0] * 5) == order


def test_source_hash_uses_names_not_indexes() -> None:
    names = list(FIVE)
    forward = make_strategy("source_hash", names, [1, 2, 3, 4, 5])
    backward = make_strategy("source_hash", names[::-1], [5, 4, 3, 2, 1])
    for key in client_keys(500):
        order = forward.attempt_order(key, all_up(5), [0] * 5)
        reverse = backward.attempt_order(key, all_up(5), [0] * 5)
        assert [names[i] for i in order] == [names[::-1][i] for i in reverse]


def test_source_hash_spreads_evenly() -> None:
    strategy = make_strategy("source_hash", FIVE, [1] * 5)
    counts = Counter(first_choices_by_key(strategy, client_keys(10_000), all_up(5)))
    assert set(counts) == set(range(5))
    for count in counts.values():
        assert 1700 <= count <= 2300  # 2000 ± 15%


def test_source_hash_removing_an_upstream_moves_only_its_clients() -> None:
    keys = client_keys(10_000)
    before = make_strategy("source_hash", FIVE, [1] * 5)
    remaining = FIVE[:2] + FIVE[3:]
    after = make_strategy("source_hash", remaining, [1] * 4)
    old = [FIVE[i] for i in first_choices_by_key(before, keys, all_up(5))]
    new = [remaining[i] for i in first_choices_by_key(after, keys, all_up(4))]
    moved = [key for key, was, now in zip(keys, old, new, strict=True) if was != now]
    assert len(moved) == old.count(FIVE[2])
    assert all(was == FIVE[2] for was, now in zip(old, new, strict=True) if was != now)


def test_source_hash_down_upstream_moves_only_its_clients_to_their_second_choice() -> None:
    keys = client_keys(10_000)
    strategy = make_strategy("source_hash", FIVE, [1] * 5)
    down = [True, True, False, True, True]
    for key in keys:
        order = strategy.attempt_order(key, all_up(5), [0] * 5)
        assert strategy.attempt_order(key, down, [0] * 5) == [i for i in order if i != 2]


def test_source_hash_adding_an_upstream_moves_about_one_in_six() -> None:
    keys = client_keys(10_000)
    six = (*FIVE, "10.0.0.6:80")
    before = make_strategy("source_hash", FIVE, [1] * 5)
    after = make_strategy("source_hash", six, [1] * 6)
    old = first_choices_by_key(before, keys, all_up(5))
    new = first_choices_by_key(after, keys, all_up(6))
    moved = [now for was, now in zip(old, new, strict=True) if was != now]
    assert 1200 <= len(moved) <= 2200
    assert set(moved) == {5}


@pytest.mark.parametrize(("weights", "low", "high"), [([2, 1], 0.63, 0.70), ([1, 3], 0.22, 0.28)])
def test_source_hash_respects_weights(weights: list[int], low: float, high: float) -> None:
    strategy = make_strategy("source_hash", FIVE[:2], weights)
    counts = Counter(first_choices_by_key(strategy, client_keys(10_000), all_up(2)))
    assert low <= counts[0] / 10_000 <= high


def test_source_hash_without_a_client_address_falls_back_to_round_robin() -> None:
    strategy = make_strategy("source_hash", FIVE[:3], [2, 1, 1])
    picks = first_choices(strategy, 40, all_up(3), [0, 0, 0], key=None)
    assert picks[:8] == [0, 1, 2, 0, 0, 1, 2, 0]
    assert Counter(picks) == {0: 20, 1: 10, 2: 10}
    assert strategy.attempt_order(None, [True, False, True], [0, 0, 0]) == [0, 2]


def test_source_hash_empty_key_is_hashed_like_any_other() -> None:
    strategy = make_strategy("source_hash", FIVE, [1] * 5)
    orders = {tuple(strategy.attempt_order("", all_up(5), [0] * 5)) for _ in range(5)}
    assert len(orders) == 1


def test_source_hash_duplicate_names_each_get_a_share() -> None:
    strategy = SourceHash(["a:1", "a:1", "b:1"], [1, 1, 1])
    counts = Counter(first_choices_by_key(strategy, client_keys(3000), all_up(3)))
    assert all(800 <= counts[index] <= 1200 for index in range(3))


def test_source_hash_scores_are_positive_and_scale_with_weight() -> None:
    light = SourceHash(["a:1"], [1])
    heavy = SourceHash(["a:1"], [3])
    for key in client_keys(100):
        assert light.score(0, key) > 0
        assert heavy.score(0, key) == pytest.approx(3 * light.score(0, key))


# ----- properties -----------------------------------------------------------------------


@st.composite
def balancer_inputs(draw: st.DrawFn) -> tuple[list[int], list[bool], list[list[int]], int]:
    count = draw(st.integers(min_value=1, max_value=8))
    weights = draw(st.lists(st.integers(1, 1000), min_size=count, max_size=count))
    up = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    actives = draw(
        st.lists(
            st.lists(st.integers(0, 1_000_000), min_size=count, max_size=count),
            min_size=1,
            max_size=5,
        )
    )
    seed = draw(st.integers(0, 2**32 - 1))
    return weights, up, actives, seed


@PROPERTY
@given(
    inputs=balancer_inputs(),
    name=st.sampled_from(STRATEGIES),
    key=st.none() | st.text(max_size=40),
)
def test_attempt_order_is_a_permutation_of_the_up_upstreams(
    inputs: tuple[list[int], list[bool], list[list[int]], int], name: str, key: str | None
) -> None:
    weights, up, actives, seed = inputs
    names = [f"10.0.{index}.1:8000" for index in range(len(weights))]
    strategy = make_strategy(name, names, weights, random.Random(seed))
    expected = [index for index, is_up in enumerate(up) if is_up]
    for active in actives:
        order = strategy.attempt_order(key, up, active)
        assert sorted(order) == expected
