"""Admin states in the balancer: drain and maint are left out as down is, by every strategy.

A stateful test drives one route's worth of upstreams through health changes, admin
states and operator weights (a weight is a new strategy, as in the relay), and checks
every order the strategy gives against a model.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splicerelay.protocol.balancer import (
    STRATEGIES,
    AdminState,
    SourceHash,
    available,
    make_strategy,
    takes_new_connections,
)

NAMES = ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80")
KEYS = [f"192.0.2.{n}" for n in range(1, 41)]


@pytest.mark.parametrize(
    ("up", "admin", "expected"),
    [
        (True, AdminState.READY, True),
        (True, AdminState.DRAIN, False),
        (True, AdminState.MAINT, False),
        (False, AdminState.READY, False),
        (False, AdminState.DRAIN, False),
        (False, AdminState.MAINT, False),
    ],
)
def test_only_up_and_ready_takes_new_connections(
    up: bool, admin: AdminState, expected: bool
) -> None:
    assert takes_new_connections(up, admin) is expected
    assert available([up], [admin]) == [expected]


def test_available_rejects_lists_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="2 up flags for 1 admin states"):
        available([True, True], [AdminState.READY])


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_drained_upstream_is_never_first_nor_in_the_failover(name: str) -> None:
    strategy = make_strategy(name, NAMES, [1, 5, 1, 1], random.Random(7))
    admin = [AdminState.READY, AdminState.DRAIN, AdminState.READY, AdminState.MAINT]
    up = available([True] * 4, admin)
    for key in KEYS:
        assert sorted(strategy.attempt_order(key, up, [0, 0, 0, 0])) == [0, 2]


def test_source_hash_clients_of_a_drained_upstream_move_and_come_back() -> None:
    strategy = SourceHash(NAMES, [1, 1, 1, 1])
    ready = [AdminState.READY] * 4
    drained = [AdminState.READY, AdminState.DRAIN, AdminState.READY, AdminState.READY]

    def orders(admin: list[AdminState]) -> dict[str, list[int]]:
        up = available([True] * 4, admin)
        return {key: strategy.attempt_order(key, up, [0] * 4) for key in KEYS}

    before, during, after = orders(ready), orders(drained), orders(ready)
    moved = [key for key in KEYS if before[key][0] == 1]
    assert moved, "some client must have been on the drained upstream"
    for key in KEYS:
        # Each client goes where it would have gone had upstream 1 not existed: its
        # second choice if 1 was its first, and nowhere else otherwise.
        assert during[key] == [index for index in before[key] if index != 1]
    assert after == before


def test_round_robin_weight_change_gives_the_new_share() -> None:
    weights = [1, 1, 1]
    strategy = make_strategy("round_robin", NAMES[:3], weights)
    up = available([True] * 3, [AdminState.READY] * 3)
    assert Counter(strategy.attempt_order(None, up, [0] * 3)[0] for _ in range(30)) == {
        0: 10,
        1: 10,
        2: 10,
    }
    weights[1] = 4  # what `set upstream ... weight 4` does: a new strategy
    strategy = make_strategy("round_robin", NAMES[:3], weights)
    assert Counter(strategy.attempt_order(None, up, [0] * 3)[0] for _ in range(60)) == {
        0: 10,
        1: 40,
        2: 10,
    }


class AdminMachine(RuleBasedStateMachine):
    """One route's upstreams: health, admin states, weights; the strategy under test."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "round_robin"
        self.count = 0
        self.weights: list[int] = []
        self.up: list[bool] = []
        self.admin: list[AdminState] = []
        self.active: list[int] = []
        self.rng = random.Random(0)
        self.strategy = make_strategy("round_robin", NAMES[:1], [1])
        # Picks since the strategy was built, while the admitted set has not changed;
        # None once it changed (round_robin's exact shares hold only without changes).
        self.window: Counter[int] | None = Counter()

    @rule(
        name=st.sampled_from(STRATEGIES),
        weights=st.lists(st.integers(1, 6), min_size=1, max_size=len(NAMES)),
    )
    @precondition(lambda self: self.count == 0)
    def start(self, name: str, weights: list[int]) -> None:
        self.name = name
        self.count = len(weights)
        self.weights = weights
        self.up = [True] * self.count
        self.admin = [AdminState.READY] * self.count
        self.active = [0] * self.count
        self._rebuild()

    def _rebuild(self) -> None:
        self.strategy = make_strategy(
            self.name, NAMES[: self.count], self.weights, random.Random(self.rng.random())
        )
        self.window = Counter()

    def _admitted(self) -> list[bool]:
        """The model: up by health and ready by the operator."""
        return [
            up and state is AdminState.READY for up, state in zip(self.up, self.admin, strict=True)
        ]

    @rule(data=st.data())
    @precondition(lambda self: self.count > 0)
    def set_admin(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, self.count - 1))
        state = data.draw(st.sampled_from(list(AdminState)))
        if self.admin[index] is not state:
            self.window = None
        self.admin[index] = state

    @rule(data=st.data())
    @precondition(lambda self: self.count > 0)
    def set_health(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, self.count - 1))
        up = data.draw(st.booleans())
        if self.up[index] is not up:
            self.window = None
        self.up[index] = up

    @rule(data=st.data())
    @precondition(lambda self: self.count > 0)
    def set_weight(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, self.count - 1))
        self.weights[index] = data.draw(st.integers(1, 6))
        self._rebuild()

    @rule()
    @precondition(lambda self: self.count > 0)
    def close_all(self) -> None:
        self.active = [0] * self.count

    @rule(key=st.sampled_from([None, *KEYS[:8]]), keep_open=st.booleans())
    @precondition(lambda self: self.count > 0)
    def connect(self, key: str | None, keep_open: bool) -> None:
        admitted = self._admitted()
        order = self.strategy.attempt_order(key, available(self.up, self.admin), self.active)
        # Never a drained, maint or down upstream, and every admitted one once.
        assert sorted(order) == [index for index in range(self.count) if admitted[index]]
        if not order:
            return
        first = order[0]
        strategy = self.strategy
        if isinstance(strategy, SourceHash) and key is not None:
            # The client's best-scoring admitted upstream: a drained one's clients move
            # to their next choice, and come back the moment it is ready again.
            best = max(
                (index for index in range(self.count) if admitted[index]),
                key=lambda index: (strategy.score(index, key), -index),
            )
            assert first == best
        if keep_open:
            self.active[first] += 1
        if self.window is not None:
            self.window[first] += 1

    @invariant()
    def round_robin_shares_follow_the_weights(self) -> None:
        """Over each full round since a rebuild, round_robin gives every admitted
        upstream exactly its weight's share of first choices."""
        if self.name != "round_robin" or self.window is None or self.count == 0:
            return
        admitted = self._admitted()
        total = sum(w for w, ok in zip(self.weights, admitted, strict=True) if ok)
        picks = sum(self.window.values())
        if total == 0 or picks == 0 or picks % total:
            return
        rounds = picks // total
        for index in range(self.count):
            expected = self.weights[index] * rounds if admitted[index] else 0
            assert self.window[index] == expected


AdminMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, database=None, derandomize=True, deadline=None
)
test_admin_states_in_every_strategy = AdminMachine.TestCase
