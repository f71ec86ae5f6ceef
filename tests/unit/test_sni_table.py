"""The routing table of a shared listener: which route a ClientHello's SNI and ALPN pick,
and how `check` shows it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.config import Route, RouteMatch, Upstream, parse_config
from splicerelay.config.addresses import ListenAddress, TcpAddress, UnixAddress
from splicerelay.config.model import Tunables, route_with
from splicerelay.relay.sni_table import SniTable, describe_listeners, shared_listeners

LISTEN = TcpAddress("0.0.0.0", 443)


def route(
    name: str,
    sni: Sequence[str] = (),
    alpn: Sequence[str] = (),
    *,
    listen: ListenAddress = LISTEN,
    fallback: bool = False,
) -> Route:
    match = None if fallback else RouteMatch(tuple(sni), tuple(alpn))
    return route_with(
        Tunables(),
        name=name,
        listen=listen,
        upstreams=(Upstream(TcpAddress("127.0.0.1", 8000)),),
        balance="round_robin",
        allow=(),
        deny=(),
        match=match,
    )


APP = route("app", ["app.example.com", "*.app.example.com"])
API = route("api", ["api.example.com"], ["h2", "http/1.1"])
WILD = route("wild", ["*.example.com"])
GRPC = route("grpc", alpn=["grpc-exp", "h2"])
REST = route("rest", fallback=True)
TABLE = SniTable.build([APP, API, WILD, GRPC, REST])


def chosen(table: SniTable, server_name: str | None, alpn: Sequence[str] = ()) -> str | None:
    route = table.choose(server_name, alpn)
    return None if route is None else route.name


@pytest.mark.parametrize(
    ("server_name", "alpn", "expected"),
    [
        # exact names
        ("app.example.com", [], "app"),
        ("api.example.com", ["h2"], "api"),
        ("api.example.com", ["spdy/3", "http/1.1"], "api"),
        # an exact name whose alpn the client does not offer: the wildcard over it
        ("api.example.com", [], "wild"),
        ("api.example.com", ["spdy/3"], "wild"),
        # the wildcard is one label: app's own wildcard before the one above it
        ("x.app.example.com", [], "app"),
        ("www.example.com", [], "wild"),
        ("a.b.example.com", [], "rest"),
        ("a.b.example.com", ["h2"], "grpc"),
        ("example.com", [], "rest"),
        ("x.y.app.example.com", [], "rest"),
        # an exact name before the wildcard that also covers it
        ("app.example.com", ["h2"], "app"),
        # alpn alone, for any other name and for none
        ("other.org", ["grpc-exp"], "grpc"),
        (None, ["h2"], "grpc"),
        (None, ["http/1.1"], "rest"),
        # no name, no alpn: the fallback
        (None, [], "rest"),
        ("", [], "rest"),
        # names come in lower case: the table does not fold them itself
        ("APP.example.com", [], "wild"),
    ],
)
def test_the_order_of_precedence(server_name: str | None, alpn: list[str], expected: str) -> None:
    assert chosen(TABLE, server_name, alpn) == expected


def test_without_a_fallback_what_matches_nothing_has_no_route() -> None:
    table = SniTable.build([APP, API])
    assert table.fallback is None
    assert chosen(table, "app.example.com") == "app"
    assert chosen(table, "other.org") is None
    assert chosen(table, None) is None
    assert chosen(table, "api.example.com", ["http/1.0"]) is None


def test_a_route_with_sni_and_alpn_needs_both() -> None:
    table = SniTable.build([API])
    assert chosen(table, "api.example.com", ["h2"]) == "api"
    assert chosen(table, "api.example.com", []) is None
    assert chosen(table, None, ["h2"]) is None
    assert chosen(table, "other.org", ["h2"]) is None


def test_alpn_alone_follows_the_order_the_client_offers() -> None:
    grpc, web = route("grpc", alpn=["h2"]), route("web", alpn=["http/1.1"])
    table = SniTable.build([grpc, web])
    assert chosen(table, None, ["http/1.1", "h2"]) == "web"
    assert chosen(table, None, ["h2", "http/1.1"]) == "grpc"


def test_a_route_alone_on_its_listener_with_a_match() -> None:
    table = SniTable.build([APP])
    assert chosen(table, "app.example.com") == "app"
    assert chosen(table, "x.app.example.com") == "app"
    assert chosen(table, None) is None


def test_a_wildcard_needs_a_whole_label_in_front() -> None:
    table = SniTable.build([WILD])
    assert chosen(table, ".example.com") is None
    assert chosen(table, "example.com") is None
    assert chosen(table, "xexample.com") is None
    assert chosen(table, "a.example.com") == "wild"


def test_the_first_route_in_config_order_wins_where_the_config_would_refuse() -> None:
    first, second = route("first", ["a.example.com"]), route("second", ["a.example.com"])
    assert chosen(SniTable.build([first, second]), "a.example.com") == "first"
    fallbacks = [route("one", fallback=True), route("two", fallback=True)]
    assert chosen(SniTable.build(fallbacks), None) == "one"


def test_describe_lists_names_in_the_order_of_precedence() -> None:
    assert TABLE.describe() == [
        "app.example.com                    -> app",
        "api.example.com alpn h2,http/1.1   -> api",
        "*.app.example.com                  -> app",
        "*.example.com                      -> wild",
        "any name or none, alpn grpc-exp,h2 -> grpc",
        "anything else                      -> rest",
    ]


def test_describe_says_what_has_no_route_is_closed() -> None:
    assert SniTable.build([APP]).describe() == [
        "app.example.com   -> app",
        "*.app.example.com -> app",
        "anything else     -> closed (no_route)",
    ]


def test_shared_listeners_are_those_with_a_match_in_config_order() -> None:
    plain = route("plain", listen=TcpAddress("127.0.0.1", 80), fallback=True)
    alone = route("alone", ["a.example.com"], listen=TcpAddress("127.0.0.1", 8443))
    unix = route("unix", listen=UnixAddress("/run/u"), fallback=True)
    tables = shared_listeners([APP, plain, REST, alone, unix, API])
    assert list(tables) == [LISTEN, TcpAddress("127.0.0.1", 8443)]
    assert tables[LISTEN] == [APP, REST, API]
    assert tables[TcpAddress("127.0.0.1", 8443)] == [alone]


def test_describe_listeners_for_check() -> None:
    text = """\
