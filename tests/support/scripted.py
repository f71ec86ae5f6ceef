"""Scripted readiness over real sockets and pipes, for the data path's component tests.

The component tests of flows, sessions, the connector and the reactor play the reactor
themselves: they make the kernel do something (send, half-close, reset, fill a buffer),
then call the handler they choose, in the order they choose. Everything here is a real
fd: loopback TCP pairs, unix socketpairs, kernel pipes, a real epoll set. The only waits
are for the kernel to show what was just done to it, and each is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splicerelay.config.addresses import TcpAddress
from splicerelay.config.model import Upstream
from splicerelay.datapath.flow import FIONREAD, TCP_CLOSE
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import UpstreamTarget
from splicerelay.datapath.stats import UpstreamStats
from splicerelay.protocol.balancer import HealthState
from splicerelay.relay.upstreams import UpstreamRuntime

# The longest a test waits for the kernel to show a state. Loopback shows it at once;
# the bound only turns a bug into a failure instead of a hang.
BOUND = 5.0

# ----- sockets ------------------------------------------------------------------------


def tcp_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (connecting end, accepted end), both non-blocking.

    `rcvbuf` shrinks the accepted end's receive buffer before the handshake (so that the
    advertised window follows it): the path towards that end fills with a few KiB.
    """
    listener = socket.socket()
    try:
        if rcvbuf is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    finally:
        listener.close()
    near.setblocking(False)
    far.setblocking(False)
    return near, far


def unix_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def shrink_send_buffer(sock: socket.socket, size: int = 4096) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST: SO_LINGER with a zero timeout discards what is unsent."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def readable(sock: socket.socket | int, timeout: float = 0.0) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def wait_readable(sock: socket.socket | int, what: str = "bytes") -> None:
    """Wait (bounded) until `sock` is readable: bytes, EOF or an error arrived."""
    assert readable(sock, BOUND), f"timed out after {BOUND}s waiting for {what}"


def poll_until(condition: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    """Wait for `condition` with a bound; the kernel usually shows it at once."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {bound}s waiting for {what}")
        select.select([], [], [], 0.002)


def wait_reset_seen(sock: socket.socket) -> None:
    """Until the kernel has processed the peer's RST on `sock` (TCP state CLOSE)."""
    poll_until(lambda: tcp_state(sock) == TCP_CLOSE, "the reset to arrive")


def receive_available(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """What can be read from `sock` now (b"" also when nothing waits; see `at_eof`)."""
    got = bytearray()
    while len(got) < limit:
        try:
            chunk = sock.recv(min(1 << 20, limit - len(got)))
        except BlockingIOError:
            break
        if not chunk:
            break
        got += chunk
    return bytes(got)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from `sock` (bounded); fails on EOF or when they do not come."""
    got = bytearray()
    while len(got) < size:
        wait_readable(sock, f"{size - len(got)} more bytes")
        try:
            chunk = sock.recv(size - len(got))
        except BlockingIOError:
            continue
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything up to the peer's FIN (bounded); fails if no FIN comes."""
    got = bytearray()
    while True:
        wait_readable(sock, "the FIN")
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            return bytes(got)
        got += chunk


def at_eof(sock: socket.socket) -> bool:
    """Is the peer's FIN the next thing to read (and nothing before it)?"""
    if not readable(sock):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False


def outcome_seen_by(sock: socket.socket) -> str:
    """How the far end of `sock` ended, as `sock` sees it: "fin", "reset" or "open".

    Bytes still waiting are read and dropped first. A reset that follows a FIN already
    received is not reported by recv(), which says EOF again; the error it left is still
    pending (EPIPE, in CLOSE_WAIT), and SO_ERROR tells.
    """
    wait_readable(sock, "the far end to close")
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return "reset"
        except BlockingIOError:
            return "open"
        if not chunk:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return "reset"
            return "fin"


def send_until_full(sock: socket.socket, data: bytes) -> int:
    """Send as much of `data` as the socket takes without blocking; the count sent."""
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            break
    return sent


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in `sock`'s receive queue (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), FIONREAD, b"\0\0\0\0"), "little")


# ----- fds ----------------------------------------------------------------------------


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as error:
        assert error.errno == errno.EBADF
        return False
    return True


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ----- the reactor, turned by hand ----------------------------------------------------


def registered(reactor: Reactor) -> dict[int, object]:
    """fd -> handler, for every fd the reactor dispatches (its own eventfd left out)."""
    wakeup = reactor._wakeup.fd
    return {fd: handler for fd, handler in reactor._handlers.items() if fd != wakeup}


def ready_now(reactor: Reactor) -> dict[int, int]:
    """What the reactor's real epoll set reports at this instant: fd -> events."""
    wakeup = reactor._wakeup.fd
    return {fd: events for fd, events in reactor._epoll.poll(0, 256) if fd != wakeup}


def turn(reactor: Reactor) -> int:
    """One dispatch round over what epoll reports now, without the reactor's task."""
    ready = reactor._epoll.poll(0, 256)
    reactor._dispatch(ready, reactor._handlers)
    return len(ready)


def close_idle_reactor(reactor: Reactor) -> None:
    """Close the epoll and eventfd of a reactor whose `run()` never ran."""
    reactor._epoll.close()
    with contextlib.suppress(OSError):
        os.close(reactor._wakeup.fd)


@dataclass(eq=False)
class Recorder:
    """A reactor handler that records its calls; it raises when told to."""

    name: str = "handler"
    ready: list[tuple[int, int]] = field(default_factory=list)
    retries: int = 0
    failures: list[BaseException] = field(default_factory=list)
    raise_on_ready: bool = False
    raise_on_retry: bool = False
    raise_on_fail: bool = False
    then: Callable[[], None] | None = None  # run on every on_ready, after recording

    def on_ready(self, fd: int, events: int) -> None:
        self.ready.append((fd, events))
        if self.then is not None:
            self.then()
        if self.raise_on_ready:
            raise RuntimeError(f"{self.name}: a bug in on_ready")

    def retry(self) -> None:
        self.retries += 1
        if self.raise_on_retry:
            raise RuntimeError(f"{self.name}: a bug in retry")

    def fail(self, error: BaseException) -> None:
        self.failures.append(error)
        if self.raise_on_fail:
            raise RuntimeError(f"{self.name}: a bug in fail")


# ----- upstreams ----------------------------------------------------------------------


def upstream_at(port: int, fall: int = 1) -> UpstreamRuntime:
    """An upstream of a route at 127.0.0.1:`port`, with fresh health and counters."""
    label = f"127.0.0.1:{port}"
    return UpstreamRuntime(
        Upstream(TcpAddress("127.0.0.1", port)),
        UpstreamTarget(label, socket.AF_INET, ("127.0.0.1", port)),
        HealthState(rise=1, fall=fall),
        UpstreamStats(label),
    )


def refusing_port() -> socket.socket:
    """A port bound on 127.0.0.1 that never listens: connects to it are refused.

    Keep the socket for as long as the port must refuse, so nobody else can take it.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def listening_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


def bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])
