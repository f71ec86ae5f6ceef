"""The settings for trusted PROXY peers, the PROXY header bound and upstream name
resolution: parsing, errors with FILE:LINE, and the warnings a risky combination gets."""

from __future__ import annotations

import ipaddress

import pytest

from splicerelay.config import (
    DEFAULT_PROXY_PROTOCOL_MAX_HEADER,
    ConfigError,
    config_warnings,
    parse_config,
)

FILE = "relay.yaml"
ROUTE = """\
routes:
  - name: web
    listen: 127.0.0.1:8080
    upstreams:
      - address: 127.0.0.1:8000
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, FILE)
    return caught.value.errors


def test_defaults_trust_nobody_in_particular_and_check_both_addresses() -> None:
    route = parse_config(ROUTE, FILE).routes[0]
    assert route.proxy_protocol_trusted == ()
    assert route.allow_applies_to == "both"
    assert route.proxy_protocol_max_header == DEFAULT_PROXY_PROTOCOL_MAX_HEADER == 4096
    assert route.upstreams[0].resolve == "all"


def test_trusted_networks_applies_to_and_header_bound_are_read() -> None:
    text = ROUTE + (
        "    accept_proxy_protocol: true\n"
        "    proxy_protocol_trusted: [127.0.0.2/32, '::1']\n"
        "    allow_applies_to: proxy\n"
        "    proxy_protocol_max_header: 1KiB\n"
    )
    route = parse_config(text, FILE).routes[0]
    assert route.proxy_protocol_trusted == (
        ipaddress.ip_network("127.0.0.2/32"),
        ipaddress.ip_network("::1/128"),
    )
    assert route.allow_applies_to == "proxy"
    assert route.proxy_protocol_max_header == 1024


def test_header_bound_is_a_tunable_defaults_can_set() -> None:
    text = "defaults:\n  proxy_protocol_max_header: 512B\n" + ROUTE
    assert parse_config(text, FILE).routes[0].proxy_protocol_max_header == 512


def test_upstream_may_keep_only_the_first_address_of_a_name() -> None:
    text = ROUTE + "        resolve: first\n"
    assert parse_config(text, FILE).routes[0].upstreams[0].resolve == "first"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (
            "    proxy_protocol_trusted: [10.0.0.300/8]\n",
            "relay.yaml:6: routes[0].proxy_protocol_trusted[0]:",
        ),
        (
            "    proxy_protocol_trusted: 10.0.0.0/8\n",
            "relay.yaml:6: routes[0].proxy_protocol_trusted: expected a list",
        ),
        (
            "    allow_applies_to: client\n",
            "relay.yaml:6: routes[0].allow_applies_to: unknown value 'client'"
            " (expected one of: both, proxy, peer)",
        ),
        (
            "    proxy_protocol_max_header: 100\n",
            "relay.yaml:6: routes[0].proxy_protocol_max_header:",
        ),
        (
            "    proxy_protocol_max_header: 1MiB\n",
            "relay.yaml:6: routes[0].proxy_protocol_max_header:",
        ),
    ],
)
def test_bad_values_name_file_line_and_key(line: str, error: str) -> None:
    errors = errors_of(ROUTE + line)
    assert len(errors) == 1
    assert errors[0].startswith(error), errors[0]


def test_bad_resolve_mode_names_the_upstream() -> None:
    errors = errors_of(ROUTE + "        resolve: some\n")
    assert len(errors) == 1
    expected = "relay.yaml:6: routes[0].upstreams[0].resolve: unknown value 'some'"
    assert errors[0].startswith(expected)


def test_accepting_proxy_headers_from_anyone_is_warned_about() -> None:
    config = parse_config(ROUTE + "    accept_proxy_protocol: true\n", FILE)
    (warning,) = config_warnings(config)
    assert warning.startswith("route 'web': accept_proxy_protocol is on")
    assert "proxy_protocol_trusted" in warning


def test_a_trusted_list_silences_the_warning() -> None:
    text = ROUTE + "    accept_proxy_protocol: true\n    proxy_protocol_trusted: [10.0.0.0/8]\n"
    assert config_warnings(parse_config(text, FILE)) == []


def test_trust_settings_without_accepting_headers_are_warned_about() -> None:
    trusted = parse_config(ROUTE + "    proxy_protocol_trusted: [10.0.0.0/8]\n", FILE)
    assert config_warnings(trusted) == [
        "route 'web': proxy_protocol_trusted has no effect without accept_proxy_protocol"
    ]
    applies = parse_config(ROUTE + "    allow_applies_to: proxy\n", FILE)
    assert len(config_warnings(applies)) == 1


def test_a_plain_config_has_no_warnings() -> None:
    assert config_warnings(parse_config(ROUTE, FILE)) == []


def test_trusted_networks_on_a_unix_listener_are_warned_about() -> None:
    text = ROUTE.replace("127.0.0.1:8080", "unix:/run/web.sock") + (
        "    accept_proxy_protocol: true\n    proxy_protocol_trusted: [10.0.0.0/8]\n"
    )
    (warning,) = config_warnings(parse_config(text, FILE))
    assert "refuses every client" in warning


def test_each_trust_setting_without_accepting_headers_gets_its_own_line() -> None:
    text = ROUTE + "    proxy_protocol_trusted: [10.0.0.0/8]\n    allow_applies_to: peer\n"
    assert config_warnings(parse_config(text, FILE)) == [
        "route 'web': proxy_protocol_trusted has no effect without accept_proxy_protocol",
        "route 'web': allow_applies_to has no effect without accept_proxy_protocol"
        " (the peer is the client)",
    ]


def test_a_unix_listener_taking_headers_from_anyone_is_told_what_decides_there() -> None:
    """A unix socket peer has no address: following the usual advice (list the proxies in
    proxy_protocol_trusted) would refuse every client, and earn the warning above."""
    text = ROUTE.replace("127.0.0.1:8080", "unix:/run/web.sock") + (
        "    accept_proxy_protocol: true\n"
    )
    (warning,) = config_warnings(parse_config(text, FILE))
    assert warning.startswith(
        "route 'web': accept_proxy_protocol is on and proxy_protocol_trusted is empty:"
        " any process that may connect to unix:/run/web.sock can claim any address"
    )
    assert "socket file's owner and mode" in warning
    assert "list the proxies in front in proxy_protocol_trusted" not in warning
