"""Connection setup: from an accepted client to a session the reactor relays.

In order: on a route that accepts PROXY headers, refuse a peer outside
`proxy_protocol_trusted` and check the peer against allow/deny (unless
`allow_applies_to: proxy`), both before reading a byte, then read the header (the only
step that takes a task); check the client against the route's allow/deny rules (the
address the header names, unless `allow_applies_to: peer`) and per-source limit, pick
the upstreams to try, connect through a `Connector` on the shared reactor, send a PROXY
header upstream if asked, and hand both sockets to the session.

On a listener that routes by TLS ClientHello, the listener's acceptor took the
connection, and one task reads the header, peeks at the hello and hands the connection
to the route it chooses (tls_setup.py) before the steps above.

Why the peer is checked before the header: the header is the peer's own claim, so the
only thing known for sure is who sent it (as with HAProxy's `expect-proxy layer4 if
{ src -f trusted }` and nginx's `set_real_ip_from`). A peer that may not send one is
closed at once, with nothing read, and counted as `proxy_untrusted`.

A peer's doing ends a connection with the outcome that names it; an exception that
escapes a step is the relay's own bug, logged with its traceback and counted as
`internal_error`, and the relay carries on serving everyone else.
"""

from __future__ import annotations

import _socket
import logging
from collections.abc import Awaitable, Callable

import trio

from splicerelay.datapath.flow import PipePool
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import Session, prepare_accepted
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.connector import Connector
from splicerelay.relay.proxy_header import (
    ProxyHeaderRejected,
    build_proxy_header,
    receive_proxy_header,
)
from splicerelay.relay.routes import (
    Endpoint,
    RouteRuntime,
    endpoint_of,
    format_endpoint,
    is_trusted,
    passes_rules,
)
from splicerelay.relay.sessions import SessionTable
from splicerelay.relay.tls_setup import inspect_and_route, route_at_once
from splicerelay.relay.upstreams import UpstreamRuntime

log = logging.getLogger("splicerelay")


