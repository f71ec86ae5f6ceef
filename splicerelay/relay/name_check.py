"""`splicerelay check --resolve`: resolve the upstream names as the relay would at start.

Like `nginx -t`, which fails on a host it cannot find, a name that does not resolve is an
error naming its file and line; a name that does is reported with the addresses that
would become its members. Plain `check` never calls the resolver: it works offline and
stays quick.
"""

from __future__ import annotations

import socket
from typing import Any

from splicerelay.config import Config, ConfigError, Upstream
from splicerelay.config.addresses import TcpAddress
from splicerelay.config.nodes import NodeReader, compose, line_of
from splicerelay.datapath.session import UpstreamTarget
from splicerelay.protocol.membership import chosen_addresses
from splicerelay.relay.upstreams import GetAddrInfo, ResolveError, needs_resolving, resolve_all

# A composed YAML node, as config.nodes hands them out (this layer does not import yaml).
Node = Any
# Where each upstream address sits in the file: (route index, upstream index) -> line.
AddressLines = dict[tuple[int, int], int]


def check_names(
    config: Config, text: str, getaddrinfo: GetAddrInfo = socket.getaddrinfo
) -> list[str]:
    """Resolve every upstream host name of `config` (blocking), read from `text`.

    Returns one line per name, what it resolves to; raises ConfigError with one
    `FILE:LINE: KEYPATH: message` line per name that does not resolve.
    """
    lines = address_lines(text, config.source)
    notes: list[str] = []
    errors: list[str] = []
    for route_index, route in enumerate(config.routes):
        for index, upstream in enumerate(route.upstreams):
            address = upstream.address
            if not isinstance(address, TcpAddress) or not needs_resolving(address):
                continue
            try:
                found = resolve_all(address, getaddrinfo)
            except ResolveError as error:
                line = lines.get((route_index, index), 1)
                path = f"routes[{route_index}].upstreams[{index}].address"
                errors.append(f"{config.source}:{line}: {path}: {error}")
                continue
            notes.append(f"# route {route.name}: {describe(upstream, found)}")
    if errors:
        raise ConfigError(errors)
    return notes


def describe(upstream: Upstream, found: list[UpstreamTarget]) -> str:
    """`name:port -> address, ...`, and what `resolve: first` leaves out."""
    members = chosen_addresses(found, upstream.resolve)
    text = f"{upstream.address} -> {', '.join(endpoint(target) for target in members)}"
    left_out = [target for target in found if target not in members]
    if left_out:
        text += f" (resolve: first; not used: {', '.join(endpoint(t) for t in left_out)})"
    return text


def endpoint(target: UpstreamTarget) -> str:
    host, port = target.sockaddr[0], target.sockaddr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def address_lines(text: str, filename: str) -> AddressLines:
    """The line of every `routes[i].upstreams[j].address` in `text`, merge keys and all.

    The config has already been validated, so the shape is known; anything unexpected
    just leaves an entry out (and the message falls back to line 1).
    """
    found: AddressLines = {}
    reader = NodeReader(filename)  # its problems are not ours: the config is valid
    try:
        root = compose(text, filename)
    except ConfigError:
        return found
    for route_index, route in enumerate(_items(reader, root, "routes")):
        for index, upstream in enumerate(_items(reader, route, "upstreams")):
            node = _field(reader, upstream, "address")
            if node is not None:
                found[(route_index, index)] = line_of(node)
    return found


def _field(reader: NodeReader, node: Node | None, key: str) -> Node | None:
    """The value of `key` in the mapping `node` (merge keys expanded), if it is there."""
    if node is None:
        return None
    mapping = reader.mapping(node, "", (key,))
    return None if mapping is None else mapping.fields.get(key)


def _items(reader: NodeReader, node: Node | None, key: str) -> list[Node]:
    """The items of the list at `key` in the mapping `node`; none if it is not a list."""
    value = _field(reader, node, key)
    return [] if value is None else (reader.sequence(value, "") or [])
