"""One client <-> upstream pair: connect, two flows, half-close, and the outcome.

Like inet.af/tcpproxy, a session has two one-direction flows. Each one half-closes its
destination when its source reaches EOF; the session ends when both have ended. If
either side fails, the session ends at once and the failure becomes its outcome, which
is counted: a broken peer is a fact of life, never a traceback.
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from splicerelay.datapath.flow import (
    DONE,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    WANT_PIPE,
    WANT_READ,
    WANT_WRITE,
    Flow,
    PipePool,
    ReadError,
    WriteError,
    abort_socket,
    close_socket,
)
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.stats import RouteStats, UpstreamStats
from splicerelay.protocol.outcome import Outcome


@dataclass(frozen=True)
class UpstreamTarget:
    """A resolved upstream: what to connect to, and how to name it in metrics."""

    label: str  # as configured ("backend.internal:8000"); one address of a name: "name:port@ip"
    family: socket.AddressFamily
    sockaddr: str | tuple[str, int] | tuple[str, int, int, int]


class ConnectError(Exception):
    """Connecting to one upstream failed; `reason` is a metrics label value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def connect_error_reason(error: OSError) -> str:
    if error.errno == errno.ECONNREFUSED:
        return "refused"
    if error.errno in (errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if error.errno == errno.EAGAIN:
        return "busy"  # a unix socket whose backlog is full
    if error.errno == errno.ENOENT:
        return "refused"  # a unix socket path that does not exist
    return "error"


INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def tune_stream_socket(sock: _socket.socket, family: int) -> None:
    if family in INET_FAMILIES:
        # Why: a relay must not add Nagle's delay to small writes it forwards; the
        # endpoints already decided how to batch their own bytes.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def accept_client(listener: socket.socket, family: int) -> tuple[_socket.socket, object]:
    """accept(2) a client: (socket, peer address); raises OSError like socket.accept().

    Why not socket.accept(): its Python wrapper converts the listener's family and type
    to enums and builds a socket.socket subclass for every connection. The C-level
    socket does the same job with a fraction of the interpreter work, and the data path
    only needs its fd and a handful of C methods.
    """
    fd, peer = listener._accept()  # type: ignore[attr-defined]
    try:
        return _socket.socket(family, socket.SOCK_STREAM, 0, fd), peer
    except BaseException:
        os.close(fd)
        raise


def prepare_accepted(sock: _socket.socket) -> None:
    """Make an accepted client socket ready for the data path.

    TCP_NODELAY is not set here: accepted sockets inherit it from the listener, which
    prepare_routes sets it on.
    """
    sock.setblocking(False)


def start_connect(target: UpstreamTarget) -> tuple[_socket.socket, bool]:
    """Open a non-blocking socket and start connecting; (socket, still in progress).

    Raises ConnectError; never leaves a socket open behind it.
    """
    try:
        # The C-level socket: see accept_client.
        sock = _socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as error:
        # EMFILE/ENFILE: out of fds; a failed connect, not a crash of the session.
        raise ConnectError(
            "no_socket" if error.errno in (errno.EMFILE, errno.ENFILE) else "error"
        ) from None
    try:
        tune_stream_socket(sock, target.family)
        # connect_ex: the usual EINPROGRESS comes back as a number, not an exception.
        status = sock.connect_ex(target.sockaddr)
    except OSError as error:
        status = error.errno or errno.EINVAL
    if status == errno.EINPROGRESS:
        settled = handshake_status(sock, target.family)
        if settled is None:
            return sock, True  # the handshake runs in the kernel
        status = settled
    if status:
        close_socket(sock, tracked=False)
        raise ConnectError(connect_error_reason(OSError(status, ""))) from None
    return sock, False


def handshake_status(sock: _socket.socket, family: int) -> int | None:
    """How a connect() that said EINPROGRESS stands: None while the handshake runs,
    0 once established, else the errno it failed with.

    Why look at once: over loopback (and to a local address) the kernel runs the whole
    handshake inside connect(), which still says EINPROGRESS. The TCP state tells; one
    getsockopt here saves an epoll registration, a round of waiting for EPOLLOUT and the
    SO_ERROR query after it, for every such connection.
    """
    if family not in INET_FAMILIES:
        return None
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return None
    if state == TCP_ESTABLISHED:
        return 0
    if state == TCP_CLOSE:
        # Refused or unreachable before connect() returned: SO_ERROR holds the reason.
        try:
            status = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as error:
            status = error.errno or 0
        return status or errno.ECONNREFUSED
    return None


async def connect(target: UpstreamTarget, timeout: float) -> socket.socket:
    """Connect to `target` within `timeout` seconds, waiting in a task.

    Health checks use this (and get a full socket.socket, for trio's streams); relayed
    connections connect in the reactor (connector.py).
    """
    sock, in_progress = start_connect(target)
    try:
        if in_progress:
            # Writable means the handshake ended; SO_ERROR says how.
            with trio.move_on_after(timeout) as deadline:
                await trio.lowlevel.wait_writable(sock)
            if deadline.cancelled_caught:
                raise ConnectError("timeout") from None
            status = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if status:
                raise ConnectError(connect_error_reason(OSError(status, ""))) from None
    except BaseException:
        close_socket(sock)
        raise
    fd = sock.detach()
    try:
        return socket.socket(target.family, socket.SOCK_STREAM, 0, fd)
    except BaseException:
        os.close(fd)
        raise


# Why EPOLLRDHUP with EPOLLIN: it says the peer's FIN is waiting behind the data, so
# the flow reads on to the EOF and passes the FIN on at once, instead of a round later,
# by which time a reset may have overtaken it (see was_reset).
_WANTS_READ = select.EPOLLIN | select.EPOLLRDHUP
_WANTS_WRITE = select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_PEER_CLOSED = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
_WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP

FinishCallback = Callable[["Session", Outcome], None]

# Outcomes where the relay itself ends a connection that might still carry bytes.
CUT_OUTCOMES = frozenset(
    {Outcome.IDLE_TIMEOUT, Outcome.MAX_DURATION, Outcome.SHUTDOWN, Outcome.KILLED}
)
# Outcomes after which a side gets a reset instead of a FIN: the other side failed, or
# the relay itself did (internal_error), when bytes may have been lost and a FIN would
# make the stream look complete.
RESET_CLIENT = frozenset({Outcome.UPSTREAM_RESET, Outcome.INTERNAL_ERROR})
RESET_UPSTREAM = frozenset({Outcome.CLIENT_RESET, Outcome.INTERNAL_ERROR})


class Session:
    """A relayed connection: its sockets, its two flows, and how it is stopped.

    A session lives in two phases. While it is set up it has no task of its own: the
    relay's Connector connects it on the shared reactor (`on_stop` aborts that), and only
    reading a PROXY header runs in a trio task (`cancel_scope`); `stop()` ends it wherever
    it is. Once established it is `adopt`ed by the reactor: readiness of its sockets calls
    `on_ready`, and when it ends `on_finish` is called exactly once with the outcome.
    """

    __slots__ = (
        "alpn",
        "cancel_scope",
        "client",
        "client_address",
        "client_interest",
        "closing_outcome",
        "cut_client",
        "cut_upstream",
        "global_slot",
        "id",
        "idle_since",
        "inbound",
        "on_finish",
        "on_stop",
        "outbound",
        "owner",
        "reactor",
        "seen_activity",
        "sni",
        "source_key",
        "started",
        "tls_error",
        "tracked",
        "upstream",
        "upstream_interest",
        "upstream_label",
        "upstream_stats",
    )

    def __init__(self, client: _socket.socket, client_address: str, session_id: int = 0) -> None:
        # Names the connection on the control socket (`show connections`, `kill
        # connection ID`): unique within the process, never reused.
        self.id = session_id
        self.client = client
        self.client_address = client_address
        self.upstream: _socket.socket | None = None
        self.upstream_label = ""
        self.upstream_stats: UpstreamStats | None = None
        self.started = trio.current_time()  # trio's clock, like the idle sweep's
        # The idle sweeper compares the bytes moved between sweeps, so noticing activity
        # costs an integer add per chunk rather than a timer per I/O call.
        # `idle_since` is when the sweeper last saw the count move (or the start): while
        # `activity` still equals `seen_activity`, no byte has moved since then.
        self.seen_activity = 0
        self.idle_since = self.started
        # Only a session that waits in a task (for a PROXY header) gets a cancel scope.
        self.cancel_scope: trio.CancelScope | None = None
        # Set by whoever cancels the session from outside (idle sweeper, shutdown).
        self.closing_outcome: Outcome | None = None
        # What the relay needs back when the session ends (slots, per-source count; see
        # relay/sessions.py).
        self.owner: object = None
        self.global_slot: trio.Semaphore | None = None
        self.source_key: str | None = None
        self.outbound: Flow | None = None  # client -> upstream
        self.inbound: Flow | None = None  # upstream -> client
        self.reactor: Reactor | None = None
        self.on_finish: FinishCallback | None = None
        self.client_interest = 0
        self.upstream_interest = 0
        # Set when the session is cut (idle timeout, max duration, shutdown) with bytes
        # still on their way to that side: it gets a reset, not a FIN (see _end).
        self.cut_client = False
        self.cut_upstream = False
        # While connecting without a task: how to stop (see Connector.abort).
        self.on_stop: Callable[[Outcome], None] | None = None
        # Has trio itself waited on the client socket (reading a PROXY header)? Only then
        # must closing it go through trio.lowlevel.notify_closing.
        self.tracked = False
        # On a listener that routes by TLS ClientHello, what the hello offered (for the
        # access log): `alpn` is () from the start there, and None elsewhere.
        self.sni: str | None = None
        self.alpn: tuple[str, ...] | None = None
        # Why no valid hello came there (outcome tls_inspect_failed's reason), or None.
        self.tls_error: str | None = None

    @property
    def bytes_in(self) -> int:
        """Bytes delivered client -> upstream."""
        return self.outbound.moved if self.outbound is not None else 0

    @property
    def bytes_out(self) -> int:
        """Bytes delivered upstream -> client."""
        return self.inbound.moved if self.inbound is not None else 0

    @property
    def activity(self) -> int:
        return self.bytes_in + self.bytes_out

    @property
    def adopted(self) -> bool:
        return self.reactor is not None

    def stop(self, outcome: Outcome) -> None:
        """End the session from outside, with the outcome to record."""
        if self.closing_outcome is None:
            self.closing_outcome = outcome
        if self.reactor is not None:
            self._end(outcome)
        elif self.on_stop is not None:
            self.on_stop(outcome)
        elif self.cancel_scope is not None:
            self.cancel_scope.cancel()

    # ----- the established phase, driven by the reactor ------------------------------

    def adopt(
        self,
        upstream: _socket.socket,
        reactor: Reactor,
        pool: PipePool,
        pipe_size: int,
        stats: RouteStats,
        use_splice: bool,
        on_finish: FinishCallback,
        upstream_interest: int = 0,
    ) -> None:
        """Hand the established connection to `reactor`.

        `upstream_interest` is what the upstream socket is already registered for (the
        connector's EPOLLOUT); the session takes that registration over.
        """
        self.upstream = upstream
        self.cancel_scope = None  # no task to cancel from here on
        self.on_stop = None
        client = self.client
        outbound = Flow(client, upstream, pool, pipe_size, stats.client_to_upstream, use_splice)
        inbound = Flow(upstream, client, pool, pipe_size, stats.upstream_to_client, use_splice)
        outbound.reverse, inbound.reverse = inbound, outbound
        self.outbound, self.inbound = outbound, inbound
        self.reactor = reactor
        self.on_finish = on_finish
        if upstream_interest:
            reactor.hand_over(inbound.src_fd, self)
            self.upstream_interest = upstream_interest
        # Why not try the client's socket now: the next round reports its request for one
        # dispatch, where a step here reads on to EAGAIN (a splice and an exception more;
        # 8 us of user CPU per connection on the conn bench, see bench/journal.py).
        self._settle()

    def on_ready(self, fd: int, events: int) -> None:
        outbound, inbound = self.outbound, self.inbound
        assert outbound is not None and inbound is not None
        if fd == outbound.src_fd:
            reader, writer = outbound, inbound
        else:
            reader, writer = inbound, outbound
        reader_was, writer_was = reader.state, writer.state
        # Why HUP and ERR count as both: the flow that waits on this fd must look, and
        # its syscall reports the EOF or the error; fds nobody waits on are not in the set.
        if (
            events & _READABLE
            and reader_was == WANT_READ
            and not self._step(
                reader, eager=bool(events & _PEER_CLOSED), readable=bool(events & select.EPOLLIN)
            )
        ):
            return
        if events & _WRITABLE and writer_was == WANT_WRITE and not self._step(writer):
            return
        if reader.state != reader_was or writer.state != writer_was:
            self._settle()  # the common request/response case changes nothing: skip it

    def retry(self) -> None:
        """Out of fds earlier: try again to get the pipes."""
        for flow in (self.outbound, self.inbound):
            if flow is not None and flow.state == WANT_PIPE and not self._step(flow):
                return
        self._settle()

    def fail(self, error: BaseException) -> None:
        self._end(Outcome.INTERNAL_ERROR)  # our bug (the reactor logged it), not a peer's

    def _step(self, flow: Flow, eager: bool = False, readable: bool = False) -> bool:
        """Advance one flow; False when that ended the session."""
        try:
            flow.step(eager, readable)
        except ReadError:
            self._end(Outcome.CLIENT_RESET if flow is self.outbound else Outcome.UPSTREAM_RESET)
            return False
        except WriteError:
            self._end(Outcome.UPSTREAM_RESET if flow is self.outbound else Outcome.CLIENT_RESET)
            return False
        return True

    def _settle(self) -> None:
        """After progress: end the session, or register what each socket waits for."""
        outbound, inbound, reactor = self.outbound, self.inbound, self.reactor
        assert outbound is not None and inbound is not None and reactor is not None
        out_state, in_state = outbound.state, inbound.state
        if out_state == DONE and in_state == DONE:
            self._end(Outcome.COMPLETED)
            return
        client_wants = (_WANTS_READ if out_state == WANT_READ else 0) | (
            _WANTS_WRITE if in_state == WANT_WRITE else 0
        )
        upstream_wants = (_WANTS_READ if in_state == WANT_READ else 0) | (
            _WANTS_WRITE if out_state == WANT_WRITE else 0
        )
        if client_wants != self.client_interest:
            reactor.set_interest(outbound.src_fd, self.client_interest, client_wants, self)
            self.client_interest = client_wants
        if upstream_wants != self.upstream_interest:
            reactor.set_interest(inbound.src_fd, self.upstream_interest, upstream_wants, self)
            self.upstream_interest = upstream_wants
        if out_state == WANT_PIPE or in_state == WANT_PIPE:
            reactor.retry_later(self)

    def _end(self, outcome: Outcome) -> None:
        on_finish = self.on_finish
        if on_finish is None:
            return  # already ended
        self.on_finish = None
        reactor, outbound, inbound = self.reactor, self.outbound, self.inbound
        assert reactor is not None and outbound is not None and inbound is not None
        # Why no EPOLL_CTL_DEL: both sockets are closed right after this, and closing
        # the last reference to a file removes it from every epoll set. Ours are never
        # dup'd or inherited (CLOEXEC), so close() is that last reference.
        if self.client_interest:
            reactor.forget_fd(outbound.src_fd)
        if self.upstream_interest:
            reactor.forget_fd(inbound.src_fd)
        self.client_interest = self.upstream_interest = 0
        reactor.forget(self)
        if outcome in CUT_OUTCOMES:
            # Why: bytes still in a pipe or unread in the source are dropped here, and a
            # FIN would make the truncated stream look complete to the side that misses
            # them.
            self.cut_upstream = outbound.is_dropping_bytes()
            self.cut_client = inbound.is_dropping_bytes()
        outbound.release_pipe()
        inbound.release_pipe()
        # Why: the two flows refer to each other; without this the pair waits for the
        # garbage collector instead of going when the session does.
        outbound.reverse = inbound.reverse = None
        on_finish(self, outcome)

    def close(self, outcome: Outcome) -> None:
        """Close both sockets; after a failure, pass a reset on instead of a clean EOF."""
        upstream = self.upstream
        if outcome in RESET_CLIENT or self.cut_client:
            abort_socket(self.client, self.tracked)
        else:
            close_socket(self.client, self.tracked)
        if upstream is not None:
            # Only the connector and the reactor have waited on it, never trio.
            if outcome in RESET_UPSTREAM or self.cut_upstream:
                abort_socket(upstream, tracked=False)
            else:
                close_socket(upstream, tracked=False)
