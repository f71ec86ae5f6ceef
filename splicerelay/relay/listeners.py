"""Listening sockets: bound here, or handed over by systemd, and kept across reloads.

A route's listener outlives the route's runtime: a reload that keeps a listen address
keeps the very same socket, so clients queued in its backlog are never refused. A socket
passed by socket activation is never bound a second time (passed.py says which route
takes which one): a route takes the passed socket bound to its `listen`, or with
`listen: systemd:NAME` the one passed under NAME, whatever it is bound to.

With `workers` above 1 the listeners are shared (see Role): the supervisor binds every
listener once and hands it to each worker (see workers/pool.py), and a TCP listener
that a reload adds is bound by every worker on its own with SO_REUSEPORT.

A route's `defer_accept` sets TCP_DEFER_ACCEPT on the listeners the relay binds, and
clears it when off, at start and on every reload, kept listeners included. Socket options
belong to the socket, not to the fd: a listener the supervisor bound is one socket in
every worker, and each worker sets the same value on it; one a reload adds is a socket
per worker, and each sets its own. A socket the service manager passed is left as its
socket unit made it (DeferAcceptSec=): a route that asks for defer_accept on one that
does not defer accept is refused, rather than changing what the unit says.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import stat
from collections.abc import Callable, Collection, Sequence

from splicerelay.config.addresses import (
    Address,
    ListenAddress,
    SystemdSocketAddress,
    TcpAddress,
    UnixAddress,
)
from splicerelay.ops.systemd import PassedSocket, RefusedFd
from splicerelay.relay.passed import ListenError as ListenError  # (its users import it from here)
from splicerelay.relay.passed import claim_passed, listening_on
from splicerelay.relay.upstreams import ResolveError, resolve

LISTEN_BACKLOG = 4096

# Why 1 second, as HAProxy's `defer-accept` sets: the kernel keeps no time. It rounds the
# seconds up to a count of SYN-ACK retransmission timeouts (1s, then 2s, 4s, ... from
# TCP_TIMEOUT_INIT) and getsockopt reads that count back in seconds: 1 reads 1, 5 reads 7.
# Until the count runs out, the bare ACK that ends the client's handshake is dropped and
# the connection waits in SYN-RECV, in the SYN queue rather than the accept queue; the
# first segment with data (or a FIN) completes it, and accept() returns it with its
# first bytes there to splice. A client that stays silent is not refused: its side is
# established at once, and when the count runs out the kernel resends the SYN-ACK, whose
# ACK completes the connection without data. One is the shortest wait there is: a
# silent client (or a server-speaks-first protocol such as SSH or SMTP, whose client
# waits for a banner) is accepted about a second late, where longer values would hold it
# for seconds.
DEFER_ACCEPT_SECONDS = 1


class Role(enum.Enum):
    """Who else listens on the same ports."""

    SOLE = "sole"  # one relay process (workers: 1)
    SUPERVISOR = "supervisor"  # binds for the workers; the port must be free
    WORKER = "worker"  # joins its sibling workers on a port a reload adds


def open_listener(
    address: Address, *, reuse_port: bool = False, exclusive: bool = False
) -> socket.socket:
    """Bind and listen on `address`; the socket is non-blocking.

    With `reuse_port`, a TCP socket sets SO_REUSEPORT so that the relay's worker
    processes can each bind the same port; it has no meaning for a unix socket. With
    `exclusive` too, a port that anything listens on already is refused all the same.
    """
    if exclusive and reuse_port and isinstance(address, TcpAddress):
        refuse_if_listened_on(address)
    if isinstance(address, UnixAddress):
        remove_stale_unix_socket(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] | tuple[str, int, int, int] = address.path
    else:
        try:
            resolved = resolve(address, passive=True)
        except ResolveError as error:
            raise ListenError(str(error)) from None
        family = resolved.family
        sock = socket.socket(family, socket.SOCK_STREAM)
        target = resolved.sockaddr
        # Why: without SO_REUSEADDR a restart fails while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Why: let [::]:P and 0.0.0.0:P be two routes, as the config says, instead
            # of the v6 socket silently taking the v4 traffic too.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            # Why SO_REUSEPORT: it lets several sockets bind one port when every one of
            # them sets it (and they belong to the same user); the kernel then spreads
            # new connections over them by a hash of the 4-tuple. Workers need it for a
            # port that a reload adds, which each of them binds itself; the supervisor
            # sets it on the listeners it binds at start so those can share the port.
            # A port held by another program without SO_REUSEPORT still fails EADDRINUSE.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(target)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {error.strerror}") from None
    return sock


def is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


def defer_accept_of(sock: socket.socket) -> int:
    """The TCP_DEFER_ACCEPT of TCP listener `sock` in seconds, as the kernel rounded
    them (see DEFER_ACCEPT_SECONDS); 0 when it accepts at the end of the handshake."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)


