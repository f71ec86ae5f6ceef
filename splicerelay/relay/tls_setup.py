"""Setting up a connection on a listener that routes by TLS ClientHello.

The acceptor (tls_routing.py) took the connection. In one task: read the PROXY header if
the listener accepts them (the peer was checked against proxy_protocol_trusted on
arrival), peek at the ClientHello (tls_peek.py), choose the route, wait for one of its
connection slots, and hand the connection to it. From there it is set up as on any
route: the peer and the client the header names are checked against the chosen route's
allow/deny as its `allow_applies_to` says, its per-source limit applies, and it connects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from splicerelay.datapath.session import Session
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.proxy_header import ProxyHeaderRejected, receive_proxy_header
from splicerelay.relay.routes import Endpoint, RouteRuntime, format_endpoint, passes_rules
from splicerelay.relay.sessions import SessionTable
from splicerelay.relay.tls_peek import InspectFailed, peek_at_once, peek_client_hello

log = logging.getLogger("splicerelay")

# (route, session, source, destination, check_rules): ConnectionSetup._set_up
SetUp = Callable[[RouteRuntime, Session, Endpoint | None, Endpoint | None, bool], None]


def route_at_once(
    table: SessionTable,
    acceptor: RouteRuntime,
    session: Session,
    peer: Endpoint | None,
    set_up: SetUp,
) -> bool:
    """Route `session` now, without a task, when its whole ClientHello is in already
    and its route has a free slot (the common case: a client sends its hello with the
    handshake's last ACK, often before the relay accepts). True when it was routed or
    finished here; False when it must wait in inspect_and_route."""
    listener = acceptor.route
    routing = acceptor.tls
    assert routing is not None
    if listener.accept_proxy_protocol:
        return False  # the header comes first, read in the task
    try:
        hello = peek_at_once(session.client, listener.tls_max_client_hello)
    except InspectFailed as failure:
        _inspect_failed(table, acceptor, session, failure)
        return True
    except OSError:
        table.finish(session, Outcome.CLIENT_RESET)
        return True
    if hello is None:
        return False
    session.sni = hello.server_name
    session.alpn = hello.alpn
    chosen = routing.choose(hello.server_name, hello.alpn)
    if chosen is None:
        table.finish(session, Outcome.NO_ROUTE)
        return True
    try:
        chosen.slots.acquire_nowait()
    except trio.WouldBlock:
        return False  # the task waits for a slot (and looks at the hello again)
    table.move(session, chosen)
    hand_over(table, chosen, session, peer, peer, None, set_up)
    return True


async def inspect_and_route(
    table: SessionTable,
    acceptor: RouteRuntime,
    session: Session,
    peer: Endpoint | None,
    set_up: SetUp,
) -> None:
    """Route `session` by its ClientHello, or finish it with the outcome that says why."""
    listener = acceptor.route
    routing = acceptor.tls
    assert routing is not None and session.cancel_scope is not None
    source, destination = peer, None
    target: RouteRuntime | None = None
    outcome: Outcome | None = None
    try:
        with session.cancel_scope:
            # Why a checkpoint first: a stop() that came before this task ran must end it.
            await trio.lowlevel.checkpoint()
            if listener.accept_proxy_protocol:
                header = await receive_proxy_header(
                    session.client,
                    listener.proxy_protocol_timeout,
                    listener.proxy_protocol_max_header,
                )
                if not header.local and header.source is not None:
                    source, destination = header.source, header.destination
                    session.client_address = format_endpoint(source)
            hello = await peek_client_hello(
                session.client, listener.tls_inspect_timeout, listener.tls_max_client_hello
            )
            session.sni = hello.server_name
            session.alpn = hello.alpn
            chosen = routing.choose(hello.server_name, hello.alpn)
            if chosen is None:
                outcome = Outcome.NO_ROUTE
            else:
                deadline = session.started + listener.tls_inspect_timeout
                if await wait_for_slot(chosen, deadline):
                    # No checkpoint from here to the move: the slot is the chosen route's.
                    table.move(session, chosen)
                    target = chosen
                else:
                    outcome = Outcome.ROUTE_LIMIT
    except ProxyHeaderRejected as error:
        _log_refused("bad PROXY header", listener.name, session, str(error))
        outcome = Outcome.BAD_PROXY_HEADER
    except InspectFailed as failure:
        _inspect_failed(table, acceptor, session, failure)
        return
    except OSError:
        outcome = Outcome.CLIENT_RESET  # reset (or failed) while we waited for it
    except Exception:
        # A bug, not a peer's doing: log it loudly but keep serving everyone else.
        log.exception("session failed unexpectedly")
        outcome = Outcome.INTERNAL_ERROR
    if outcome is None and (target is None or session.closing_outcome is not None):
        outcome = session.closing_outcome or Outcome.SHUTDOWN  # stopped from outside
    if outcome is not None:
        table.finish(session, outcome)
        return
    assert target is not None
    session.cancel_scope = None
    try:
        hand_over(table, target, session, peer, source, destination, set_up)
    except Exception:
        log.exception("session failed unexpectedly")
        table.finish(session, Outcome.INTERNAL_ERROR)


async def wait_for_slot(runtime: RouteRuntime, deadline: float) -> bool:
    """One of the route's slots, waiting until `deadline` (trio's clock) at most; False
    when none freed by then.

    Why bounded: the waiting connection holds one of its listener's acceptor slots, and
    enough of them waiting for one full route would stop the listener accepting for its
    other routes too. The time at least one connection waits is the route's time at its
    limit, counted once however many wait (limit_wait_seconds)."""
    slots = runtime.slots
    try:
        slots.acquire_nowait()
        return True
    except trio.WouldBlock:
        pass
    if not runtime.slot_waiters:
        runtime.slot_wait_started = trio.current_time()
    runtime.slot_waiters += 1
    try:
        with trio.move_on_at(deadline):
            await slots.acquire()
            return True
        return False
    finally:
        runtime.slot_waiters -= 1
        if not runtime.slot_waiters:
            runtime.stats.limited_seconds += trio.current_time() - runtime.slot_wait_started


def hand_over(
    table: SessionTable,
    target: RouteRuntime,
    session: Session,
    peer: Endpoint | None,
    source: Endpoint | None,
    destination: Endpoint | None,
    set_up: SetUp,
) -> None:
    """`session` is `target`'s now: set it up under the route's rules."""
    route = target.route
    check_rules = True
    if route.accept_proxy_protocol:
        # As on a route of its own (connection_setup.py), but only now that the route
        # is known: the peer is checked unless only the claimed address counts, and the
        # claimed address unless only the peer counts.
        if route.allow_applies_to != "proxy" and not passes_rules(route, peer):
            table.finish(session, Outcome.DENIED)
            return
        check_rules = route.allow_applies_to != "peer"
    set_up(target, session, source, destination, check_rules)


def _inspect_failed(
    table: SessionTable, acceptor: RouteRuntime, session: Session, failure: InspectFailed
) -> None:
    # At debug: clients choose to fail (scanners, TCP health probes that connect and
    # close), and the access line and connections_total say so with the reason.
    _log_refused(
        "no valid TLS ClientHello", acceptor.route.name, session, str(failure), logging.DEBUG
    )
    acceptor.stats.inspect_failures[failure.reason.value] += 1
    session.tls_error = failure.reason.value  # (for the access line)
    table.finish(session, Outcome.TLS_INSPECT_FAILED)


def _log_refused(
    message: str, listener: str, session: Session, error: str, level: int = logging.INFO
) -> None:
    log.log(
        level,
        message,
        extra={"fields": {"listener": listener, "client": session.client_address, "error": error}},
    )
