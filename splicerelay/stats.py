"""Plain counters that the data path increments and the metrics collector reads.

Nothing here imports Prometheus: incrementing an attribute of a slotted object is the
cheapest thing Python can do per chunk, and the collector turns these into metric
families only when it is scraped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class ByteCounter:
    """Bytes moved in one direction of one route, split by how they moved."""

    __slots__ = ("copy", "splice")

    def __init__(self) -> None:
        self.splice = 0
        self.copy = 0


@dataclass(eq=False)
class RouteStats:
    """Counters for one route; the route's sessions share one instance."""

    name: str
    client_to_upstream: ByteCounter = field(default_factory=ByteCounter)
    upstream_to_client: ByteCounter = field(default_factory=ByteCounter)
    active: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    # (upstream label, reason) -> count
    connect_errors: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass(eq=False)
class PipeStats:
    """State of the kernel pipes that carry the spliced bytes."""

    idle: int = 0  # pooled, empty, ready for the next burst
    in_use: int = 0  # lent to a pump that has (or is about to have) bytes in it
    created: int = 0
    resize_failures: int = 0  # F_SETPIPE_SZ refused: the pipe kept a smaller size


@dataclass(eq=False)
class RelayStats:
    """Everything the relay counts; one instance per process."""

    routes: dict[str, RouteStats] = field(default_factory=dict)
    pipes: PipeStats = field(default_factory=PipeStats)

    def route(self, name: str) -> RouteStats:
        """The counters of route `name`, created on first use and kept across reloads."""
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats(name)
        return stats
