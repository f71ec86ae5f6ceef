"""Plain counters that the data path increments and the metrics collector reads.

Nothing here imports Prometheus: incrementing an attribute of a slotted object is the
cheapest thing Python can do per chunk, and the collector turns these into metric
families only when it is scraped.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class ByteCounter:
    """Bytes moved in one direction of one route, split by how they moved."""

    __slots__ = ("copy", "splice")

    def __init__(self) -> None:
        self.splice = 0
        self.copy = 0


# Upper bounds in seconds. Connects on a LAN take well under a millisecond; a connect
# timeout of seconds needs the high end.
CONNECT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Connections last from milliseconds (a request) to days (a tunnel).
DURATION_BUCKETS = (0.005, 0.05, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0)


class Histogram:
    """A Prometheus-style histogram as plain integers: per-bucket counts and a sum.

    `observe` is called once per connection or connect, never per chunk.
    """

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * len(bounds)  # not cumulative; the collector adds them up
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.buckets[index] += 1
                break
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs, ending with +Inf."""
        pairs = []
        running = 0
        for bound, count in zip(self.bounds, list(self.buckets), strict=True):
            running += count
            pairs.append((bound, running))
        # Why max(): the scrape runs in another thread and may land between a bucket's
        # increment and the count's; buckets must never exceed +Inf.
        pairs.append((float("inf"), max(running, self.count)))
        return pairs


@dataclass(eq=False)
class UpstreamStats:
    """Counters for one upstream of one route."""

    label: str
    up: bool = True
    active: int = 0
    # What the operator set (relay/admin.py): "ready", "drain" or "maint", and the
    # weight the balancer uses.
    admin_state: str = "ready"
    weight: int = 1
    connect_seconds: Histogram = field(default_factory=lambda: Histogram(CONNECT_BUCKETS))


@dataclass(eq=False)
class RouteStats:
    """Counters for one route; the route's sessions share one instance."""

    name: str
    client_to_upstream: ByteCounter = field(default_factory=ByteCounter)
    upstream_to_client: ByteCounter = field(default_factory=ByteCounter)
    active: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    # Outcome tls_inspect_failed, by reason (protocol/outcome.py's InspectFailure); only
    # a TLS-routing listener's own counters have them (`inspects_tls`).
    inspect_failures: Counter[str] = field(default_factory=Counter)
    inspects_tls: bool = False
    # (upstream label, reason) -> count
    connect_errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    upstreams: dict[str, UpstreamStats] = field(default_factory=dict)
    duration_seconds: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    # Seconds the accept loop spent waiting for a free slot under max_connections.
    limited_seconds: float = 0.0

    def upstream(self, label: str) -> UpstreamStats:
        stats = self.upstreams.get(label)
        if stats is None:
            stats = self.upstreams[label] = UpstreamStats(label)
        return stats


@dataclass(eq=False)
class PipeStats:
    """State of the kernel pipes that carry the spliced bytes.

    Why the gauges are derived: a pipe is lent and given back several times per
    connection, so the pool keeps only its idle stacks and counts opens and closes;
    `idle` and `in_use` are worked out when someone looks.
    """

    created: int = 0
    closed: int = 0
    resize_failures: int = 0  # F_SETPIPE_SZ refused: the pipe kept a smaller size
    # The pool's stacks of empty pipes, by requested size (shared with PipePool).
    idle_stacks: dict[int, list[Any]] = field(default_factory=dict)

    @property
    def open(self) -> int:
        return self.created - self.closed

    @property
    def idle(self) -> int:
        """Pooled, empty, ready for the next burst."""
        return sum(len(stack) for stack in self.idle_stacks.values())

    @property
    def in_use(self) -> int:
        """Lent to a flow that has (or is about to have) bytes in it."""
        return self.open - self.idle


@dataclass(eq=False)
class ReloadRecord:
    """Config reloads: how many by result, and how the last one went and when.

    Before any reload, the last one "succeeded" at the start: the config running then is
    one that loaded.
    """

    counts: Counter[str] = field(default_factory=Counter)  # "success" / "failure" -> count
    last_successful: bool = True
    last_time: float = field(default_factory=time.time)  # unix time

    def record(self, result: str, now: float | None = None) -> None:
        """Count a reload that ended with `result` ("success" or "failure")."""
        self.counts[result] += 1
        self.last_successful = result == "success"
        self.last_time = time.time() if now is None else now


@dataclass(eq=False)
class RelayStats:
    """Everything the relay counts; one instance per process."""

    routes: dict[str, RouteStats] = field(default_factory=dict)
    pipes: PipeStats = field(default_factory=PipeStats)
    # Seconds accepting waited for the global max_connections.
    global_limited_seconds: float = 0.0
    reloads: ReloadRecord = field(default_factory=ReloadRecord)

    def route(self, name: str) -> RouteStats:
        """The counters of route `name`, created on first use and kept across reloads."""
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats(name)
        return stats

    @property
    def config_reloads(self) -> Counter[str]:
        """Reloads by result: "success" / "failure" -> count (see `reloads`)."""
        return self.reloads.counts
