"""The relay's open connections: registered when accepted, counted and closed when done.

Every connection, whatever phase it is in (reading a PROXY header, connecting, relaying),
is in one table from accept() to its end, so that the fd estimate, the idle sweep and
the drain all see it. `finish` is the one way out: it counts the outcome, closes the
sockets and gives back what the connection held (its slots and its per-source count).
"""

from __future__ import annotations

import _socket
import itertools
from collections.abc import Callable

import trio

from splicerelay.datapath.session import Session
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.connector import Connector
from splicerelay.relay.routes import Endpoint, RouteRuntime, endpoint_of, format_endpoint

AccessLogger = Callable[[RouteRuntime, Session, Outcome], None]


class SessionTable:
    """Open connections, each with the route runtime it came in on.

    `connecting` holds the connection attempts in progress, for the connect timer.
    Each connection gets the next number of a per-process counter as its id (from 1,
    never reused), which the control socket shows and `kill connection` takes.
    """

    def __init__(self, access: AccessLogger | None = None) -> None:
        self.sessions: dict[Session, RouteRuntime] = {}
        self._ids = itertools.count(1)
        self.connecting: set[Connector] = set()
        self._access = access
        self._all_done = trio.Event()

    def __len__(self) -> int:
        return len(self.sessions)

    def open(
        self,
        runtime: RouteRuntime,
        client: _socket.socket,
        peer: object,
        family: int,
        global_slot: trio.Semaphore | None,
    ) -> tuple[Session, Endpoint | None]:
        """Register a client just accepted; (its session, its address for the rules).

        The caller holds one of `runtime.slots` and, with a global limit, `global_slot`:
        both are given back in `finish`.
        """
        endpoint = endpoint_of(family, peer)
        session = Session(client, format_endpoint(endpoint), next(self._ids))
        self.sessions[session] = runtime
        runtime.stats.active += 1
        session.owner = runtime
        session.global_slot = global_slot
        return session, endpoint

    def move(self, session: Session, target: RouteRuntime) -> None:
        """Hand an open connection to `target`, which will finish it: a TLS-routing
        listener's acceptor gives a connection to the route its hello chose.

        The caller holds one of `target.slots` for it; the slot it held on its way in is
        given back here. It has no per-source count yet (taken once a route has it)."""
        runtime = session.owner
        assert isinstance(runtime, RouteRuntime) and session.source_key is None
        runtime.stats.active -= 1
        runtime.slots.release()
        self.sessions[session] = target
        session.owner = target
        target.stats.active += 1

    def finish(self, session: Session, outcome: Outcome) -> None:
        """Count, close and forget a connection, once: a later call is a no-op."""
        if session not in self.sessions:
            return  # only on a path where a bug was already logged
        runtime = session.owner
        assert isinstance(runtime, RouteRuntime)
        # Counted before the sockets close: whoever sees the connection end can
        # already see how it ended on /metrics.
        if session.upstream_stats is not None:
            session.upstream_stats.active -= 1
        stats = runtime.stats
        stats.active -= 1
        stats.outcomes[outcome.value] += 1
        stats.duration_seconds.observe(trio.current_time() - session.started)
        session.close(outcome)
        del self.sessions[session]
        source_key = session.source_key
        if source_key is not None:
            counts = runtime.per_source
            remaining = counts[source_key] - 1
            if remaining:
                counts[source_key] = remaining
            else:
                del counts[source_key]
        runtime.slots.release()
        if session.global_slot is not None:
            session.global_slot.release()
        if not self.sessions:
            self._all_done.set()
        if self._access is not None:
            self._access(runtime, session, outcome)

    def find(self, session_id: int) -> Session | None:
        """The open connection with this id, if any (a scan: for the control socket)."""
        for session in self.sessions:
            if session.id == session_id:
                return session
        return None

    def stop_all(self, outcome: Outcome) -> None:
        """Cut every open connection now."""
        for session in list(self.sessions):
            session.stop(outcome)

    async def wait_all_done(self) -> None:
        while self.sessions:
            self._all_done = trio.Event()
            await self._all_done.wait()
