"""The routing table of a listener shared by routes: which route a ClientHello goes to.

Pure: the relay peeks at the hello, and hands its server name (SNI, lower case) and ALPN
list here. The order of precedence, each step a dict lookup:
1. a route with the exact name (and, if its match lists alpn, one of those offered);
2. a route with the wildcard `*.parent` for a name one label below parent (the `*`
   stands for exactly one label: `*.example.com` takes `a.example.com`, not
   `a.b.example.com` nor `example.com`), with the same rule on alpn;
3. a route that matches on alpn alone, for the first protocol the client offers that
   such a route lists (the client's order is its preference);
4. the listener's fallback, its route without match;
5. none: the connection is closed, outcome no_route.

A route whose match has sni and alpn needs both. The config refuses two routes of a
listener with the same name, or the same protocol in matches on alpn alone; given them
anyway, the first in config order that accepts the hello wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from splicerelay.config import Route, format_duration, format_size
from splicerelay.config.addresses import ListenAddress

WILDCARD_PREFIX = "*."


@dataclass(frozen=True)
class _Entry:
    """A route under one of its names, and the protocols it also needs (empty: any)."""

    route: Route
    alpn: frozenset[str]

    def accepts(self, offered: Sequence[str]) -> bool:
        return not self.alpn or not self.alpn.isdisjoint(offered)


def _alpn_text(protocols: Sequence[str]) -> str:
    return "alpn " + ",".join(protocols)


class SniTable:
    """The routes of one listen address, indexed for `choose`."""

    def __init__(
        self,
        exact: dict[str, tuple[_Entry, ...]],
        wildcard: dict[str, tuple[_Entry, ...]],
        alpn_only: dict[str, Route],
        fallback: Route | None,
    ) -> None:
        self._exact = exact
        self._wildcard = wildcard  # keyed by the parent: "example.com" for *.example.com
        self._alpn_only = alpn_only
        self.fallback = fallback

    @classmethod
    def build(cls, routes: Sequence[Route]) -> SniTable:
        """The table of the routes of ONE listen address, in config order."""
        exact: dict[str, list[_Entry]] = {}
        wildcard: dict[str, list[_Entry]] = {}
        alpn_only: dict[str, Route] = {}
        fallback: Route | None = None
        for route in routes:
            match = route.match
            if match is None or not (match.sni or match.alpn):
                # A match that asks for nothing (the config refuses one) takes any hello:
                # it is a fallback by another name.
                fallback = fallback or route
                continue
            entry = _Entry(route, frozenset(match.alpn))
            for name in match.sni:
                if name.startswith(WILDCARD_PREFIX):
                    wildcard.setdefault(name[len(WILDCARD_PREFIX) :], []).append(entry)
                else:
                    exact.setdefault(name, []).append(entry)
            if not match.sni:
                for protocol in match.alpn:
                    alpn_only.setdefault(protocol, route)
        return cls(
            {name: tuple(entries) for name, entries in exact.items()},
            {parent: tuple(entries) for parent, entries in wildcard.items()},
            alpn_only,
            fallback,
        )

    def choose(self, server_name: str | None, alpn: Sequence[str]) -> Route | None:
        """The route for a hello that offers `server_name` (lower case; None when it
        sends none) and the protocols `alpn`, or None when no route takes it."""
        if server_name:
            for entry in self._exact.get(server_name, ()):
                if entry.accepts(alpn):
                    return entry.route
            label, dot, parent = server_name.partition(".")
            if label and dot:
                for entry in self._wildcard.get(parent, ()):
                    if entry.accepts(alpn):
                        return entry.route
        for protocol in alpn:
            route = self._alpn_only.get(protocol)
            if route is not None:
                return route
        return self.fallback

    def describe(self) -> list[str]:
        """The table for people, one line per name, in the order of precedence:
        `what the hello offers -> route`."""
        rows: list[tuple[str, str]] = []
        for names, prefix in ((self._exact, ""), (self._wildcard, WILDCARD_PREFIX)):
            for name, entries in names.items():
                for entry in entries:
                    alpn = entry.route.match.alpn if entry.route.match else ()
                    offered = f"{prefix}{name}" + (f" {_alpn_text(alpn)}" if alpn else "")
                    rows.append((offered, entry.route.name))
        by_route: dict[str, list[str]] = {}
        for protocol, route in self._alpn_only.items():
            by_route.setdefault(route.name, []).append(protocol)
        for name, protocols in by_route.items():
            rows.append((f"any name or none, {_alpn_text(protocols)}", name))
        if self.fallback is None:
            rows.append(("anything else", "closed (no_route)"))
        else:
            rows.append(("anything else", self.fallback.name))
        width = max(len(offered) for offered, _ in rows)
        return [f"{offered.ljust(width)} -> {target}" for offered, target in rows]


def shared_listeners(routes: Sequence[Route]) -> dict[ListenAddress, list[Route]]:
    """listen address -> its routes, in config order, for each listener that routes by
    ClientHello: those where a route has a match (alone on it, or sharing it)."""
    groups: dict[ListenAddress, list[Route]] = {}
    for route in routes:
        groups.setdefault(route.listen, []).append(route)
    return {
        listen: group
        for listen, group in groups.items()
        if any(route.match is not None for route in group)
    }


def describe_listeners(routes: Sequence[Route]) -> list[str]:
    """The routing table of each listener that routes by ClientHello, for `check`."""
    lines: list[str] = []
    for listen, group in shared_listeners(routes).items():
        # A shared listener's routes agree on these (the config checks it).
        timeout = format_duration(group[0].tls_inspect_timeout)
        size = format_size(group[0].tls_max_client_hello)
        lines.append(
            f"listener {listen} routes by TLS ClientHello"
            f" (inspect timeout {timeout}, hello up to {size}):"
        )
        lines.extend(f"  {line}" for line in SniTable.build(group).describe())
    return lines
