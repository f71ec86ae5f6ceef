"""Rate-limiting repeated log lines: at most one per key per interval, the rest counted.

An upstream that refuses every connect fails once per client; a line for each would
bury every other line in the log. The first event of a key passes; events of that key
during the next `interval` seconds are held back and counted; the first one after it
passes again and reports how many were held back since the last one that passed.
Counts still held when no later event comes are never reported (the metrics count every
event anyway).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# Keys kept before the expired ones are forgotten: far more than a relay's upstreams.
MAX_KEYS = 4096


class _Window:
    __slots__ = ("ends", "held_back")

    def __init__(self, ends: float) -> None:
        self.ends = ends
        self.held_back = 0


class RateLimit(Generic[K]):
    """At most one event per key per `interval` seconds of `clock` passes."""

    __slots__ = ("_clock", "_interval", "_keys", "_max_keys")

    def __init__(
        self,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._keys: dict[K, _Window] = {}

    def admit(self, key: K) -> int | None:
        """None: hold this event back. Otherwise let it pass: the number of events of
        `key` held back since the last one that passed."""
        now = self._clock()
        window = self._keys.get(key)
        if window is None:
            if len(self._keys) >= self._max_keys:
                self._forget_expired(now)
            self._keys[key] = _Window(now + self._interval)
            return 0
        if now < window.ends:
            window.held_back += 1
            return None
        held_back = window.held_back
        window.ends = now + self._interval
        window.held_back = 0
        return held_back

    def _forget_expired(self, now: float) -> None:
        """Bound the memory when keys come and go (upstreams replaced by reloads)."""
        self._keys = {key: window for key, window in self._keys.items() if now < window.ends}

    def __len__(self) -> int:
        return len(self._keys)
