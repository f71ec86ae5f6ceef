"""Choosing an upstream, and the up/down state of each one (pure: no sockets, no trio).

The server asks a `Strategy` for the order in which to try a route's upstreams for one
new connection: the choice first, then the failover order. It passes which upstreams are
up (from `HealthState`) and how many connections each has open, so strategies hold only
their own small state (a rotation, a random generator) and never see a socket.

Four strategies, built by `make_strategy`:

- ``round_robin``: nginx's smooth weighted round-robin over the upstreams that are up.
- ``least_connections``: the fewest open connections relative to weight; ties rotate.
- ``random``: power of two random choices, weighted.
- ``source_hash``: weighted rendezvous hashing of the client address against each
  upstream's name, so a client keeps its upstream across restarts and config edits.

An operator's admin state (`ready`, `drain`, `maint`) reaches the strategies through the
same `up` flags as health: `available` folds the two together, so a drained upstream is
left out exactly as a down one is, whatever the strategy. A weight set by the operator
is a new strategy built with `make_strategy`, as a changed member list is.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Protocol

from splicerelay.protocol.control import AdminState

__all__ = [
    "STRATEGIES",
    "AdminState",
    "HealthState",
    "LeastConnections",
    "PowerOfTwoChoices",
    "RoundRobin",
    "SmoothRoundRobin",
    "SourceHash",
    "Strategy",
    "available",
    "make_strategy",
    "takes_new_connections",
]

STRATEGIES: tuple[str, ...] = ("round_robin", "least_connections", "random", "source_hash")


# ----- health -------------------------------------------------------------------------


class HealthState:
    """Up/down state of one upstream, driven by check results (HAProxy semantics).

    `rise` consecutive successes bring a down upstream up; `fall` consecutive failures
    bring an up upstream down. A success resets the failure streak and a failure resets
    the success streak, so a flapping upstream changes state only after a clean run.
    """

    __slots__ = ("_failures", "_fall", "_rise", "_successes", "_up")

    def __init__(self, rise: int, fall: int, up: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be at least 1, got rise={rise} fall={fall}")
        self._rise = rise
        self._fall = fall
        self._up = up
        self._successes = 0
        self._failures = 0

    @property
    def up(self) -> bool:
        return self._up

    @property
    def rise(self) -> int:
        return self._rise

    @property
    def fall(self) -> int:
        return self._fall

    def record_success(self) -> bool:
        """A check or connect succeeded; returns True if `up` changed."""
        self._failures = 0
        if self._up:
            return False
        self._successes += 1
        if self._successes < self._rise:
            return False
        self._up = True
        self._successes = 0
        return True

    def record_failure(self) -> bool:
        """A check or connect failed; returns True if `up` changed."""
        self._successes = 0
        if not self._up:
            return False
        self._failures += 1
        if self._failures < self._fall:
            return False
        self._up = False
        self._failures = 0
        return True

    def __repr__(self) -> str:
        state = "up" if self._up else "down"
        return (
            f"HealthState({state}, rise={self._rise}, fall={self._fall}, "
            f"successes={self._successes}, failures={self._failures})"
        )


# ----- admin state ----------------------------------------------------------------------


def takes_new_connections(up: bool, admin: AdminState) -> bool:
    """Whether an upstream may be chosen for a new connection: its health says it is up,
    and the operator has it `ready`.

    `drain` and `maint` differ only in what else stops (maint also stops the health
    checks): to a strategy both are "not up". Open connections are none of its business.
    """
    return up and admin is AdminState.READY


def available(up: Sequence[bool], admin: Sequence[AdminState]) -> list[bool]:
    """The `up` flags to give a strategy: `takes_new_connections` of each upstream."""
    if len(up) != len(admin):
        raise ValueError(f"{len(up)} up flags for {len(admin)} admin states")
    return [takes_new_connections(flag, state) for flag, state in zip(up, admin, strict=True)]


# ----- strategies ---------------------------------------------------------------------


class Strategy(Protocol):
    """Chooses the upstreams to try for one new connection."""

    def attempt_order(
        self, client_key: str | None, up: Sequence[bool], active: Sequence[int]
    ) -> list[int]:
        """Indexes of upstreams to try for one new connection, best first: the choice,
        then the failover order. Only upstreams with up[i] True are included; an empty
        list means no upstream is up."""
        ...


def _check_weights(weights: Sequence[int]) -> tuple[int, ...]:
    if not weights:
        raise ValueError("a balancer needs at least one upstream")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
            raise ValueError(f"weights must be positive integers, got {weight!r}")
    return tuple(weights)


def _check_call(count: int, up: Sequence[bool], active: Sequence[int]) -> None:
    if len(up) != count or len(active) != count:
        raise ValueError(
            f"expected {count} up flags and active counts, got {len(up)} and {len(active)}"
        )


class SmoothRoundRobin:
    """Picks indexes into a list of upstreams in proportion to their weights.

    This is nginx's smooth weighted round-robin: every pick adds each candidate's weight
    to its running score, takes the highest score (the lowest index on a tie), and
    subtracts the candidates' total weight from it. Weights 2:1:1 give a, b, c, a, a, b,
    c, a, ... and exactly 20/10/10 picks over 40 connections, interleaved rather than in
    bursts.
    """

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = _check_weights(weights)
        self._scores = [0] * len(self._weights)
        self._total = sum(self._weights)

    def pick(self, up: Sequence[bool] | None = None) -> int:
        """The next index; with `up`, only among the upstreams that are up.

        A down upstream is left out of the round entirely, its score frozen: the others
        then share the picks in their own weights' proportions, and when it comes back
        it resumes where it stood instead of receiving a burst to "catch up".
        """
        scores = self._scores
        best = -1
        total = 0
        for index, weight in enumerate(self._weights):
            if up is not None and not up[index]:
                continue
            scores[index] += weight
            total += weight
            if best < 0 or scores[index] > scores[best]:
                best = index
        if best < 0:
            raise ValueError("no upstream is up")
        scores[best] -= total
        return best


class RoundRobin:
    """``round_robin``: smooth weighted round-robin over the upstreams that are up.

    Failover after the choice walks the list from it onwards, skipping upstreams that
    are down, so the connections a refusing upstream should have had spread over the
    others as the rotation does, rather than all landing on index 0.
    """

    def __init__(self, weights: Sequence[int]) -> None:
        self._rotation = SmoothRoundRobin(weights)
        self._count = len(weights)

    def attempt_order(
        self, client_key: str | None, up: Sequence[bool], active: Sequence[int]
    ) -> list[int]:
        _check_call(self._count, up, active)
        if not any(up):
            return []
        return self.order_up(up)

    def order_up(self, up: Sequence[bool]) -> list[int]:
        """The next pick, then the other up upstreams in list order from it; `up` has a True."""
        first = self._rotation.pick(up)
        count = self._count
        order = [first]
        for offset in range(1, count):
            index = (first + offset) % count
            if up[index]:
                order.append(index)
        return order


class LeastConnections:
    """``least_connections``: the up upstream with the fewest connections per weight.

    Load is active/weight, so an upstream of weight 2 is as loaded with 4 connections as
    one of weight 1 with 2. Equal loads are broken by a start offset that advances on
    every call, counted among the upstreams that are up: a burst of new connections
    arriving before any of them is counted as active then spreads over equal upstreams
    in turn instead of piling onto index 0 (or onto the neighbour of a down one).
    Failover is the rest in increasing load, with the same tie-break.
    """

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = _check_weights(weights)
        self._turn = 0

    def attempt_order(
        self, client_key: str | None, up: Sequence[bool], active: Sequence[int]
    ) -> list[int]:
        weights = self._weights
        _check_call(len(weights), up, active)
        candidates = [index for index in range(len(weights)) if up[index]]
        if not candidates:
            return []
        size = len(candidates)
        start = self._turn % size
        self._turn += 1
        rotated = candidates[start:] + candidates[:start]
        # A stable sort keeps the rotation among equal loads. Float division is exact
        # enough: equal ratios give equal floats, and different ratios of realistic
        # counts and weights never round to the same one.
        rotated.sort(key=lambda i: active[i] / weights[i])
        return rotated


class PowerOfTwoChoices:
    """``random``: power of two random choices, weighted.

    Why two choices: picking the less loaded of two random upstreams keeps the load
    almost as even as least-connections (the maximum load drops exponentially compared
    with one random choice), yet needs no global ordering and does not herd every new
    connection onto the single least loaded upstream when the active counts are stale.

    Two distinct up upstreams are drawn with probability proportional to weight; the one
    with fewer connections per weight is tried first (the first drawn on a tie), then
    the other, then the rest in random order.
    """

    def __init__(self, weights: Sequence[int], rng: random.Random | None = None) -> None:
        self._weights = _check_weights(weights)
        self._rng = rng if rng is not None else random.Random()

    def attempt_order(
        self, client_key: str | None, up: Sequence[bool], active: Sequence[int]
    ) -> list[int]:
        count = len(self._weights)
        _check_call(count, up, active)
        candidates = [index for index in range(count) if up[index]]
        if len(candidates) <= 1:
            return candidates
        first = self._draw(candidates)
        candidates.remove(first)
        second = self._draw(candidates)
        candidates.remove(second)
        weights = self._weights
        # Compare active/weight by cross-multiplying: exact, and no division.
        if active[second] * weights[first] < active[first] * weights[second]:
            first, second = second, first
        self._rng.shuffle(candidates)
        return [first, second, *candidates]

    def _draw(self, candidates: Sequence[int]) -> int:
        weights = self._weights
        point = self._rng.random() * sum(weights[index] for index in candidates)
        for index in candidates:
            point -= weights[index]
            if point < 0:
                return index
        return candidates[-1]  # only reachable through floating-point rounding


_UNIT = 1 << 53  # random() resolution: 53-bit integers map exactly onto floats


class SourceHash:
    """``source_hash``: weighted rendezvous (highest random weight) hashing.

    Why rendezvous rather than a hash modulo N or a ring: each upstream's score for a
    client depends only on the pair (upstream name, client address), so adding or
    removing one of N upstreams moves only about 1/N of the clients, an upstream going
    down moves only its own clients, and hashing names rather than indexes means
    reordering the config moves nobody. The score -weight / ln(u), with u uniform in
    (0, 1), makes an upstream win in proportion to its weight. The descending order of
    scores is also the natural failover order: a client whose upstream is down goes to
    where it would have gone had that upstream never existed.

    The hash is BLAKE2b, never Python's `hash()`, which is salted per process: every
    worker and every restart must agree.

    Clients without an address (`client_key` None, on unix-socket listeners) have
    nothing to be sticky on; rather than hashing "" and sending them all to a single
    upstream, they are spread by smooth weighted round-robin.
    """

    def __init__(self, names: Sequence[str], weights: Sequence[int]) -> None:
        self._weights = _check_weights(weights)
        if len(names) != len(self._weights):
            raise ValueError(f"{len(names)} names for {len(self._weights)} weights")
        # The same upstream listed twice still gets its own share: later copies hash
        # under a numbered label rather than tying with the first copy forever.
        seen: dict[str, int] = {}
        self._hashers: list[hashlib.blake2b] = []
        for name in names:
            copy = seen.get(name, 0)
            seen[name] = copy + 1
            label = name if copy == 0 else f"{name}#{copy}"
            encoded = label.encode("utf-8", "surrogatepass")
            # Length-prefixed, so that no (name, key) pair can collide with another
            # by moving bytes across the boundary.
            hasher = hashlib.blake2b(digest_size=8)
            hasher.update(len(encoded).to_bytes(4, "big") + encoded)
            self._hashers.append(hasher)
        self._fallback = RoundRobin(self._weights)

    def score(self, index: int, client_key: str) -> float:
        """Upstream `index`'s score for `client_key`; the highest up score wins."""
        hasher = self._hashers[index].copy()
        hasher.update(client_key.encode("utf-8", "surrogatepass"))
        draw = int.from_bytes(hasher.digest(), "big") >> 11  # 53 bits
        unit = (draw + 0.5) / _UNIT  # strictly inside (0, 1), so ln(unit) < 0
        return -self._weights[index] / math.log(unit)

    def attempt_order(
        self, client_key: str | None, up: Sequence[bool], active: Sequence[int]
    ) -> list[int]:
        count = len(self._weights)
        _check_call(count, up, active)
        if not any(up):
            return []
        if client_key is None:
            return self._fallback.order_up(up)
        scored = [(self.score(index, client_key), index) for index in range(count) if up[index]]
        scored.sort(key=lambda pair: (-pair[0], pair[1]))
        return [index for _, index in scored]


def make_strategy(
    name: str,
    names: Sequence[str],
    weights: Sequence[int],
    rng: random.Random | None = None,
) -> Strategy:
    """The strategy called `name` (one of `STRATEGIES`) for upstreams `names`/`weights`.

    `names` are stable identities such as "10.0.0.2:8000" (only ``source_hash`` uses
    them); `weights` are positive integers, one per name. `rng` drives ``random`` and
    defaults to a fresh `random.Random()`. Raises ValueError on anything else.
    """
    checked = _check_weights(weights)
    if len(names) != len(checked):
        raise ValueError(f"{len(names)} upstream names for {len(checked)} weights")
    if name == "round_robin":
        return RoundRobin(checked)
    if name == "least_connections":
        return LeastConnections(checked)
    if name == "random":
        return PowerOfTwoChoices(checked, rng)
    if name == "source_hash":
        return SourceHash(names, checked)
    raise ValueError(f"unknown balance strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
