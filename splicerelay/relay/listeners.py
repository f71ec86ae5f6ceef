"""Listening sockets: bound here, or handed over by systemd, and kept across reloads.

A route's listener outlives the route's runtime: a reload that keeps a listen address
keeps the very same socket, so clients queued in its backlog are never refused. A socket
passed by socket activation is never bound a second time: a route takes the passed
socket named after it (LISTEN_FDNAMES), or else the one bound to its address.

With `workers` above 1 the listeners are shared (see Role): the supervisor binds every
listener once and hands it to each worker (see workers/pool.py), and a TCP listener
that a reload adds is bound by every worker on its own with SO_REUSEPORT.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import stat
from collections.abc import Callable

from splicerelay.config.addresses import Address, TcpAddress, UnixAddress
from splicerelay.ops.systemd import PassedSocket
from splicerelay.relay.upstreams import ResolveError, resolve

LISTEN_BACKLOG = 4096


class ListenError(Exception):
    """A listener cannot be had (port in use, permission, name does not resolve)."""


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


def same_address(sock: socket.socket, address: Address) -> bool:
    """Is `sock` bound to `address` (a passed socket, compared by what it is bound to)?"""
    try:
        bound = sock.getsockname()
    except OSError:
        return False
    if isinstance(address, UnixAddress):
        return sock.family == socket.AF_UNIX and bound == address.path
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        wanted = resolve(address, passive=True).sockaddr
    except ResolveError:
        return False
    assert isinstance(wanted, tuple)
    return (bound[0], bound[1]) == (wanted[0], wanted[1])


class ListenerSet:
    """Every listening socket of the relay, by address; the one owner that closes them.

    With workers (`role` other than SOLE), TCP listeners set SO_REUSEPORT; a worker
    refuses a new unix listener, since a unix path can be bound only once and its
    sibling workers could never share it.
    """

    def __init__(self, passed: list[PassedSocket] | None = None, *, role: Role = Role.SOLE) -> None:
        self._unclaimed = list(passed or [])
        self._by_address: dict[Address, socket.socket] = {}
        self._passed = {item.sock.fileno(): item for item in self._unclaimed}
        self.role = role
        self._names: dict[Address, str] = {}

    def addresses(self) -> set[Address]:
        return set(self._by_address)

    def take(self, route_name: str, address: Address) -> socket.socket:
        """The listener for `address`: kept, passed, or newly bound. May block (bind)."""
        existing = self._by_address.get(address)
        if existing is not None and existing.fileno() >= 0:
            return existing
        sock = self._claim_passed(route_name, address) or self._open(address)
        self._by_address[address] = sock
        self._names[address] = route_name
        return sock

    def handover(self) -> list[PassedSocket]:
        """Every socket held, as a worker process should receive it (see workers/pool.py).

        A route's listener is named after the route; one the service manager passed
        keeps being `kept` across reloads, one bound here closes with its route."""
        handed = [
            PassedSocket(
                sock,
                self._names[address],
                kept=self._passed[sock.fileno()].kept if self.is_passed(sock) else False,
            )
            for address, sock in self._by_address.items()
        ]
        return handed + list(self._unclaimed)

    def _open(self, address: Address) -> socket.socket:
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

    def _claim_passed(self, route_name: str, address: Address) -> socket.socket | None:
        chosen = next((p for p in self._unclaimed if p.name == route_name), None)
        if chosen is None:
            chosen = next((p for p in self._unclaimed if same_address(p.sock, address)), None)
        if chosen is None:
            return None
        self._unclaimed.remove(chosen)
        chosen.sock.setblocking(False)
        return chosen.sock

    def is_passed(self, sock: socket.socket) -> bool:
        return sock.fileno() in self._passed

    def close_except(self, keep: set[Address], close: Callable[[socket.socket], None]) -> None:
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
