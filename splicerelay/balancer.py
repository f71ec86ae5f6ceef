"""Choosing an upstream: smooth weighted round-robin (pure, no sockets).

This is nginx's smooth weighted round-robin: every pick adds each upstream's weight to
its running score, takes the highest score, and subtracts the total weight from it.
Weights 2:1:1 give a, b, a, c, ... and exactly 20/10/10 picks over 40 connections,
interleaved rather than in bursts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class SmoothRoundRobin:
    """Picks indexes into a list of upstreams in proportion to their weights."""

    def __init__(self, weights: Sequence[int]) -> None:
        if not weights or any(weight <= 0 for weight in weights):
            raise ValueError("weights must be a non-empty list of positive integers")
        self._weights = tuple(weights)
        self._scores = [0] * len(weights)
        self._total = sum(weights)

    def pick(self) -> int:
        best = 0
        scores = self._scores
        for index, weight in enumerate(self._weights):
            scores[index] += weight
            if scores[index] > scores[best]:
                best = index
        scores[best] -= self._total
        return best

    def attempt_order(self) -> Iterator[int]:
        """The pick for a new connection, then every other upstream once, for failover.

        Failover walks the list from the pick onwards, so that one refused upstream
        does not send its share of connections all to the same neighbour twice over.
        """
        first = self.pick()
        count = len(self._weights)
        for offset in range(count):
            yield (first + offset) % count
