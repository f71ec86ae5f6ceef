"""Listeners that route by the TLS ClientHello: one accept loop for the routes sharing it.

Routes whose `match` names SNI host names or ALPN protocols may share one listen
address. Such a listener is not any one route's: a connection's route is known only
once its ClientHello is in. So the listener gets a runtime of its own, its *acceptor*:
it accepts (within the relay's fd headroom and global limit), holds the connection while
the hello is peeked (tls_peek.py), and then hands it to the route its SNI and ALPN choose
(sni_table.py), which takes it under its own max_connections, allow/deny and per-source
limits, as if it had accepted it. A connection that no route takes, or whose hello never
comes whole, ends on the acceptor, whose counters carry the listen address as their
route name (no route name can hold a ':'), for `no_route` and `tls_inspect_failed`.

The acceptor's route is a copy of the first route on the listener with the listener's
own settings, which the config requires to be equal on every route sharing it (the PROXY
protocol settings, defer_accept, tls_inspect_timeout, tls_max_client_hello), and none of
a route's own (no upstreams, rules or per-source limit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from splicerelay.config import Route
from splicerelay.config.model import MAX_CONNECTIONS_LIMIT
from splicerelay.datapath.stats import RelayStats
from splicerelay.relay.routes import RouteRuntime
from splicerelay.relay.sni_table import SniTable, shared_listeners


@dataclass(eq=False)
class TlsRouting:
    """What an acceptor needs after the peek: the table, and each route's runtime."""

    table: SniTable
    runtimes: dict[str, RouteRuntime]

    def choose(self, server_name: str | None, alpn: Sequence[str]) -> RouteRuntime | None:
        route = self.table.choose(server_name, alpn)
        return None if route is None else self.runtimes[route.name]


def acceptor_route(routes: Sequence[Route]) -> Route:
    """The route an acceptor runs as: the listener's settings, no route's own.

    Its max_connections bounds the connections that wait for their hello at once: as
    many as all its routes may hold, so that inspecting never holds back what the routes
    could take.
    """
    first = routes[0]
    return dataclasses.replace(
        first,
        name=str(first.listen),
        upstreams=(),
        match=None,
        allow=(),
        deny=(),
        max_connections=min(sum(route.max_connections for route in routes), MAX_CONNECTIONS_LIMIT),
        max_connections_per_source=None,
        max_duration=None,
        health_check=None,
        proxy_protocol="none",
    )


def make_acceptors(runtimes: Sequence[RouteRuntime], stats: RelayStats) -> list[RouteRuntime]:
    """An acceptor for each listener that routes by ClientHello; its routes stop
    accepting on their own (`accepts` False). The acceptors share the routes' listener."""
    by_name = {runtime.route.name: runtime for runtime in runtimes}
    acceptors = []
    for routes in shared_listeners([runtime.route for runtime in runtimes]).values():
        members = {route.name: by_name[route.name] for route in routes}
        for member in members.values():
            member.accepts = False
        route = acceptor_route(routes)
        route_stats = stats.route(route.name)
        route_stats.inspects_tls = True
        first = members[routes[0].name]
        acceptors.append(
            RouteRuntime(
                route=route,
                listener=first.listener,
                upstreams=[],
                # Never asked: an acceptor connects nowhere (a balancer needs members).
                strategy=first.strategy,
                stats=route_stats,
                slots=trio.Semaphore(route.max_connections),
                tls=TlsRouting(SniTable.build(routes), members),
            )
        )
    return acceptors
