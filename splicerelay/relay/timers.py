"""The relay's timers: connect timeouts, idle timeouts and max duration, on coarse sweeps.

Why sweeps: a timer per connection (or per I/O call) costs a cancel scope and a deadline
in trio's heap for every connection; a sweep costs one task for all of them, and fires
within a small fraction of the timeout it enforces. Time is trio's clock, so tests can
drive it with `trio.testing.MockClock`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import trio

from splicerelay.datapath.session import Session
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.connector import Connector
from splicerelay.relay.routes import RouteRuntime

Runtimes = Callable[[], Sequence[RouteRuntime]]  # the routes of the config in force


def connect_check_interval(runtimes: Sequence[RouteRuntime]) -> float:
    """A twentieth of the shortest connect timeout, between 10 ms and 250 ms."""
    timeouts = [runtime.route.connect_timeout for runtime in runtimes]
    return min(max(min(timeouts, default=1.0) / 20, 0.01), 0.25)


def sweep_interval(runtimes: Sequence[RouteRuntime]) -> float:
    """A tenth of the shortest idle timeout or max duration, between 50 ms and 1 s."""
    timeouts = [runtime.route.idle_timeout for runtime in runtimes]
    timeouts += [runtime.route.max_duration for runtime in runtimes if runtime.route.max_duration]
    return min(max(min(timeouts, default=1.0) / 10, 0.05), 1.0)


async def expire_connects(connecting: Collection[Connector], runtimes: Runtimes) -> None:
    """Connect timeouts, for every connection attempt, on one coarse timer."""
    while True:
        await trio.sleep(connect_check_interval(runtimes()))
        if connecting:
            now = trio.current_time()
            for connector in list(connecting):
                connector.expire(now)


def sweep_sessions(sessions: Mapping[Session, RouteRuntime], now: float) -> None:
    """Stop the sessions past their max_duration or idle for their idle_timeout.

    A session is idle when its byte count has not moved since it was last seen to; the
    timeout therefore fires between idle_timeout and idle_timeout + the sweep interval.
    Each session keeps the route options it started with, also across reloads.
    """
    for session, runtime in list(sessions.items()):
        max_duration = runtime.route.max_duration
        if max_duration and now - session.started >= max_duration:
            session.stop(Outcome.MAX_DURATION)
        elif session.activity != session.seen_activity:
            session.seen_activity = session.activity
            session.idle_since = now
        elif now - session.idle_since >= runtime.route.idle_timeout:
            session.stop(Outcome.IDLE_TIMEOUT)


async def sweep_idle(sessions: Mapping[Session, RouteRuntime], runtimes: Runtimes) -> None:
    """One coarse timer for all sessions instead of one timer per I/O call."""
    while True:
        await trio.sleep(sweep_interval(runtimes()))
        sweep_sessions(sessions, trio.current_time())
