"""The schema of `routes` and `defaults`: each route's keys, types and defaults, its
upstreams, and the tunables a route inherits from `defaults` (the health check's keys
are in schema_health.py, the match's in schema_match.py)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import yaml

from splicerelay.config.addresses import (
    AddressError,
    ListenAddress,
    SystemdSocketAddress,
    TcpAddress,
    UnixAddress,
    parse_listen_address,
)
from splicerelay.config.model import (
    ALLOW_APPLIES_TO,
    BALANCE_STRATEGIES,
    MAX_CONNECT_ATTEMPTS_LIMIT,
    MAX_CONNECTIONS_LIMIT,
    MAX_PIPE_SIZE,
    MAX_PROXY_PROTOCOL_MAX_HEADER,
    MAX_TLS_MAX_CLIENT_HELLO,
    MAX_WEIGHT,
    MIN_PIPE_SIZE,
    MIN_PROXY_PROTOCOL_MAX_HEADER,
    MIN_TLS_MAX_CLIENT_HELLO,
    PROXY_PROTOCOL_VERSIONS,
    UPSTREAM_RESOLVE_MODES,
    Network,
    Route,
    Tunables,
    Upstream,
    route_with,
)
from splicerelay.config.nodes import (
    CheckedMapping,
    child_path,
    line_of,
    quote,
)
from splicerelay.config.schema_health import read_health_check
from splicerelay.config.schema_match import MatchSource, match_fits, read_match
from splicerelay.config.schema_shared import Listener, RouteSource
from splicerelay.config.values import ValueReader

TUNABLE_KEYS = (
    "connect_timeout",
    "idle_timeout",
    "max_duration",
    "pipe_size",
    "max_connections",
    "max_connect_attempts",
    "max_connections_per_source",
    "proxy_protocol_timeout",
    "resolve_interval",
    "proxy_protocol_max_header",
    "defer_accept",
    "tls_inspect_timeout",
    "tls_max_client_hello",
)
ROUTE_KEYS = (
    "name",
    "listen",
    "match",
    "upstreams",
    "balance",
    "proxy_protocol",
    "accept_proxy_protocol",
    "proxy_protocol_trusted",
    "allow",
    "deny",
    "allow_applies_to",
    "health_check",
    *TUNABLE_KEYS,
)
UPSTREAM_KEYS = ("address", "weight", "resolve")

_ROUTE_NAME = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)


class RouteReader(ValueReader):
    """Reads `defaults` and `routes`, and notes every listen address in `listeners` and
    every valid route in `sources`, for the checks across routes (schema_shared.py)."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename)
        self.listeners: list[Listener] = []
        self.sources: list[RouteSource] = []
        # The nodes of the keys `defaults` sets, to say where a route got a setting from.
        self.default_nodes: dict[str, yaml.Node] = {}

    def tunables(self, node: yaml.Node, path: str, base: Tunables) -> Tunables:
        misplaced = "can only be set in each route, not in defaults"
        section = self.mapping(node, path, TUNABLE_KEYS, elsewhere=ROUTE_KEYS, misplaced=misplaced)
        if section is None:
            return base
        self.default_nodes = dict(section.fields)
        return self.overrides(section, base)

    def overrides(self, section: CheckedMapping, base: Tunables) -> Tunables:
        """`base` with the tunables `section` sets; a bad value is reported, and ignored.

        The optional limits may be set to null, so that a route can lift a limit its
        defaults set."""
        readers: dict[str, Callable[[yaml.Node, str], float | int | bool | None]] = {
            "connect_timeout": self.duration,
            "idle_timeout": self.duration,
            "max_duration": lambda node, path: self.duration(node, path, or_null=True),
            "pipe_size": lambda node, path: self.size(node, path, MIN_PIPE_SIZE, MAX_PIPE_SIZE),
            "max_connections": lambda node, path: self.integer(
                node, path, 1, MAX_CONNECTIONS_LIMIT
            ),
            "max_connect_attempts": lambda node, path: self.integer(
                node, path, 1, MAX_CONNECT_ATTEMPTS_LIMIT, or_null=True
            ),
            "proxy_protocol_timeout": self.duration,
            "resolve_interval": self.duration,
            "max_connections_per_source": lambda node, path: self.integer(
                node, path, 1, MAX_CONNECTIONS_LIMIT, or_null=True
            ),
            "proxy_protocol_max_header": lambda node, path: self.size(
                node, path, MIN_PROXY_PROTOCOL_MAX_HEADER, MAX_PROXY_PROTOCOL_MAX_HEADER
            ),
            "defer_accept": self.boolean,
            "tls_inspect_timeout": self.duration,
            "tls_max_client_hello": lambda node, path: self.size(
                node, path, MIN_TLS_MAX_CLIENT_HELLO, MAX_TLS_MAX_CLIENT_HELLO
            ),
        }
        changes: dict[str, Any] = {}
        for key, read in readers.items():
            if key in section.fields:
                # None is either an accepted null or a reported problem: tell them apart
                # by whether a problem was reported.
                problems = len(self.problems)
                value = read(section.fields[key], child_path(section.path, key))
                if len(self.problems) == problems:
                    changes[key] = value
        return dataclasses.replace(base, **changes)

    def routes(self, top: CheckedMapping, defaults: Tunables) -> list[Route]:
        node = self.required(top, "routes")
        items = None if node is None else self.sequence(node, "routes")
        if node is None or items is None:
            return []
        if not items:
            self.report(node, "routes", "must list at least one route")
        routes: list[Route] = []
        names: dict[str, int] = {}
        for index, item in enumerate(items):
            route = self.route(item, f"routes[{index}]", defaults, names)
            if route is not None:
                routes.append(route)
        return routes

    def route(
        self, node: yaml.Node, path: str, defaults: Tunables, names: dict[str, int]
    ) -> Route | None:
        section = self.mapping(node, path, ROUTE_KEYS)
        if section is None:
            return None
        fields = section.fields
        name = self.route_name(section, names)
        listen = self.listen(section, name or path)
        upstreams = self.upstreams(section)
        balance: str | None = BALANCE_STRATEGIES[0]
        if "balance" in fields:
            balance = self.choice(fields["balance"], f"{path}.balance", BALANCE_STRATEGIES)
        proxy_protocol: str | None = PROXY_PROTOCOL_VERSIONS[0]
        if "proxy_protocol" in fields:
            proxy_protocol = self.choice(
                fields["proxy_protocol"], f"{path}.proxy_protocol", PROXY_PROTOCOL_VERSIONS
            )
        accept_proxy_protocol: bool | None = False
        if "accept_proxy_protocol" in fields:
            accept_proxy_protocol = self.boolean(
                fields["accept_proxy_protocol"], f"{path}.accept_proxy_protocol"
            )
        health_check = None
        problems = len(self.problems)
        if "health_check" in fields:
            health_check = read_health_check(self, fields["health_check"], f"{path}.health_check")
        health_check_valid = len(self.problems) == problems
        match: MatchSource | None = None
        if "match" in fields:
            match = read_match(self, fields["match"], f"{path}.match")
        tunables = self.overrides(section, defaults)
        allow = self.networks(fields["allow"], f"{path}.allow") if "allow" in fields else ()
        deny = self.networks(fields["deny"], f"{path}.deny") if "deny" in fields else ()
        trusted: tuple[Network, ...] = ()
        if "proxy_protocol_trusted" in fields:
            trusted = self.networks(
                fields["proxy_protocol_trusted"], f"{path}.proxy_protocol_trusted"
            )
        allow_applies_to: str | None = ALLOW_APPLIES_TO[0]
        if "allow_applies_to" in fields:
            allow_applies_to = self.choice(
                fields["allow_applies_to"], f"{path}.allow_applies_to", ALLOW_APPLIES_TO
            )
        if name is None or listen is None or upstreams is None or balance is None:
            return None
        if proxy_protocol is None or accept_proxy_protocol is None or not health_check_valid:
            return None
        if allow_applies_to is None or ("match" in fields and match is None):
            return None
        if not self.defer_accept_fits(section, listen, tunables):
            return None
        if match is not None and not match_fits(self, section, listen):
            return None
        route = route_with(
            tunables,
            name=name,
            listen=listen,
            upstreams=upstreams,
            balance=balance,
            proxy_protocol=proxy_protocol,
            accept_proxy_protocol=accept_proxy_protocol,
            health_check=health_check,
            allow=allow,
            deny=deny,
            proxy_protocol_trusted=trusted,
            allow_applies_to=allow_applies_to,
            match=None if match is None else match.match,
        )
        self.sources.append(RouteSource(route, section, match))
        return route

    def defer_accept_fits(
        self, section: CheckedMapping, listen: ListenAddress, tunables: Tunables
    ) -> bool:
        """Whether the route's listener can take `defer_accept` as it is; reports why not.

        TCP_DEFER_ACCEPT is a TCP option: a unix socket has no handshake to hold back. A
        socket systemd passes (`systemd:NAME`) takes it from its socket unit's
        DeferAcceptSec=, which the relay leaves as the unit set it (see
        relay/listeners.py). Set in `defaults`, the error is reported at the route's
        listen, naming the line in `defaults`, since the fix is on the route."""
        if not tunables.defer_accept:
            return True
        if isinstance(listen, UnixAddress):
            why = f"{listen} is a unix socket, and TCP_DEFER_ACCEPT is for TCP listeners only"
        elif isinstance(listen, SystemdSocketAddress):
            why = (
                f"{listen} is a socket systemd passes, and its socket unit decides:"
                " set DeferAcceptSec= there (e.g. DeferAcceptSec=1)"
            )
        else:
            return True
        if "defer_accept" in section.fields:
            self.report(section.fields["defer_accept"], f"{section.path}.defer_accept", why)
        else:
            where = line_of(self.default_nodes["defer_accept"])
            self.report(
                section.fields["listen"],
                f"{section.path}.listen",
                f"defaults.defer_accept (line {where}) is true, but {why};"
                " set defer_accept: false on this route",
            )
        return False

    def route_name(self, section: CheckedMapping, names: dict[str, int]) -> str | None:
        node = self.required(section, "name")
        if node is None:
            return None
        path = f"{section.path}.name"
        name = self.string(node, path)
        if name is None:
            return None
        if not _ROUTE_NAME.fullmatch(name):
            self.report(
                node, path, f"bad route name {quote(name)} (letters, digits, '_', '.' and '-')"
            )
            return None
        line = line_of(node)
        if name in names:
            self.report(node, path, f"duplicate route name {name!r} (first on line {names[name]})")
            return None
        names[name] = line
        return name

    def listen(self, section: CheckedMapping, owner: str) -> ListenAddress | None:
        node = self.required(section, "listen")
        if node is None:
            return None
        path = f"{section.path}.listen"
        expected = "an address (host:port, [v6]:port, unix:/path or systemd:NAME)"
        text = self.string(node, path, expected)
        if text is None:
            return None
        try:
            address = parse_listen_address(text)
        except AddressError as error:
            self.report(node, path, str(error))
            return None
        if isinstance(address, TcpAddress) and address.port == 0:
            self.report(node, path, "port 0 is not allowed here (a listener needs a fixed port)")
            return None
        matched = "match" in section.fields
        self.listeners.append(Listener(address, f"route {owner!r}", path, node, matched))
        return address

    def upstreams(self, section: CheckedMapping) -> tuple[Upstream, ...] | None:
        node = self.required(section, "upstreams")
        if node is None:
            return None
        path = f"{section.path}.upstreams"
        items = self.sequence(node, path)
        if items is None:
            return None
        if not items:
            self.report(node, path, "must list at least one upstream")
            return None
        upstreams = [self.upstream(item, f"{path}[{index}]") for index, item in enumerate(items)]
        valid = [upstream for upstream in upstreams if upstream is not None]
        return tuple(valid) if len(valid) == len(upstreams) else None

    def upstream(self, node: yaml.Node, path: str) -> Upstream | None:
        section = self.mapping(node, path, UPSTREAM_KEYS)
        if section is None:
            return None
        weight: int | None = 1
        if "weight" in section.fields:
            weight = self.integer(section.fields["weight"], f"{path}.weight", 1, MAX_WEIGHT)
        resolve: str | None = UPSTREAM_RESOLVE_MODES[0]
        if "resolve" in section.fields:
            resolve = self.choice(
                section.fields["resolve"], f"{path}.resolve", UPSTREAM_RESOLVE_MODES
            )
        address_node = self.required(section, "address")
        if address_node is None:
            return None
        address = self.address(address_node, f"{path}.address")
        if isinstance(address, TcpAddress) and address.port == 0:
            self.report(address_node, f"{path}.address", "port 0 is not allowed for an upstream")
            return None
        if address is None or weight is None or resolve is None:
            return None
        return Upstream(address, weight, resolve)
