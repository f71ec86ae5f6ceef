"""Listening sockets: bound here, or handed over by systemd, and kept across reloads.

A route's listener outlives the route's runtime: a reload that keeps a listen address
keeps the very same socket, so clients queued in its backlog are never refused. A socket
passed by socket activation is never bound a second time: a route takes the passed
socket named after it (LISTEN_FDNAMES), or else the one bound to its address.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable

from .addresses import Address, UnixAddress
from .systemd import PassedSocket
from .upstreams import ResolveError, resolve

LISTEN_BACKLOG = 4096


class ListenError(Exception):
    """A listener cannot be had (port in use, permission, name does not resolve)."""


def open_listener(address: Address) -> socket.socket:
    """Bind and listen on `address`; the socket is non-blocking."""
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
    try:
        sock.bind(target)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {error.strerror}") from None
    return sock


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
    """Every listening socket of the relay, by address; the one owner that closes them."""

    def __init__(self, passed: list[PassedSocket] | None = None) -> None:
        self._unclaimed = list(passed or [])
        self._by_address: dict[Address, socket.socket] = {}
        self._passed = {item.sock.fileno(): item for item in self._unclaimed}

    def addresses(self) -> set[Address]:
        return set(self._by_address)

    def take(self, route_name: str, address: Address) -> socket.socket:
        """The listener for `address`: kept, passed, or newly bound. May block (bind)."""
        existing = self._by_address.get(address)
        if existing is not None and existing.fileno() >= 0:
            return existing
        sock = self._claim_passed(route_name, address) or open_listener(address)
        self._by_address[address] = sock
        return sock

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
        that comes back later finds it again instead of binding its port twice.
        """
        for address in [address for address in self._by_address if address not in keep]:
            sock = self._by_address.pop(address)
            if self.is_passed(sock):
                self._unclaimed.append(self._passed[sock.fileno()])
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
