"""Routes while they run: listener, upstreams, strategy and limits; client addresses.

Everything that may block (name resolution, binding) happens in `prepare_routes`, before
the first connection is accepted, so the event loop never calls getaddrinfo per connection.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from splicerelay.config import Config, Route
from splicerelay.datapath.stats import RelayStats, RouteStats
from splicerelay.protocol.balancer import Strategy, make_strategy
from splicerelay.relay.admin_store import AdminStore
from splicerelay.relay.listeners import ListenError, ListenerSet
from splicerelay.relay.upstreams import ResolveError, UpstreamRuntime, make_upstreams

if TYPE_CHECKING:
    from splicerelay.relay.tls_routing import TlsRouting

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Endpoint = tuple[str, int]


class StartupError(Exception):
    """A route cannot start (name does not resolve, port in use, ...)."""


def format_endpoint(endpoint: Endpoint | None) -> str:
    if endpoint is None:
        return "unix"
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint_of(family: int, address: object) -> Endpoint | None:
    """(ip, port) of an inet socket address; None for unix sockets."""
    if family == socket.AF_UNIX or not isinstance(address, tuple):
        return None
    return (str(address[0]), int(address[1]))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of `host`; an IPv4-mapped IPv6 address (a dual-stack listener's
    IPv4 client) as the IPv4 address it is, so that IPv4 networks match it."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_allowed(host: str, allow: Sequence[IPNetwork], deny: Sequence[IPNetwork]) -> bool:
    """Deny wins over allow; an empty allow list allows everyone not denied."""
    address = _ip(host)
    if any(address in network for network in deny):
        return False
    return not allow or any(address in network for network in allow)


def passes_rules(route: Route, client: Endpoint | None) -> bool:
    """Whether `client` gets past the route's allow and deny lists.

    A unix socket client has no address for the lists to name: only the socket file's
    permissions decide who may connect there.
    """
    if client is None or not (route.allow or route.deny):
        return True
    return is_allowed(client[0], route.allow, route.deny)


def is_trusted(route: Route, peer: Endpoint | None) -> bool:
    """Whether `peer` may send the route a PROXY header (`proxy_protocol_trusted`).

    An empty list trusts every peer (the config warns about it). A unix socket peer has
    no address, so it is in no list: on a unix listener, only an empty list lets a
    header through.
    """
    trusted = route.proxy_protocol_trusted
    if not trusted:
        return True
    if peer is None:
        return False
    address = _ip(peer[0])
    return any(address in network for network in trusted)


@dataclass(eq=False)
class RouteRuntime:
    """A route while it runs: its listener, upstreams, strategy, limit and sessions.

    `admin` holds the operator's settings for the route's members (the relay's store,
    shared by every route; applied to members as they come, e.g. by a DNS refresh).
    """

    route: Route
    listener: socket.socket
    upstreams: list[UpstreamRuntime]
    strategy: Strategy
    stats: RouteStats
    slots: trio.Semaphore
    # Open connections per client address, for max_connections_per_source.
    per_source: dict[str, int] = field(default_factory=dict)
    # Cancels this runtime's accept loop and upstream tasks (on reload or shutdown);
    # its sessions live on in the relay's session nursery.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    admin: AdminStore = field(default_factory=AdminStore)
    # False for a route on a listener that routes by ClientHello: the listener's
    # acceptor accepts for it and hands it its connections (tls_routing.py).
    accepts: bool = True
    # Set on such an acceptor only: where its connections go once their hello is in.
    tls: TlsRouting | None = None
    # Connections a TLS-routing listener holds for one of this route's slots, and since
    # when at least one has waited (limit_wait_seconds counts that time once).
    slot_waiters: int = 0
    slot_wait_started: float = 0.0

    def attempt_order(self, client_ip: str | None) -> list[int]:
        upstreams = self.upstreams
        # Drained and maint members are left out as down ones are (balancer.available).
        order = self.strategy.attempt_order(
            client_ip,
            [upstream.takes_new_connections for upstream in upstreams],
            [upstream.stats.active for upstream in upstreams],
        )
        limit = self.route.max_connect_attempts
        return order[:limit] if limit else order

    def set_members(self, members: list[UpstreamRuntime]) -> None:
        """Balance over `members` from now on, with their weights as they are now.

        The strategy and the list change together, with no checkpoint between:
        attempt_order indexes the list with the strategy's answer.
        """
        self.strategy = strategy_for(self.route, members)
        self.upstreams = members

    def apply_admin(self) -> None:
        """Give every member the operator's settings from `admin` (see admin_store.py)."""
        if self.admin.apply(self.route.name, self.upstreams):
            self.set_members(self.upstreams)


def strategy_for(route: Route, members: Sequence[UpstreamRuntime]) -> Strategy:
    """A fresh strategy of the route's kind over `members` and their current weights."""
    return make_strategy(
        route.balance, [member.label for member in members], [member.weight for member in members]
    )


def prepare_routes(config: Config, stats: RelayStats, listeners: ListenerSet) -> list[RouteRuntime]:
    """Resolve every upstream and take every listener, or raise StartupError.

    Blocking (getaddrinfo, bind): run it before serving or in a worker thread. On
    failure, listeners that this call opened are closed again; kept ones stay.
    """
    runtimes: list[RouteRuntime] = []
    before = listeners.addresses()
    try:
        for route in config.routes:
            route_stats = stats.route(route.name)
            try:
                upstreams = make_upstreams(
                    route.upstreams, route.health_check, route_stats.upstream, route=route.name
                )
                listener = listeners.take(route.name, route.listen)
                listeners.check_defer_accept(route.listen, route.defer_accept)
            except (ListenError, ResolveError) as error:
                raise StartupError(f"route {route.name}: {error}") from None
            if listener.family in (socket.AF_INET, socket.AF_INET6):
                # Why on the listener: Linux copies TCP_NODELAY to every socket accept()
                # returns, which saves a setsockopt per connection (see prepare_accepted).
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            runtimes.append(
                RouteRuntime(
                    route=route,
                    listener=listener,
                    upstreams=upstreams,
                    strategy=strategy_for(route, upstreams),
                    stats=route_stats,
                    slots=trio.Semaphore(route.max_connections),
                )
            )
        # Why only once every route has its listener: a reload refused on a later route
        # leaves the kept listeners as the running config set them.
        for runtime in runtimes:
            listeners.apply_defer_accept(runtime.route.listen, runtime.route.defer_accept)
    except BaseException:
        listeners.close_except(before, lambda sock: sock.close())
        raise
    return runtimes


def forget_removed_upstreams(runtimes: Sequence[RouteRuntime]) -> None:
    """Drop the per-upstream series of upstreams no longer configured."""
    for runtime in runtimes:
        current = {upstream.label for upstream in runtime.upstreams}
        for label in list(runtime.stats.upstreams):
            if label not in current:
                del runtime.stats.upstreams[label]
