"""A route's `match` (TLS SNI names and ALPN), `tls_inspect_timeout` and
`tls_max_client_hello`, and the routes that share a listen address by match.

Read, normalised, inherited from `defaults`, written back by `check`, and refused with
FILE:LINE: bad names and protocols, and conflicts between the routes of one listener."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.config import (
    Config,
    ConfigError,
    LogConfig,
    MetricsConfig,
    Route,
    RouteMatch,
    Upstream,
    parse_config,
    render_config,
)
from splicerelay.config.addresses import SystemdSocketAddress, TcpAddress
from splicerelay.config.model import (
    DEFAULT_TLS_INSPECT_TIMEOUT,
    DEFAULT_TLS_MAX_CLIENT_HELLO,
    MAX_TLS_MAX_CLIENT_HELLO,
    MIN_TLS_MAX_CLIENT_HELLO,
)
from splicerelay.config.schema_match import MatchValueError, alpn_protocol, sni_name

FILE = "relay.yaml"
UPSTREAMS = "    upstreams: [{address: 127.0.0.1:8000}]\n"
PROPERTY = settings(
    max_examples=200,
    database=None,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HypothesisHealthCheck.too_slow],
)


def route(name: str, listen: str = "0.0.0.0:443", extra: str = "") -> str:
    """A route of three lines (name, listen, upstreams), then `extra`."""
    return f"  - name: {name}\n    listen: {listen}\n{UPSTREAMS}{extra}"


def config(*routes: str, defaults: str = "") -> str:
    """`defaults` (if any), then `routes:`: without defaults, route 0 starts on line 2."""
    return (f"defaults:\n{defaults}" if defaults else "") + "routes:\n" + "".join(routes)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, FILE)
    return caught.value.errors


def routes_of(text: str) -> tuple[Route, ...]:
    return parse_config(text, FILE).routes


ISSUE_EXAMPLE = """\
routes:
  - name: app
    listen: 0.0.0.0:443
    match: {sni: [app.example.com, "*.app.example.com"]}
    upstreams: [{address: 10.0.0.2:443}]
  - name: api
    listen: 0.0.0.0:443
    match: {sni: [api.example.com], alpn: [h2, http/1.1]}   # alpn optional
    upstreams: [{address: 10.0.0.3:443}]
  - name: fallback          # no match: takes what no other route on this listener took
    listen: 0.0.0.0:443
    upstreams: [{address: 10.0.0.4:443}]