def set_defer_accept(sock: socket.socket, on: bool) -> None:
    """Turn TCP_DEFER_ACCEPT on TCP listener `sock` on or off (0 is off).

    Why always set, off too: a kept listener may have had it on under the config before
    a reload. The kernel reads the option whenever a handshake's ACK or timer comes, so
    connections already waiting in SYN-RECV follow the new value."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS if on else 0)


def refuse_if_listened_on(address: TcpAddress) -> None:
    """Raise ListenError when some socket already listens on `address`.

    Why: SO_REUSEPORT would let our bind join another process's listener on the port
    (any process of the same user that set it too) and silently share its clients, where
    a plain bind fails with EADDRINUSE. A probe without SO_REUSEPORT restores the plain
    answer; SO_REUSEADDR on it only forgives connections in TIME_WAIT, never a listener.
    """
    probe = open_listener(address)  # raises ListenError("... Address already in use")
    probe.close()


def remove_stale_unix_socket(path: str) -> None:
    """Remove a unix socket file left by an earlier run; refuse to remove anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"cannot listen on unix:{path}: a file that is not a socket is there")
    os.unlink(path)


class ListenerSet:
    """Every listening socket of the relay, by listen address; the one owner that closes
    them.

    With workers (`role` other than SOLE), TCP listeners set SO_REUSEPORT; a worker
    refuses a new unix listener, since a unix path can be bound only once and its
    sibling workers could never share it.
    """

    def __init__(
        self, passed: Sequence[PassedSocket | RefusedFd] | None = None, *, role: Role = Role.SOLE
    ) -> None:
        items = list(passed or [])
        self._refused = [item for item in items if isinstance(item, RefusedFd)]
        self._unclaimed = [item for item in items if isinstance(item, PassedSocket)]
        self._by_address: dict[ListenAddress, socket.socket] = {}
        self._passed = {item.sock.fileno(): item for item in self._unclaimed}
        self.role = role
        self._names: dict[ListenAddress, str] = {}

    def addresses(self) -> set[ListenAddress]:
        return set(self._by_address)

    def describe(self, address: ListenAddress) -> str:
        """Where the listener for `address` really listens (see `listening_on`), or the
        address as configured when this set holds no listener for it."""
        sock = self._by_address.get(address)
        return str(address) if sock is None else listening_on(address, sock)

    def take(self, route_name: str, address: ListenAddress) -> socket.socket:
        """The listener for `address`: kept, passed, or newly bound. May block (bind).

        Raises ListenError, also when the service manager passed an fd that is not a
        listening stream socket (the relay refuses to start), or a socket named after
        this route but bound elsewhere than `address` (see passed.py)."""
        if self._refused:
            raise ListenError(str(self._refused[0]))
        existing = self._by_address.get(address)
        if existing is not None and existing.fileno() >= 0:
            return existing
        holders = {id(sock): (key, self._names[key]) for key, sock in self._by_address.items()}
        chosen = claim_passed(
            route_name, address, self._unclaimed, list(self._passed.values()), holders
        )
        if chosen is not None:
            self._unclaimed.remove(chosen)
            chosen.sock.setblocking(False)
            sock = chosen.sock
        else:
            sock = self._open(address)
        self._by_address[address] = sock
        self._names[address] = route_name
        return sock

    def handover(self) -> list[PassedSocket]:
        """Every socket held, as a worker process should receive it (see workers/pool.py).

        A socket the service manager passed keeps its name, so that the worker matches
        it to routes by the rules the supervisor did (passed.py), and stays `kept`
        across reloads; one bound here is named after its route and closes with it."""
        handed = [
            self._passed[sock.fileno()]
            if self.is_passed(sock)
            else PassedSocket(sock, self._names[address], kept=False)
            for address, sock in self._by_address.items()
        ]
        return handed + list(self._unclaimed)

    def _open(self, address: ListenAddress) -> socket.socket:
        if isinstance(address, SystemdSocketAddress):
            # (claim_passed raised already: only the service manager has such a socket.)
            raise ListenError(f"cannot listen on {address}: only systemd can pass it")
        if self.role is Role.WORKER and isinstance(address, UnixAddress):
            raise ListenError(
                f"cannot listen on {address}: with workers > 1 a new unix socket listener"
                " needs a restart (its path can be bound only once, so workers cannot share it)"
            )
        return open_listener(
            address,
            reuse_port=self.role is not Role.SOLE,
            exclusive=self.role is Role.SUPERVISOR,
        )

    def is_passed(self, sock: socket.socket) -> bool:
        return sock.fileno() in self._passed

    def is_from_service_manager(self, sock: socket.socket) -> bool:
        """Whether systemd passed `sock` (to this process or to its supervisor), as
        opposed to a listener the relay bound: in a worker, its supervisor's."""
        passed = self._passed.get(sock.fileno())
        return passed is not None and passed.kept

    def check_defer_accept(self, address: ListenAddress, on: bool) -> None:
        """Raise ListenError when the listener of `address` cannot defer accept as `on`
        says: a socket the service manager passed keeps the unit's DeferAcceptSec=,
        so a route that wants it on needs the unit to say so. Changes nothing."""
        sock = self._by_address[address]
        if on and self.is_from_service_manager(sock) and defer_accept_of(sock) == 0:
            raise ListenError(
                f"defer_accept is true, but the socket systemd passed for"
                f" {listening_on(address, sock)} does not defer accept: set"
                " DeferAcceptSec= in its socket unit (the relay leaves a passed socket's"
                " options as the unit set them), or defer_accept: false"
            )

    def apply_defer_accept(self, address: ListenAddress, on: bool) -> None:
        """Set TCP_DEFER_ACCEPT on the listener of `address` as `on` says, unless the
        service manager passed it (see check_defer_accept) or it is not TCP."""
        sock = self._by_address[address]
        if is_tcp(sock) and not self.is_from_service_manager(sock):
            set_defer_accept(sock, on)

    def close_except(
        self, keep: Collection[ListenAddress], close: Callable[[socket.socket], None]
    ) -> None:
        """Close the listeners of addresses no route uses any more.

        A passed socket is not closed: it goes back to the unclaimed ones, so a route
        that comes back later finds it again instead of binding its port twice. (Unless
        it is not `kept`: a worker's copy of a listener its supervisor bound closes with
        its route, and the supervisor closes its own copy and removes the path.)
        """
        for address in [address for address in self._by_address if address not in keep]:
            sock = self._by_address.pop(address)
            self._names.pop(address, None)
            if self.is_passed(sock):
                passed = self._passed.pop(sock.fileno())
                if passed.kept:
                    self._passed[sock.fileno()] = passed
                    self._unclaimed.append(passed)
                else:
                    close(sock)
                continue
            close(sock)
            if isinstance(address, UnixAddress):
                with contextlib.suppress(OSError):
                    os.unlink(address.path)

    def close_all(self, close: Callable[[socket.socket], None]) -> None:
        self.close_except(set(), close)
        for item in self._unclaimed:
            close(item.sock)
        self._unclaimed.clear()
