"""Which socket passed by the service manager serves which route (socket activation).

The rules, in order, for a route named N whose `listen` is L:

- `listen: systemd:NAME` takes the one socket passed under NAME (FileDescriptorName=),
  whatever it is bound to. None passed under NAME, or more than one, is an error.
- Otherwise a passed socket bound to L serves the route, whatever its name.
- Otherwise a passed socket named N that is bound elsewhere is an error: the config and
  the socket unit disagree, and serving on either address would surprise someone.
  (Before, the name won and the relay served where the socket unit said, while its logs
  said L.)
- Otherwise the relay binds L itself.

One passed socket serves one route. A reload cannot change the listen of a route that a
passed socket serves: the relay cannot rebind what systemd bound, and systemd would
keep the old socket listening with nobody accepting on it.

A worker process receives its supervisor's sockets the same way (workers/contract.py).
Those the supervisor bound itself are not `kept`: they are named after their route and
taken by that name, since the supervisor matched them to the route already.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

from splicerelay.config.addresses import Address, ListenAddress, SystemdSocketAddress, UnixAddress
from splicerelay.ops.systemd import PassedSocket
from splicerelay.relay.upstreams import ResolveError, resolve

# Who holds a socket now: the listen address it serves under, and the route's name;
# keyed by id() of the socket object.
Holders = Mapping[int, tuple[ListenAddress, str]]


class ListenError(Exception):
    """A listener cannot be had (port in use, permission, name does not resolve, a passed
    socket that disagrees with the config)."""


def claim_passed(
    route_name: str,
    address: ListenAddress,
    unclaimed: Sequence[PassedSocket],
    every: Sequence[PassedSocket],
    holders: Holders,
) -> PassedSocket | None:
    """The unclaimed passed socket that route `route_name` listening on `address` takes,
    or None when it binds its own; ListenError when the passed sockets and the config
    disagree. `every` is every passed socket still open, claimed or not."""
    from_manager = [item for item in every if item.kept]
    moved = _held_by_route(route_name, address, from_manager, holders)
    if moved is not None:
        raise ListenError(moved)
    if isinstance(address, SystemdSocketAddress):
        return _by_name(address, unclaimed, from_manager, holders)
    # A worker's copy of a listener that its supervisor bound for this very route.
    handed = next((item for item in unclaimed if not item.kept and item.name == route_name), None)
    if handed is not None:
        return handed
    for item in [*unclaimed, *from_manager]:
        if same_address(item.sock, address):
            if _is_among(item, unclaimed):
                return item
            raise ListenError(_already_held(item, holders))
    named = [item for item in from_manager if item.name == route_name]
    if named:
        raise ListenError(
            f"systemd passed the socket {describe_passed(named[0])}, but the route's listen"
            f" is {address}; make them agree, or write `listen: systemd:{named[0].name}` to"
            f" take whatever systemd passes as {named[0].name!r}"
        )
    return None


def _held_by_route(
    route_name: str, address: ListenAddress, from_manager: Sequence[PassedSocket], holders: Holders
) -> str | None:
    """Why a reload cannot give route `route_name` the listen `address`, or None.

    Any listener the route holds under another address comes from the config running
    now (each route takes its listener once per config)."""
    for item in from_manager:
        held = holders.get(id(item.sock))
        if held is not None and held[1] == route_name and held[0] != address:
            return (
                f"the route listens on the socket systemd passed as {describe_passed(item)}"
                f" (listen: {held[0]}); a reload cannot change that to {address}: change"
                " the socket unit if need be, then restart"
            )
    return None


def _by_name(
    address: SystemdSocketAddress,
    unclaimed: Sequence[PassedSocket],
    from_manager: Sequence[PassedSocket],
    holders: Holders,
) -> PassedSocket:
    named = [item for item in from_manager if item.name == address.name]
    if not named:
        if from_manager:
            passed = ", ".join(repr(item.name) for item in from_manager)
            what = f"passed sockets named {passed} only"
        else:
            what = "passed no socket (LISTEN_FDS is not set for this process)"
        raise ListenError(
            f"listen is {address}, but systemd {what}; name the socket with"
            f" FileDescriptorName={address.name} in its socket unit"
        )
    if len(named) > 1:
        sockets = ", ".join(describe_passed(item) for item in named)
        raise ListenError(
            f"listen is {address}, but systemd passed {len(named)} sockets under that"
            f" name ({sockets}); a route listens on one: give each its own"
            " FileDescriptorName= (one socket unit each)"
        )
    chosen = named[0]
    if not _is_among(chosen, unclaimed):
        raise ListenError(_already_held(chosen, holders))
    return chosen


def _already_held(item: PassedSocket, holders: Holders) -> str:
    held = holders.get(id(item.sock))
    owner = f"route {held[1]!r} (listen: {held[0]})" if held else "another route"
    return (
        f"the socket systemd passed as {describe_passed(item)} serves {owner} already;"
        " one passed socket serves one route"
    )


def _is_among(item: PassedSocket, items: Sequence[PassedSocket]) -> bool:
    return any(item is other for other in items)


def describe_passed(item: PassedSocket) -> str:
    """`'web' (fd 3) bound to 127.0.0.1:8080`, for error messages."""
    return f"{item.name!r} (fd {item.sock.fileno()}) bound to {bound_address(item.sock)}"


def bound_address(sock: socket.socket) -> str:
    """Where `sock` really is bound, written as the config writes addresses."""
    try:
        bound = sock.getsockname()
    except OSError as error:
        return f"an unknown address ({error.strerror})"
    if sock.family == socket.AF_UNIX:
        if isinstance(bound, bytes):  # Why: Python returns an abstract name as bytes
            return f"unix:@{bound[1:].decode(errors='replace')}"
        return f"unix:{bound}" if bound else "an unnamed unix socket"
    host, port = bound[0], bound[1]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def listening_on(address: ListenAddress, sock: socket.socket) -> str:
    """What a route listens on, as the logs say it: the address its socket is really
    bound to, and for `systemd:NAME` that name beside it."""
    bound = bound_address(sock)
    return f"{bound} ({address})" if isinstance(address, SystemdSocketAddress) else bound


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