class ConnectionSetup:
    """Sets up each accepted connection, and registers it in `table` until it ends."""

    def __init__(
        self, table: SessionTable, reactor: Reactor, pool: PipePool, *, use_splice: bool
    ) -> None:
        self.table = table
        self.reactor = reactor
        self.pool = pool
        self.use_splice = use_splice
        # Where PROXY-header reads run; set by the relay while it serves.
        self.nursery: trio.Nursery | None = None

    def accepted(
        self,
        runtime: RouteRuntime,
        client: _socket.socket,
        peer: object,
        family: int,
        global_slot: trio.Semaphore | None,
    ) -> None:
        """A client was just accepted (holding a route slot, and `global_slot`)."""
        # Registered now, not when its task first runs: a burst of accepts must see
        # the sessions it has already taken (for the fd estimate and for drain).
        session, endpoint = self.table.open(runtime, client, peer, family, global_slot)
        self.start(runtime, session, endpoint)

    def start(self, runtime: RouteRuntime, session: Session, endpoint: Endpoint | None) -> None:
        """Set a new connection up; only reading a PROXY header takes a task."""
        try:
            prepare_accepted(session.client)
        except OSError:
            self.table.finish(session, Outcome.CLIENT_RESET)  # gone before we could look
            return
        route = runtime.route
        if route.accept_proxy_protocol and not is_trusted(route, endpoint):
            self.table.finish(session, Outcome.PROXY_UNTRUSTED)
            return
        if runtime.tls is not None:
            # A listener that routes by ClientHello: the route's rules apply once the
            # hello has chosen it (tls_setup.py).
            session.alpn = ()  # (its access lines carry the hello's fields)
            try:
                if route_at_once(self.table, runtime, session, endpoint, self._set_up):
                    return
            except Exception:
                # A bug, not a peer's doing: the accept loop that called must go on.
                log.exception("session failed unexpectedly")
                self.table.finish(session, Outcome.INTERNAL_ERROR)
                return
            self._start_task(
                session, inspect_and_route, self.table, runtime, session, endpoint, self._set_up
            )
            return
        if route.accept_proxy_protocol:
            if route.allow_applies_to != "proxy" and not passes_rules(route, endpoint):
                self.table.finish(session, Outcome.DENIED)
                return
            self._start_task(session, self._read_proxy_header, runtime, session, endpoint)
            return
        self._set_up(runtime, session, endpoint, None, check_rules=True)

    def _start_task(
        self, session: Session, task: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        """Run `task` for `session`, which waits on its client socket first."""
        assert self.nursery is not None
        session.tracked = True  # trio waits on the client socket
        session.cancel_scope = trio.CancelScope()
        self.nursery.start_soon(task, *args)

    async def _read_proxy_header(
        self, runtime: RouteRuntime, session: Session, source: Endpoint | None
    ) -> None:
        route = runtime.route
        outcome: Outcome | None = None
        header = None
        try:
            assert session.cancel_scope is not None
            with session.cancel_scope:
                # Why a checkpoint first: a header already buffered is read without one,
                # and a stop() that came before this task ran must still end it.
                await trio.lowlevel.checkpoint()
                header = await receive_proxy_header(
                    session.client, route.proxy_protocol_timeout, route.proxy_protocol_max_header
                )
            if header is None:
                outcome = session.closing_outcome or Outcome.SHUTDOWN
        except ProxyHeaderRejected as error:
            log.info(
                "bad PROXY header",
                extra={
                    "fields": {
                        "route": route.name,
                        "client": session.client_address,
                        "error": str(error),
                    }
                },
            )
            outcome = Outcome.BAD_PROXY_HEADER
        except Exception:
            # A bug, not a peer's doing: log it loudly but keep serving everyone else.
            log.exception("session failed unexpectedly")
            outcome = Outcome.INTERNAL_ERROR
        if outcome is not None or header is None:
            self.table.finish(session, outcome or Outcome.SHUTDOWN)
            return
        session.cancel_scope = None
        destination: Endpoint | None = None
        if not header.local and header.source is not None:
            # From here on, the client is the one the trusted proxy in front named.
            source, destination = header.source, header.destination
            session.client_address = format_endpoint(source)
        # "peer": the peer has passed already, and the claim is not checked. Otherwise the
        # claimed address is (a LOCAL header claims none: the peer is the client then).
        check_rules = route.allow_applies_to != "peer"
        self._set_up(runtime, session, source, destination, check_rules=check_rules)

    def _set_up(
        self,
        runtime: RouteRuntime,
        session: Session,
        source: Endpoint | None,
        destination: Endpoint | None,
        check_rules: bool,
    ) -> None:
        """Check the client against the route's rules, then start connecting.

        `check_rules`: whether `source` must pass allow/deny here (it need not when
        only the peer's address counts, and the peer was checked on arrival).
        """
        try:
            outcome = self._admit_and_connect(runtime, session, source, destination, check_rules)
        except Exception:
            log.exception("session failed unexpectedly")
            outcome = Outcome.INTERNAL_ERROR
        if outcome is not None:
            self.table.finish(session, outcome)

    def _admit_and_connect(
        self,
        runtime: RouteRuntime,
        session: Session,
        source: Endpoint | None,
        destination: Endpoint | None,
        check_rules: bool,
    ) -> Outcome | None:
        """An outcome when the client is turned away; None once connecting has begun."""
        route = runtime.route
        if check_rules and not passes_rules(route, source):
            return Outcome.DENIED
        limit = route.max_connections_per_source
        if limit is not None and source is not None:
            counts = runtime.per_source
            held = counts.get(source[0], 0)
            if held >= limit:
                return Outcome.SOURCE_LIMIT
            counts[source[0]] = held + 1
            session.source_key = source[0]  # given back in SessionTable.finish
        order = runtime.attempt_order(source[0] if source else None)
        if not order:
            return Outcome.NO_UPSTREAM
        table = self.table

        def connected(sock: _socket.socket | None, upstream: UpstreamRuntime | None) -> None:
            table.connecting.discard(connector)
            session.on_stop = None  # the closure below refers to the session: no cycle
            if sock is None or upstream is None:
                session.upstream_label = connector.tried_label  # for the access log
                failed = Outcome.INTERNAL_ERROR if connector.broke else Outcome.CONNECT_FAILED
                table.finish(session, failed)
                return
            upstream.stats.active += 1
            session.upstream_stats = upstream.stats
            session.upstream_label = upstream.target.label
            session.upstream = sock
            try:
                self._relay(runtime, session, sock, connector.interest, source, destination)
            except Exception:
                # A bug, not a peer's doing. The connector has already reported, so the
                # reactor's own safety net cannot end this session: end it here.
                log.exception("session failed unexpectedly")
                self.reactor.discard((session.client.fileno(), sock.fileno()), session)
                table.finish(session, Outcome.INTERNAL_ERROR)

        connector = Connector(
            runtime.upstreams,
            order,
            route.connect_timeout,
            route.health_check is not None,
            runtime.stats.connect_errors,
            self.reactor,
            route.name,
            connected,
        )

        def stop(outcome: Outcome) -> None:
            connector.abort()
            session.upstream_label = connector.tried_label  # for the access log
            table.connecting.discard(connector)
            session.on_stop = None
            table.finish(session, outcome)

        session.on_stop = stop
        table.connecting.add(connector)
        connector.start(trio.current_time())
        return None

    def _relay(
        self,
        runtime: RouteRuntime,
        session: Session,
        upstream: _socket.socket,
        upstream_interest: int,
        source: Endpoint | None,
        destination: Endpoint | None,
    ) -> None:
        """The upstream accepted: send a PROXY header if asked, then relay.

        `upstream_interest`: what the connector left the upstream registered for.
        """
        route = runtime.route
        if route.proxy_protocol != "none":
            if destination is None:
                # Asked only now: most routes never need the address clients reached.
                destination = endpoint_of(session.client.family, session.client.getsockname())
            header = build_proxy_header(route.proxy_protocol, source, destination)
            try:
                # Why one send is enough: the socket has just connected, so its send
                # buffer (at least a few KiB) is empty, and a header is at most a few
                # hundred bytes.
                sent = upstream.send(header)
            except OSError:
                sent = -1
            if sent != len(header):
                # The upstream's doing (it reset or closed at once): a peer failure.
                if upstream_interest:
                    self.reactor.forget_fd(upstream.fileno())  # the connector's registration
                self.table.finish(session, Outcome.UPSTREAM_RESET)
                return
        session.adopt(
            upstream,
            self.reactor,
            self.pool,
            route.pipe_size,
            runtime.stats,
            self.use_splice,
            self.table.finish,
            upstream_interest=upstream_interest,
        )
