"""Connecting a session to an upstream without a task: non-blocking connects in the reactor.

A connection attempt is a `connect()` that returns EINPROGRESS; the socket becomes
writable when the handshake has ended, and SO_ERROR says how. Waiting for that in the
shared epoll rather than in a trio task saves a task, a cancel scope and trio's own
epoll registration for every new connection, which is most of what a short-lived
connection costs. Failover follows the strategy's order, as before; the connect timeout
is checked by the relay's timer (`expire_connects` in relay/timers.py), not per attempt.

Every failed attempt is counted in the metrics; it is logged as a warning naming the
route, the upstream and the reason, at most once per upstream every
CONNECT_WARNING_INTERVAL seconds (the next line says how many were held back meanwhile;
at debug level every one is logged).
"""

from __future__ import annotations

import _socket
import logging
import select
import socket
from collections import Counter
from collections.abc import Callable, Sequence

import trio

from splicerelay.datapath.flow import close_socket
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import ConnectError, connect_error_reason, start_connect
from splicerelay.ops.ratelimit import RateLimit
from splicerelay.relay.upstreams import UpstreamRuntime

log = logging.getLogger("splicerelay")

CONNECT_INTEREST = select.EPOLLOUT

CONNECT_WARNING_INTERVAL = 10.0  # seconds
# Per process, keyed by (route, upstream): a worker's lines carry its slot.
connect_warnings: RateLimit[tuple[str, str]] = RateLimit(CONNECT_WARNING_INTERVAL)


Connected = Callable[[_socket.socket | None, UpstreamRuntime | None], None]


def _already_done(sock: _socket.socket | None, upstream: UpstreamRuntime | None) -> None:
    """What a connector calls once it has reported: nothing."""


class Connector:
    """Tries the upstreams of `order` in turn until one accepts; then calls `done`.

    `done(sock, upstream)` gets the connected socket, still registered in the reactor
    for `interest` (the caller takes the registration over; 0 when the handshake ended
    inside connect() and it never was), or (None, None) when every attempt failed.
    """

    __slots__ = (
        "_done",
        "_errors",
        "_order",
        "_passive_health",
        "_position",
        "_reactor",
        "_timeout",
        "_upstreams",
        "broke",
        "current",
        "deadline",
        "interest",
        "route_name",
        "sock",
        "started",
        "tried",
    )

    def __init__(
        self,
        upstreams: Sequence[UpstreamRuntime],
        order: Sequence[int],
        timeout: float,
        passive_health: bool,
        errors: Counter[tuple[str, str]],
        reactor: Reactor,
        route_name: str,
        done: Connected,
    ) -> None:
        self._upstreams = upstreams
        self._order = order
        self._position = 0
        self._timeout = timeout
        self._passive_health = passive_health
        self._errors = errors
        self._reactor = reactor
        self._done = done
        self.route_name = route_name
        self.sock: _socket.socket | None = None  # the attempt in progress
        self.current: UpstreamRuntime | None = None
        # The last upstream an attempt was made to, whatever became of it.
        self.tried: UpstreamRuntime | None = None
        # What the attempt's socket is registered for in the reactor (0: not at all).
        self.interest = 0
        self.started = 0.0
        self.deadline = 0.0
        # A bug of ours ended the attempts (see fail), not the upstreams' refusals.
        self.broke = False

    def start(self, now: float) -> None:
        """Begin with the strategy's first choice (`now` on trio's clock)."""
        self._attempt_next(now)

    def _attempt_next(self, now: float) -> None:
        upstreams = self._upstreams
        while self._position < len(self._order):
            upstream = upstreams[self._order[self._position]]
            self._position += 1
            self.tried = upstream
            try:
                sock, in_progress = start_connect(upstream.target)
            except ConnectError as error:
                self._failed(upstream, error.reason)
                continue
            self.current = upstream
            self.started = now
            self.sock = sock
            if not in_progress:
                # Why this happens: a unix socket connects within connect(), and so does
                # TCP over loopback (see handshake_status). Nothing to wait for.
                self._succeeded(now)
                return
            self._reactor.set_interest(sock.fileno(), 0, CONNECT_INTEREST, self)
            self.interest = CONNECT_INTEREST
            self.deadline = now + self._timeout
            return
        self._finish(None, None)

    def _succeeded(self, now: float) -> None:
        upstream, sock = self.current, self.sock
        assert upstream is not None and sock is not None
        upstream.stats.connect_seconds.observe(now - self.started)
        if self._passive_health and upstream.health.up:
            upstream.mark(True)
        self.sock = None
        self._finish(sock, upstream)

    def _failed(self, upstream: UpstreamRuntime, reason: str) -> None:
        self._errors[(upstream.target.label, reason)] += 1
        if self._passive_health:
            # Passive health: `fall` failed connects in a row mark it down until the
            # active checks see it rise again.
            upstream.mark(False)
        label = upstream.target.label
        fields: dict[str, object] = {"route": self.route_name, "upstream": label, "reason": reason}
        held_back = connect_warnings.admit((self.route_name, label))
        if held_back is None:
            log.debug("upstream connect failed", extra={"fields": fields})
            return
        fields["suppressed"] = held_back
        log.warning("upstream connect failed", extra={"fields": fields})

    @property
    def tried_label(self) -> str:
        """The address of the last upstream tried; "" before any attempt."""
        return "" if self.tried is None else self.tried.target.label

    def _drop_attempt(self) -> None:
        sock = self.sock
        if sock is not None:
            self.sock = None
            self._reactor.set_interest(sock.fileno(), self.interest, 0, self)
            self.interest = 0
            close_socket(sock, tracked=False)

    def _finish(self, sock: _socket.socket | None, upstream: UpstreamRuntime | None) -> None:
        done = self._done
        # Why let go of the callback: it is a closure that refers to this connector, and
        # a cycle would leave both for the garbage collector instead of freeing them now.
        self._done = _already_done
        done(sock, upstream)

    # ----- reactor callbacks ----------------------------------------------------------

    def on_ready(self, fd: int, events: int) -> None:
        sock = self.sock
        assert sock is not None
        status = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        now = trio.current_time()
        if not status:
            self._succeeded(now)
            return
        upstream = self.current
        assert upstream is not None
        self._drop_attempt()
        self._failed(upstream, connect_error_reason(OSError(status, "")))
        self._attempt_next(now)

    def expire(self, now: float) -> None:
        """Give up on an attempt past its deadline and fail over to the next one."""
        if self.sock is None or now < self.deadline:
            return
        upstream = self.current
        assert upstream is not None
        self._drop_attempt()
        self._failed(upstream, "timeout")
        self._attempt_next(now)

    def abort(self) -> None:
        """Stop trying (the session is being stopped from outside)."""
        self._drop_attempt()
        self._position = len(self._order)

    def retry(self) -> None:
        """Connectors never wait for a resource; nothing to retry."""

    def fail(self, error: BaseException) -> None:
        """The reactor's safety net: a handler above raised, which is our bug (the
        reactor has logged its traceback). Give up, and say it was not the upstreams."""
        self.broke = True
        self._drop_attempt()
        self._position = len(self._order)
        self._finish(None, None)