defaults: {tls_inspect_timeout: 2s, tls_max_client_hello: 16KiB}
routes:
  - name: app
    listen: 0.0.0.0:443
    match: {sni: [app.example.com, "*.app.example.com"]}
    upstreams: [{address: 10.0.0.2:443}]
  - name: plain
    listen: 0.0.0.0:80
    upstreams: [{address: 10.0.0.2:80}]
  - name: api
    listen: 0.0.0.0:443
    match: {sni: [api.example.com], alpn: [h2, http/1.1]}
    upstreams: [{address: 10.0.0.3:443}]
  - name: fallback
    listen: 0.0.0.0:443
    upstreams: [{address: 10.0.0.4:443}]
  - name: alone
    listen: systemd:tls
    match: {alpn: [acme-tls/1]}
    upstreams: [{address: 10.0.0.5:443}]
"""
    routes = parse_config(text, "relay.yaml").routes
    assert describe_listeners(routes) == [
        "listener 0.0.0.0:443 routes by TLS ClientHello (inspect timeout 2s, hello up to 16KiB):",
        "  app.example.com                  -> app",
        "  api.example.com alpn h2,http/1.1 -> api",
        "  *.app.example.com                -> app",
        "  anything else                    -> fallback",
        "listener systemd:tls routes by TLS ClientHello (inspect timeout 2s, hello up to 16KiB):",
        "  any name or none, alpn acme-tls/1 -> alone",
        "  anything else                     -> closed (no_route)",
    ]
    assert describe_listeners([r for r in routes if r.match is None]) == []


# --- the dict lookups agree with a plain scan of the routes in config order ------------

_LABELS = ["a", "b", "c"]
_NAMES = st.lists(st.sampled_from(_LABELS), min_size=1, max_size=3).map(".".join)
_PATTERNS = st.one_of(_NAMES, _NAMES.map(lambda name: "*." + name))
_PROTOCOLS = st.sampled_from(["h2", "http/1.1", "x"])
_ROUTES = st.lists(
    st.tuples(
        st.booleans(),
        st.lists(_PATTERNS, max_size=3, unique=True),
        st.lists(_PROTOCOLS, max_size=2, unique=True),
    ),
    max_size=5,
).map(
    lambda specs: [
        route(f"r{index}", sni, alpn, fallback=fallback)
        for index, (fallback, sni, alpn) in enumerate(specs)
    ]
)


def _scan(routes: list[Route], server_name: str | None, alpn: list[str]) -> Route | None:
    """The rule in words, one route after another."""

    def asks(route: Route) -> bool:
        return route.match is not None and bool(route.match.sni or route.match.alpn)

    def accepts(route: Route) -> bool:
        assert route.match is not None
        return not route.match.alpn or any(p in route.match.alpn for p in alpn)

    def one_label_below(name: str, parent: str) -> bool:
        label = name[: -len(parent) - 1]
        return name.endswith("." + parent) and label != "" and "." not in label

    matching = [r for r in routes if asks(r)]
    if server_name:
        for candidate in matching:
            assert candidate.match is not None
            if server_name in candidate.match.sni and accepts(candidate):
                return candidate
        for candidate in matching:
            assert candidate.match is not None
            wildcards = [p[2:] for p in candidate.match.sni if p.startswith("*.")]
            if any(one_label_below(server_name, p) for p in wildcards) and accepts(candidate):
                return candidate
    for protocol in alpn:
        for candidate in matching:
            assert candidate.match is not None
            if not candidate.match.sni and protocol in candidate.match.alpn:
                return candidate
    return next((r for r in routes if not asks(r)), None)


@settings(max_examples=500, database=None, derandomize=True, deadline=None)
@given(
    _ROUTES,
    st.one_of(
        st.none(), _NAMES, st.lists(st.sampled_from([*_LABELS, "d"]), max_size=4).map(".".join)
    ),
    st.lists(_PROTOCOLS, max_size=3, unique=True),
)
def test_choose_agrees_with_a_scan_of_the_routes(
    routes: list[Route], server_name: str | None, alpn: list[str]
) -> None:
    assert SniTable.build(routes).choose(server_name, alpn) is _scan(routes, server_name, alpn)