"""


# --- valid configs ----------------------------------------------------------------------


def test_the_example_of_the_issue_shares_one_listener() -> None:
    app, api, fallback = routes_of(ISSUE_EXAMPLE)
    assert app.match == RouteMatch(sni=("app.example.com", "*.app.example.com"))
    assert api.match == RouteMatch(sni=("api.example.com",), alpn=("h2", "http/1.1"))
    assert fallback.match is None
    assert {app.listen, api.listen, fallback.listen} == {TcpAddress("0.0.0.0", 443)}


def test_without_match_and_tls_keys_a_route_has_the_defaults() -> None:
    (web,) = routes_of(config(route("web", "127.0.0.1:8080")))
    assert web.match is None
    assert web.tls_inspect_timeout == DEFAULT_TLS_INSPECT_TIMEOUT == 5.0
    assert web.tls_max_client_hello == DEFAULT_TLS_MAX_CLIENT_HELLO == (16 << 10) + 5


def test_names_are_kept_in_lower_case_without_a_trailing_dot_in_the_order_written() -> None:
    text = config(
        route("app", extra="    match: {sni: [App.Example.COM., '*.EXAMPLE.com', b_c.x-y.z]}\n")
    )
    (app,) = routes_of(text)
    assert app.match == RouteMatch(sni=("app.example.com", "*.example.com", "b_c.x-y.z"))


def test_alpn_is_kept_as_written() -> None:
    text = config(route("app", extra="    match: {alpn: [H2, http/1.1, acme-tls/1]}\n"))
    (app,) = routes_of(text)
    assert app.match == RouteMatch(alpn=("H2", "http/1.1", "acme-tls/1"))


def test_a_route_with_match_alone_on_its_listener_is_valid() -> None:
    (app,) = routes_of(config(route("app", extra="    match: {sni: [app.example.com]}\n")))
    assert app.match == RouteMatch(sni=("app.example.com",))


def test_routes_with_alpn_only_and_a_fallback_share_a_listener() -> None:
    text = config(
        route("grpc", extra="    match: {alpn: [h2]}\n"),
        route("web", extra="    match: {alpn: [http/1.1, http/1.0]}\n"),
        route("rest"),
    )
    assert [r.match for r in routes_of(text)] == [
        RouteMatch(alpn=("h2",)),
        RouteMatch(alpn=("http/1.1", "http/1.0")),
        None,
    ]


def test_routes_share_a_socket_systemd_passes() -> None:
    text = config(
        route("app", "systemd:tls", "    match: {sni: [app.example.com]}\n"),
        route("rest", "systemd:tls"),
    )
    assert {r.listen for r in routes_of(text)} == {SystemdSocketAddress("tls")}


def test_one_name_on_two_listeners_and_one_protocol_beside_names_are_fine() -> None:
    text = config(
        route("a", "0.0.0.0:443", "    match: {sni: [x.example.com], alpn: [h2]}\n"),
        route("b", "0.0.0.0:8443", "    match: {sni: [x.example.com], alpn: [h2]}\n"),
        route("c", "0.0.0.0:443", "    match: {sni: [y.example.com], alpn: [h2]}\n"),
    )
    assert len(routes_of(text)) == 3


def test_an_exact_name_and_a_wildcard_over_it_may_go_to_different_routes() -> None:
    text = config(
        route("one", extra="    match: {sni: [a.example.com]}\n"),
        route("all", extra="    match: {sni: ['*.example.com']}\n"),
    )
    assert [r.name for r in routes_of(text)] == ["one", "all"]


def test_trusted_networks_in_another_order_are_the_same_setting() -> None:
    accept = "    accept_proxy_protocol: true\n"
    text = config(
        route("a", extra=accept + "    proxy_protocol_trusted: [10.0.0.0/8, '::1']\n"),
        route(
            "b",
            extra=accept
            + "    proxy_protocol_trusted: ['::1/128', 10.0.0.0/8]\n"
            + "    match: {sni: [b.example.com]}\n",
        ),
    )
    assert len(routes_of(text)) == 2


# --- the tunables -----------------------------------------------------------------------


def test_defaults_set_the_tls_tunables_and_a_route_overrides_them() -> None:
    text = config(
        route("a", extra="    match: {sni: [a.example.com]}\n"),
        route("b", extra="    match: {sni: [b.example.com]}\n"),
        route(
            "c",
            "0.0.0.0:8443",
            "    tls_inspect_timeout: 250ms\n    tls_max_client_hello: 64KiB\n",
        ),
        defaults="  tls_inspect_timeout: 2s\n  tls_max_client_hello: 4KiB\n",
    )
    assert [(r.tls_inspect_timeout, r.tls_max_client_hello) for r in routes_of(text)] == [
        (2.0, 4096),
        (2.0, 4096),
        (0.25, 65536),
    ]


def test_the_hello_size_bounds_are_accepted() -> None:
    for size in (MIN_TLS_MAX_CLIENT_HELLO, MAX_TLS_MAX_CLIENT_HELLO):
        text = config(route("a", extra=f"    tls_max_client_hello: {size}B\n"))
        assert routes_of(text)[0].tls_max_client_hello == size


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (
            "tls_inspect_timeout: 0s",
            "routes[0].tls_inspect_timeout: bad duration '0s': must be greater than zero",
        ),
        (
            "tls_inspect_timeout: 5",
            "routes[0].tls_inspect_timeout: bad duration '5': missing unit"
            " (e.g. 250ms, 5s, 1.5s, 1m, 1h)",
        ),
        (
            "tls_max_client_hello: 511B",
            "routes[0].tls_max_client_hello: 511B is out of range (512B to 256KiB)",
        ),
        (
            "tls_max_client_hello: 257KiB",
            "routes[0].tls_max_client_hello: 257KiB is out of range (512B to 256KiB)",
        ),
    ],
)
def test_bad_tls_tunables_are_errors_with_file_and_line(line: str, error: str) -> None:
    assert errors_of(config(route("a", extra=f"    {line}\n"))) == [f"{FILE}:5: {error}"]


def test_a_bad_tls_tunable_in_defaults_is_reported_there() -> None:
    text = config(route("a"), defaults="  tls_max_client_hello: 1GiB\n")
    assert errors_of(text) == [
        f"{FILE}:2: defaults.tls_max_client_hello: 1GiB is out of range (512B to 256KiB)"
    ]


# --- one route's match: names and protocols ---------------------------------------------

NOT_A_NAME = (
    "is not a DNS name (labels of letters, digits, '-' and '_', separated by single"
    " dots, no '-' at either end of a label)"
)
WILDCARD_RULE = (
    "a wildcard is only '*.' and a name, the '*' standing for exactly one whole"
    " leftmost label (e.g. '*.example.com')"
)


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("'a*.example.com'", f"'a*.example.com': {WILDCARD_RULE}"),
        ("'*.*.example.com'", f"'*.*.example.com': {WILDCARD_RULE}"),
        ("'www.*.example.com'", f"'www.*.example.com': {WILDCARD_RULE}"),
        (
            "'*'",
            "'*': not a name; to take every name, leave it to the listener's route"
            " without match (its fallback)",
        ),
        (
            "'*.'",
            "'*.': not a name; to take every name, leave it to the listener's route"
            " without match (its fallback)",
        ),
        (
            "'.'",
            "'.': not a name; to take every name, leave it to the listener's route"
            " without match (its fallback)",
        ),
        (
            "10.0.0.1",
            "'10.0.0.1' is an IP address, which a client never sends as SNI (RFC 6066);"
            " a client that connects by address sends no name and takes the listener's"
            " fallback route",
        ),
        (
            "'::1'",
            "'::1' is an IP address, which a client never sends as SNI (RFC 6066);"
            " a client that connects by address sends no name and takes the listener's"
            " fallback route",
        ),
        (
            "bücher.example",
            "'bücher.example' is not ASCII: write the name in its IDNA (xn--) form, as"
            " clients send it: 'xn--bcher-kva.example'",
        ),
        ("-a.example.com", f"'-a.example.com' {NOT_A_NAME}"),
        ("a-.example.com", f"'a-.example.com' {NOT_A_NAME}"),
        ("a..example.com", f"'a..example.com' {NOT_A_NAME}"),
        ("'.example.com'", f"'.example.com' {NOT_A_NAME}"),
        ("a.example.com..", f"'a.example.com..' {NOT_A_NAME}"),
        ("'a b.example.com'", f"'a b.example.com' {NOT_A_NAME}"),
        ("a:443", f"'a:443' {NOT_A_NAME}"),
        (
            "x" * 64 + ".example.com",
            f"'{'x' * 57}'...: label 'xxxxxxxxxxxxxxxxx'... is longer than 63 characters",
        ),
        (".".join(["a" * 63] * 4), f"'{'a' * 57}'... is longer than 253 characters"),
        ("5", "expected a string, got an integer ('5') (quote it to make it a string)"),
        ("null", "expected a string, got null"),
    ],
)
def test_bad_names_are_errors_with_file_and_line(written: str, message: str) -> None:
    text = config(route("a", extra=f"    match:\n      sni:\n        - {written}\n"))
    assert errors_of(text) == [f"{FILE}:7: routes[0].match.sni[0]: {message}"]


def test_the_longest_names_are_fine() -> None:
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == 253
    assert sni_name(longest) == longest
    assert sni_name(longest + ".") == longest
    assert sni_name("*." + ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 59])).startswith("*.")
    assert sni_name("*.com") == "*.com"
    assert sni_name("xn--bcher-kva.example") == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("''", "an ALPN protocol id is not empty"),
        (
            "'h 2'",
            "'h 2': an ALPN protocol id here is printable ASCII without spaces"
            " (e.g. h2, http/1.1, acme-tls/1)",
        ),
        (
            "é",
            "'é': an ALPN protocol id here is printable ASCII without spaces"
            " (e.g. h2, http/1.1, acme-tls/1)",
        ),
        (
            '"h2\\t"',
            "'h2\\t': an ALPN protocol id here is printable ASCII without spaces"
            " (e.g. h2, http/1.1, acme-tls/1)",
        ),
        ("a" * 256, f"{'a' * 57!r}... is longer than 255 bytes"),
        ("2", "expected a string, got an integer ('2') (quote it to make it a string)"),
    ],
)
def test_bad_protocols_are_errors_with_file_and_line(written: str, message: str) -> None:
    text = config(route("a", extra=f"    match:\n      alpn:\n        - {written}\n"))
    assert errors_of(text) == [f"{FILE}:7: routes[0].match.alpn[0]: {message}"]


def test_the_longest_protocol_is_fine() -> None:
    assert alpn_protocol("a" * 255) == "a" * 255
    with pytest.raises(MatchValueError):
        alpn_protocol("a" * 256)


@pytest.mark.parametrize(
    ("match", "error"),
    [
        (
            "{}",
            "routes[0].match: must have sni, alpn or both (a route without match is the fallback)",
        ),
        ("[a.example.com]", "routes[0].match: expected a mapping, got a list"),
        ("null", "routes[0].match: expected a mapping, got null"),
        ("a.example.com", "routes[0].match: expected a mapping, got a string ('a.example.com')"),
        (
            "{sni: []}",
            "routes[0].match.sni: must list at least one of the names (or leave sni out)",
        ),
        (
            "{alpn: []}",
            "routes[0].match.alpn: must list at least one of the protocols (or leave alpn out)",
        ),
        (
            "{sni: a.example.com}",
            "routes[0].match.sni: expected a list of names, e.g. [app.example.com],"
            " got a string ('a.example.com')",
        ),
        (
            "{alpn: h2}",
            "routes[0].match.alpn: expected a list of protocols, e.g. [h2, http/1.1],"
            " got a string ('h2')",
        ),
        (
            "{sni: [a.example.com], host: [b]}",
            "routes[0].match.host: unknown key (allowed keys: sni, alpn)",
        ),
        (
            "{sni: [a.example.com, b.example.com, A.Example.Com.]}",
            "routes[0].match.sni[2]: 'a.example.com' is listed twice (first on line 5)",
        ),
        (
            "{alpn: [h2, h2]}",
            "routes[0].match.alpn[1]: 'h2' is listed twice (first on line 5)",
        ),
    ],
)
def test_bad_matches_are_errors_with_file_and_line(match: str, error: str) -> None:
    text = config(route("a", extra=f"    match: {match}\n"))
    assert errors_of(text) == [f"{FILE}:5: {error}"]


def test_an_unquoted_wildcard_gets_a_hint_to_quote_it() -> None:
    text = config(route("a", extra="    match:\n      sni:\n        - *.example.com\n"))
    (error,) = errors_of(text)
    assert error.startswith(f"{FILE}:7: not valid YAML:")
    assert error.endswith("; a wildcard name must be quoted, e.g. '*.example.com'")


def test_every_bad_value_in_a_match_is_reported() -> None:
    text = config(
        route(
            "a", extra="    match:\n      sni: [ok.example.com, 'a*.b', a..b]\n      alpn: ['']\n"
        )
    )
    assert errors_of(text) == [
        f"{FILE}:6: routes[0].match.sni[1]: 'a*.b': {WILDCARD_RULE}",
        f"{FILE}:6: routes[0].match.sni[2]: 'a..b' {NOT_A_NAME}",
        f"{FILE}:7: routes[0].match.alpn[0]: an ALPN protocol id is not empty",
    ]


def test_match_on_a_unix_listener_is_an_error() -> None:
    text = config(route("a", "unix:/run/tls.sock", "    match: {sni: [a.example.com]}\n"))
    assert errors_of(text) == [
        f"{FILE}:5: routes[0].match: unix:/run/tls.sock is a unix socket, and routing by"
        " TLS ClientHello is for TCP listeners (host:port or systemd:NAME); give each"
        " route a socket of its own"
    ]


# --- routes that share a listener -------------------------------------------------------


def test_two_routes_with_one_name_on_a_listener_name_both_lines() -> None:
    text = config(
        route("app", extra="    match: {sni: [x.example.com, app.example.com]}\n"),
        route(
            "api",
            extra="    match:\n      sni:\n        - API.example.com\n        - App.Example.com.\n",
        ),
    )
    assert errors_of(text) == [
        f"{FILE}:12: routes[1].match.sni[1]: 'app.example.com' is also in the match of"
        " route 'app' (line 5), which shares 0.0.0.0:443: a name goes to one route of a"
        " listener"
    ]


def test_two_routes_with_one_wildcard_on_a_listener_is_an_error() -> None:
    text = config(
        route("a", extra="    match: {sni: ['*.example.com'], alpn: [h2]}\n"),
        route("b", extra="    match: {sni: ['*.EXAMPLE.com'], alpn: [http/1.1]}\n"),
    )
    assert errors_of(text) == [
        f"{FILE}:9: routes[1].match.sni[0]: '*.example.com' is also in the match of"
        " route 'a' (line 5), which shares 0.0.0.0:443: a name goes to one route of a"
        " listener"
    ]


def test_two_routes_offering_one_protocol_by_alpn_alone_is_an_error() -> None:
    text = config(
        route("a", extra="    match: {alpn: [h2, http/1.1]}\n"),
        route("b", extra="    match: {alpn: [acme-tls/1, http/1.1]}\n"),
    )
    assert errors_of(text) == [
        f"{FILE}:9: routes[1].match.alpn[1]: 'http/1.1' is also in route 'a''s alpn"
        " (line 5); both match on alpn alone on 0.0.0.0:443, so a hello offering"
        " 'http/1.1' would match both"
    ]


def test_two_fallbacks_on_a_listener_is_an_error() -> None:
    text = config(
        route("app", extra="    match: {sni: [app.example.com]}\n"),
        route("rest"),
        route("other"),
    )
    assert errors_of(text) == [
        f"{FILE}:10: routes[2].listen: 0.0.0.0:443 already has a route without match,"
        " route 'rest' (line 7): of the routes that share a listener, all but one (the"
        " fallback) need a match"
    ]


def test_two_routes_without_match_on_one_address_keep_the_old_error() -> None:
    text = config(route("a"), route("b"))
    assert errors_of(text) == [
        f"{FILE}:6: routes[1].listen: 0.0.0.0:443 is already used by route 'a' (line 3)"
    ]


def test_a_match_does_not_let_a_route_share_the_metrics_address() -> None:
    text = "metrics: {listen: 127.0.0.1:9200}\n" + config(
        route("a", "127.0.0.1:9200", "    match: {sni: [a.example.com]}\n")
    )
    assert errors_of(text) == [
        f"{FILE}:4: routes[0].listen: 127.0.0.1:9200 is already used by the metrics"
        " endpoint (line 1)"
    ]


def test_two_unix_routes_with_match_are_errors_at_their_match() -> None:
    text = config(
        route("a", "unix:/run/x", "    match: {sni: [a.example.com]}\n"),
        route("b", "unix:/run/x"),
    )
    (error,) = errors_of(text)
    assert error.startswith(f"{FILE}:5: routes[0].match: unix:/run/x is a unix socket")


SHARED_SETTINGS = [
    ("accept_proxy_protocol", "true", "true", "false (the default)"),
    ("proxy_protocol_trusted", "[10.0.0.0/8]", "[10.0.0.0/8]", "[] (the default)"),
    ("proxy_protocol_timeout", "1s", "1s", "3s (the default)"),
    ("proxy_protocol_max_header", "1KiB", "1KiB", "4KiB (the default)"),
    ("defer_accept", "true", "true", "false (the default)"),
    ("tls_inspect_timeout", "2s", "2s", "5s (the default)"),
    ("tls_max_client_hello", "4KiB", "4KiB", "16389B (the default)"),
]


@pytest.mark.parametrize(("key", "value", "shown", "other"), SHARED_SETTINGS)
def test_a_setting_applied_before_the_route_is_known_must_agree(
    key: str, value: str, shown: str, other: str
) -> None:
    text = config(
        route("app", extra="    match: {sni: [app.example.com]}\n"),
        route("api", extra=f"    match: {{sni: [api.example.com]}}\n    {key}: {value}\n"),
    )
    assert errors_of(text) == [
        f"{FILE}:10: routes[1].{key}: {shown} here, but route 'app' (line 3) has {other},"
        f" and both listen on 0.0.0.0:443: a shared listener applies {key} before it"
        " knows which route a connection takes, so every route on it must have the same"
    ]


def test_a_setting_from_defaults_that_one_route_overrides_says_where_it_came_from() -> None:
    text = config(
        route("app", extra="    match: {sni: [app.example.com]}\n"),
        route("rest", extra="    tls_inspect_timeout: 1s\n"),
        defaults="  tls_inspect_timeout: 2s\n",
    )
    assert errors_of(text) == [
        f"{FILE}:11: routes[1].tls_inspect_timeout: 1s here, but route 'app' (line 5) has"
        " 2s (from defaults, line 2), and both listen on 0.0.0.0:443: a shared listener"
        " applies tls_inspect_timeout before it knows which route a connection takes, so"
        " every route on it must have the same"
    ]


def test_when_the_first_route_overrides_the_others_are_reported_at_their_listen() -> None:
    text = config(
        route("app", extra="    match: {sni: [app.example.com]}\n    defer_accept: true\n"),
        route("rest"),
    )
    assert errors_of(text) == [
        f"{FILE}:8: routes[1].defer_accept: false (the default) here, but route 'app'"
        " (line 6) has true, and both listen on 0.0.0.0:443: a shared listener applies"
        " defer_accept before it knows which route a connection takes, so every route on"
        " it must have the same"
    ]


def test_settings_a_shared_listener_applies_later_may_differ() -> None:
    text = config(
        route(
            "app",
            extra="    match: {sni: [app.example.com]}\n    idle_timeout: 1m\n"
            "    proxy_protocol: v2\n    allow: [10.0.0.0/8]\n    max_connections: 5\n",
        ),
        route("rest", extra="    pipe_size: 64KiB\n    connect_timeout: 1s\n"),
    )
    assert len(routes_of(text)) == 2


# --- written back -----------------------------------------------------------------------


def test_render_writes_match_after_listen_and_the_tls_tunables() -> None:
    rendered = render_config(parse_config(ISSUE_EXAMPLE, FILE))
    assert (
        "- name: api\n"
        "  listen: 0.0.0.0:443\n"
        "  match:\n"
        "    sni:\n"
        "    - api.example.com\n"
        "    alpn:\n"
        "    - h2\n"
        "    - http/1.1\n"
        "  defer_accept: false\n"
    ) in rendered
    assert "- name: fallback\n  listen: 0.0.0.0:443\n  defer_accept: false\n" in rendered
    assert rendered.count("  tls_inspect_timeout: 5s\n  tls_max_client_hello: 16389B\n") == 3


ROUND_TRIPS = [
    ISSUE_EXAMPLE,
    config(route("a", extra="    match: {alpn: ['*', '-x', '#c', 'null', '1', \"'q'\"]}\n")),
    config(
        route("a", "systemd:tls", "    match: {sni: ['*.a.example.com'], alpn: [h2]}\n"),
        route("b", "systemd:tls"),
        route("c", "127.0.0.1:1"),
        defaults="  tls_inspect_timeout: 1500ms\n  tls_max_client_hello: 1000B\n",
    ),
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_rendered_matches_parse_back_to_an_equal_config(text: str) -> None:
    config = parse_config(text, FILE)
    rendered = render_config(config)
    assert parse_config(rendered, FILE) == config
    assert render_config(parse_config(rendered, FILE)) == rendered


_LABEL = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,10}[a-z0-9_])?", fullmatch=True)
_NAMES = (
    st.tuples(st.booleans(), st.lists(_LABEL, min_size=1, max_size=3))
    .map(lambda wild_labels: ("*." if wild_labels[0] else "") + ".".join(wild_labels[1]))
    .filter(lambda name: not _is_ip(name.removeprefix("*.")))
)
_PROTOCOLS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)
_DURATIONS = st.one_of(
    st.sampled_from([0.001, 0.25, 1.5, 5.0, 60.0]),
    st.floats(min_value=0, exclude_min=True, allow_infinity=False),
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@st.composite
def _shared_configs(draw: Any) -> Config:
    """Routes on one shared listener, each with a match whose names and alpn-only
    protocols no other route has, and perhaps a fallback; the shared settings equal."""
    count = draw(st.integers(1, 4))
    names = draw(st.lists(_NAMES, min_size=count * 2, max_size=count * 2, unique=True))
    protocols = draw(st.lists(_PROTOCOLS, min_size=count * 2, max_size=count * 2, unique=True))
    listen = draw(st.sampled_from([TcpAddress("0.0.0.0", 443), SystemdSocketAddress("tls")]))
    shared = {
        "tls_inspect_timeout": draw(_DURATIONS),
        "tls_max_client_hello": draw(
            st.integers(MIN_TLS_MAX_CLIENT_HELLO, MAX_TLS_MAX_CLIENT_HELLO)
        ),
        "defer_accept": isinstance(listen, TcpAddress) and draw(st.booleans()),
    }
    routes = []
    for index in range(count):
        kind = draw(st.sampled_from(["sni", "alpn", "both"]))
        sni = tuple(names[index * 2 : index * 2 + draw(st.integers(1, 2))])
        alpn = tuple(protocols[index * 2 : index * 2 + draw(st.integers(1, 2))])
        match = RouteMatch(sni=() if kind == "alpn" else sni, alpn=() if kind == "sni" else alpn)
        routes.append(_route(f"r{index}", listen, match, **shared))
    if draw(st.booleans()):
        routes.insert(draw(st.integers(0, count)), _route("fallback", listen, None, **shared))
    return _config(routes)


def _route(name: str, listen: Any, match: RouteMatch | None, **settings: Any) -> Route:
    return Route(
        name=name,
        listen=listen,
        upstreams=(Upstream(TcpAddress("127.0.0.1", 8000)),),
        balance="round_robin",
        connect_timeout=5.0,
        idle_timeout=3600.0,
        pipe_size=1 << 20,
        max_connections=10000,
        allow=(),
        deny=(),
        match=match,
        **settings,
    )


def _config(routes: list[Route]) -> Config:
    return Config(
        workers=1,
        shutdown_timeout=30.0,
        metrics=MetricsConfig(None),
        log=LogConfig(),
        routes=tuple(routes),
        source=FILE,
    )


@PROPERTY
@given(_shared_configs())
def test_any_shared_listener_renders_to_yaml_that_parses_back_to_it(config: Config) -> None:
    assert parse_config(render_config(config), FILE) == config
