"""One client <-> upstream pair: connect, two pumps, half-close, and the outcome.

Like inet.af/tcpproxy, a session runs two one-direction pumps. Each one half-closes its
destination when its source reaches EOF; the session ends when both have ended. If
either side fails, both pumps are cancelled and the failure becomes the session's
outcome, which is counted: a broken peer is a fact of life, never a traceback.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from enum import StrEnum

import trio

from .splice import PipePool, Pump, ReadError, WriteError, abort_socket, close_socket
from .stats import RouteStats, UpstreamStats


class Outcome(StrEnum):
    """How a connection ended; the `outcome` label of connections_total."""

    COMPLETED = "completed"  # both directions reached EOF
    CLIENT_RESET = "client_reset"  # the client reset or failed
    UPSTREAM_RESET = "upstream_reset"  # the upstream reset or failed
    CONNECT_FAILED = "connect_failed"  # no upstream accepted the connection
    IDLE_TIMEOUT = "idle_timeout"  # no byte either way for idle_timeout
    SHUTDOWN = "shutdown"  # still running when the shutdown timeout ran out
    DENIED = "denied"  # the client address is not allowed on this route
    NO_UPSTREAM = "no_upstream"  # every upstream is down
    BAD_PROXY_HEADER = "bad_proxy_header"  # accept_proxy_protocol, and no valid header came
    MAX_DURATION = "max_duration"  # open for longer than max_duration
    SOURCE_LIMIT = "source_limit"  # the client address already holds its maximum


@dataclass(frozen=True)
class UpstreamTarget:
    """A resolved upstream: what to connect to, and how to name it in metrics."""

    label: str  # the address as configured, e.g. "backend.internal:8000"
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


def _tune_stream_socket(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Why: a relay must not add Nagle's delay to small writes it forwards; the
        # endpoints already decided how to batch their own bytes.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def prepare_accepted(sock: socket.socket) -> None:
    """Make an accepted client socket ready for the data path."""
    sock.setblocking(False)
    _tune_stream_socket(sock)


async def connect(target: UpstreamTarget, timeout: float) -> socket.socket:
    """Open a non-blocking stream socket to `target` within `timeout` seconds."""
    try:
        sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as error:
        # EMFILE/ENFILE: out of fds; a failed connect, not a crash of the session.
        raise ConnectError(
            "no_socket" if error.errno in (errno.EMFILE, errno.ENFILE) else "error"
        ) from None
    try:
        _tune_stream_socket(sock)
        try:
            sock.connect(target.sockaddr)
        except BlockingIOError:
            # EINPROGRESS: the handshake runs in the kernel; writable means it ended.
            with trio.move_on_after(timeout) as deadline:
                await trio.lowlevel.wait_writable(sock)
            if deadline.cancelled_caught:
                raise ConnectError("timeout") from None
            status = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if status:
                raise ConnectError(connect_error_reason(OSError(status, ""))) from None
        except OSError as error:
            raise ConnectError(connect_error_reason(error)) from None
    except BaseException:
        close_socket(sock)
        raise
    return sock


async def _run_pump(
    pump: Pump, source_is_client: bool, scope: trio.CancelScope, failure: list[Outcome]
) -> None:
    """Run one direction; a failing side is recorded and ends both directions."""
    try:
        await pump.run()
    except ReadError:
        failure.append(Outcome.CLIENT_RESET if source_is_client else Outcome.UPSTREAM_RESET)
        scope.cancel()
    except WriteError:
        failure.append(Outcome.UPSTREAM_RESET if source_is_client else Outcome.CLIENT_RESET)
        scope.cancel()


class Session:
    """A relayed connection: its sockets, its activity, and the scope that can stop it.

    The server enters `cancel_scope` around the whole life of the session (connect and
    relay), so that `stop()` ends it wherever it is, and calls `close()` on every path.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "cancel_scope",
        "client",
        "client_address",
        "closing_outcome",
        "idle_since",
        "seen_activity",
        "started",
        "upstream",
        "upstream_label",
        "upstream_stats",
    )

    def __init__(self, client: socket.socket, client_address: str) -> None:
        self.client = client
        self.client_address = client_address
        self.upstream: socket.socket | None = None
        self.upstream_label = ""
        self.upstream_stats: UpstreamStats | None = None
        self.started = trio.current_time()  # trio's clock, like the idle sweep's
        # Bytes delivered client -> upstream (in) and back (out). The idle sweeper
        # compares their sum between sweeps, so noticing activity costs an integer add
        # per chunk rather than a timer per I/O call.
        self.bytes_in = 0
        self.bytes_out = 0
        self.seen_activity = 0
        self.idle_since = trio.current_time()
        self.cancel_scope = trio.CancelScope()
        # Set by whoever cancels the session from outside (idle sweeper, shutdown).
        self.closing_outcome: Outcome | None = None

    @property
    def activity(self) -> int:
        return self.bytes_in + self.bytes_out

    def note_client_to_upstream(self, count: int) -> None:
        self.bytes_in += count

    def note_upstream_to_client(self, count: int) -> None:
        self.bytes_out += count

    def stop(self, outcome: Outcome) -> None:
        """Cancel the session from outside, with the outcome to record."""
        if self.closing_outcome is None:
            self.closing_outcome = outcome
        self.cancel_scope.cancel()

    async def relay(
        self,
        upstream: socket.socket,
        pool: PipePool,
        pipe_size: int,
        stats: RouteStats,
        use_splice: bool,
    ) -> Outcome:
        """Run both pumps until both directions end or one side fails."""
        self.upstream = upstream
        client = self.client
        outbound = Pump(
            client,
            upstream,
            pool,
            pipe_size,
            stats.client_to_upstream,
            self.note_client_to_upstream,
            use_splice,
        )
        inbound = Pump(
            upstream,
            client,
            pool,
            pipe_size,
            stats.upstream_to_client,
            self.note_upstream_to_client,
            use_splice,
        )
        outbound.reverse, inbound.reverse = inbound, outbound
        failure: list[Outcome] = []
        # Why one child task, not two: the current task pumps one direction itself.
        # Every task costs memory for as long as the connection lives, idle or not.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_pump, inbound, False, nursery.cancel_scope, failure)
            await _run_pump(outbound, True, nursery.cancel_scope, failure)
        if failure:
            return failure[0]
        return Outcome.COMPLETED

    def close(self, outcome: Outcome) -> None:
        """Close both sockets; after a failure, pass a reset on instead of a clean EOF."""
        upstream = self.upstream
        if outcome is Outcome.UPSTREAM_RESET:
            abort_socket(self.client)
        else:
            close_socket(self.client)
        if upstream is not None:
            if outcome is Outcome.CLIENT_RESET:
                abort_socket(upstream)
            else:
                close_socket(upstream)
