"""Checks across the file on listen addresses: nothing listens twice on one address,
except routes that share a listener and are told apart by the TLS ClientHello.

Routes may share a listen address when every route on it but at most one (the
fallback) has a `match`. Such a listener peeks at each connection's ClientHello and then
picks the route (relay/sni_table.py), so:
- no SNI name may be in the match of two of its routes, and no protocol in two matches
  on ALPN alone: the choice would be ambiguous;
- it has at most one fallback;
- the settings it applies before it knows the route (the PROXY header, TCP_DEFER_ACCEPT,
  the hello's own limits) must be the same on all its routes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from splicerelay.config.addresses import ListenAddress
from splicerelay.config.model import Route
from splicerelay.config.nodes import CheckedMapping, NodeReader, line_of, position
from splicerelay.config.schema_match import MatchSource
from splicerelay.config.units import format_duration, format_size


@dataclass(frozen=True)
class Listener:
    """A configured listen address, to find two things listening on the same one.

    Two routes saying the same `systemd:NAME` are duplicates too, unless they share it
    by match: both would want the one socket passed under that name. `matched` is None
    for what is not a route (the metrics endpoint), which shares with nothing."""

    address: ListenAddress
    owner: str
    path: str
    node: yaml.Node | None  # None for the default metrics address, written nowhere
    matched: bool | None = None


@dataclass(frozen=True)
class RouteSource:
    """A valid route and the mapping it was read from, for the checks across routes."""

    route: Route
    section: CheckedMapping
    match: MatchSource | None


def _bool(value: Any) -> str:
    return "true" if value else "false"


def _networks(value: Any) -> str:
    return "[" + ", ".join(str(network) for network in value) + "]"


# The settings a shared listener applies to a connection before it knows its route,
# each with how to write its value in a message: the PROXY header comes before the
# hello, TCP_DEFER_ACCEPT is a socket option of the listener, and the hello's wait and
# size bound the peek that finds the route.
SHARED_SETTINGS: dict[str, Callable[[Any], str]] = {
    "accept_proxy_protocol": _bool,
    "proxy_protocol_trusted": _networks,
    "proxy_protocol_timeout": format_duration,
    "proxy_protocol_max_header": format_size,
    "defer_accept": _bool,
    "tls_inspect_timeout": format_duration,
    "tls_max_client_hello": format_size,
}


def _same(key: str, first: Any, other: Any) -> bool:
    if key == "proxy_protocol_trusted":
        # A list of networks: its order does not change which peers are trusted.
        return set(first) == set(other)
    return bool(first == other)


def check_listen_addresses(
    reader: NodeReader,
    listeners: Sequence[Listener],
    sources: Sequence[RouteSource],
    default_nodes: Mapping[str, yaml.Node],
) -> None:
    """Report every listen address used twice where it may not be, and every conflict
    between the routes that share one."""

    def where_written(listener: Listener) -> tuple[int, int]:
        return (-1, -1) if listener.node is None else position(listener.node)

    groups: dict[ListenAddress, list[Listener]] = {}
    for listener in sorted(listeners, key=where_written):
        groups.setdefault(listener.address, []).append(listener)
    shared: set[ListenAddress] = set()
    for address, group in groups.items():
        if len(group) < 2:
            continue
        if all(one.matched is not None for one in group) and any(one.matched for one in group):
            shared.add(address)
            _check_one_fallback(reader, address, group)
        else:
            _report_taken(reader, group)
    by_address: dict[ListenAddress, list[RouteSource]] = {}
    for source in sources:
        by_address.setdefault(source.route.listen, []).append(source)
    for address, routes in by_address.items():
        if address in shared:
            _check_names(reader, address, routes)
            _check_alpn_only(reader, address, routes)
            _check_settings(reader, address, routes, default_nodes)


def _report_taken(reader: NodeReader, group: list[Listener]) -> None:
    first = group[0]
    for listener in group[1:]:
        if listener.node is None:
            continue
        where = "" if first.node is None else f" (line {line_of(first.node)})"
        default = " (the default metrics.listen)" if first.node is None else ""
        reader.report(
            listener.node,
            listener.path,
            f"{listener.address} is already used by {first.owner}{where}{default}",
        )


def _check_one_fallback(reader: NodeReader, address: ListenAddress, group: list[Listener]) -> None:
    fallbacks = [listener for listener in group if not listener.matched]
    for listener in fallbacks[1:]:
        first = fallbacks[0]
        assert listener.node is not None and first.node is not None  # routes are written
        reader.report(
            listener.node,
            listener.path,
            f"{address} already has a route without match, {first.owner}"
            f" (line {line_of(first.node)}): of the routes that share a listener, all but"
            " one (the fallback) need a match",
        )


def _check_names(reader: NodeReader, address: ListenAddress, routes: list[RouteSource]) -> None:
    seen: dict[str, RouteSource] = {}
    for source in routes:
        if source.match is None:
            continue
        for name, written in source.match.names.items():
            first = seen.setdefault(name, source)
            if first is source:
                continue
            assert first.match is not None
            reader.report(
                written.node,
                written.path,
                f"{name!r} is also in the match of route {first.route.name!r}"
                f" (line {line_of(first.match.names[name].node)}), which shares {address}:"
                " a name goes to one route of a listener",
            )


def _check_alpn_only(reader: NodeReader, address: ListenAddress, routes: list[RouteSource]) -> None:
    """Routes that match on ALPN alone may not list the same protocol: a hello that
    offers it would match both. (With sni as well, the names tell routes apart.)"""
    seen: dict[str, RouteSource] = {}
    for source in routes:
        if source.match is None or source.match.names:
            continue
        for protocol, written in source.match.protocols.items():
            first = seen.setdefault(protocol, source)
            if first is source:
                continue
            assert first.match is not None
            reader.report(
                written.node,
                written.path,
                f"{protocol!r} is also in route {first.route.name!r}'s alpn"
                f" (line {line_of(first.match.protocols[protocol].node)}); both match on"
                f" alpn alone on {address}, so a hello offering {protocol!r} would match both",
            )


def _check_settings(
    reader: NodeReader,
    address: ListenAddress,
    routes: list[RouteSource],
    default_nodes: Mapping[str, yaml.Node],
) -> None:
    first = routes[0]
    for other in routes[1:]:
        for key, show in SHARED_SETTINGS.items():
            ours, theirs = getattr(other.route, key), getattr(first.route, key)
            if _same(key, theirs, ours):
                continue
            node, note = _setting_at(other.section, key, default_nodes)
            first_node, first_note = _setting_at(first.section, key, default_nodes)
            reader.report(
                node,
                f"{other.section.path}.{key}",
                f"{show(ours)}{note} here, but route {first.route.name!r}"
                f" (line {line_of(first_node)}) has {show(theirs)}{first_note}, and both"
                f" listen on {address}: a shared listener applies {key} before it knows"
                " which route a connection takes, so every route on it must have the same",
            )


def _setting_at(
    section: CheckedMapping, key: str, default_nodes: Mapping[str, yaml.Node]
) -> tuple[yaml.Node, str]:
    """Where a route got `key` from: its own key, else (at its listen) `defaults` or the
    built-in default, said in a note after the value."""
    if key in section.fields:
        return section.fields[key], ""
    listen = section.fields["listen"]
    if key in default_nodes:
        return listen, f" (from defaults, line {line_of(default_nodes[key])})"
    return listen, " (the default)"
