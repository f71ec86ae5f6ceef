"""`listen: systemd:NAME`: a route's listener is the socket systemd passes as NAME.

Parsing and rendering are pure: the address parser knows the prefix, the route schema
accepts it as a listen and nowhere else, and `check` writes it back as it was written.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.config import ConfigError, parse_config, render_config
from splicerelay.config.addresses import (
    AddressError,
    SystemdSocketAddress,
    TcpAddress,
    parse_address,
    parse_listen_address,
)

FILE = "relay.yaml"
PROPERTY = settings(max_examples=200, database=None, derandomize=True, deadline=None)


def config_text(listen: str, upstream: str = "127.0.0.1:8000", extra: str = "") -> str:
    return (
        f"{extra}routes:\n"
        "  - name: web\n"
        f"    listen: {listen}\n"
        "    upstreams:\n"
        f"      - address: {upstream}\n"
    )


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, FILE)
    return caught.value.errors


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("systemd:web", "web"),
        ("systemd:splicerelay.socket", "splicerelay.socket"),  # systemd's default name
        ("systemd:8080", "8080"),  # the prefix wins: never host "systemd", port 8080
        ("systemd:a-b_c.d~!@#", "a-b_c.d~!@#"),
        ("systemd:" + "n" * 255, "n" * 255),
    ],
)
def test_systemd_listen_parses_to_the_name(text: str, name: str) -> None:
    address = parse_listen_address(text)
    assert address == SystemdSocketAddress(name)
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "systemd:",
            "bad listen 'systemd:': empty name (expected systemd:NAME, NAME being the"
            " socket's FileDescriptorName=)",
        ),
        (
            "systemd:a:b",
            "bad listen 'systemd:a:b': the name may not contain ':' (it separates the"
            " names in LISTEN_FDNAMES)",
        ),
        (
            "systemd:tab\there",
            "bad listen 'systemd:tab\\there': the name may hold printable ASCII characters only",
        ),
        (
            "systemd:wéb",
            "bad listen 'systemd:wéb': the name may hold printable ASCII characters only",
        ),
        (
            "systemd:" + "n" * 256,
            f"bad listen 'systemd:{'n' * 256}': the name is longer than 255 characters",
        ),
    ],
)
def test_bad_systemd_listen(text: str, message: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_listen_address(text)
    assert str(caught.value) == message


def test_listen_parser_reads_every_other_address_as_the_address_parser_does() -> None:
    for text in ("127.0.0.1:80", "[::1]:80", "unix:/run/web.sock", "systemd.:80"):
        assert parse_listen_address(text) == parse_address(text)
    assert parse_listen_address("systemd.:80") == TcpAddress("systemd.", 80)


def test_the_address_parser_refuses_systemd_names() -> None:
    with pytest.raises(AddressError) as caught:
        parse_address("systemd:web")
    assert str(caught.value) == (
        "bad address 'systemd:web': systemd:NAME (a socket passed by systemd) can only be"
        " a route's listen"
    )


def test_a_route_listens_on_a_systemd_socket() -> None:
    config = parse_config(config_text("systemd:web"), FILE)
    assert config.routes[0].listen == SystemdSocketAddress("web")


def test_check_writes_systemd_listen_back_as_written() -> None:
    config = parse_config(config_text("systemd:web"), FILE)
    rendered = render_config(config)
    assert "\n  listen: systemd:web\n" in rendered
    assert parse_config(rendered, FILE) == config


@given(
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":'\"#\\"),
        min_size=1,
        max_size=40,
    )
)
@PROPERTY
def test_any_valid_name_renders_and_parses_back(name: str) -> None:
    config = parse_config(config_text(f"'systemd:{name}'"), FILE)
    assert config.routes[0].listen == SystemdSocketAddress(name)
    assert parse_config(render_config(config), FILE) == config


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            config_text("127.0.0.1:8080", upstream="systemd:web"),
            "relay.yaml:5: routes[0].upstreams[0].address: bad address 'systemd:web':"
            " systemd:NAME (a socket passed by systemd) can only be a route's listen",
        ),
        (
            config_text("127.0.0.1:8080", extra="metrics: {listen: 'systemd:metrics'}\n"),
            "relay.yaml:1: metrics.listen: bad address 'systemd:metrics':"
            " systemd:NAME (a socket passed by systemd) can only be a route's listen",
        ),
        (
            config_text("'systemd:'"),
            "relay.yaml:3: routes[0].listen: bad listen 'systemd:': empty name"
            " (expected systemd:NAME, NAME being the socket's FileDescriptorName=)",
        ),
        (
            config_text("'systemd:a:b'"),
            "relay.yaml:3: routes[0].listen: bad listen 'systemd:a:b': the name may not"
            " contain ':' (it separates the names in LISTEN_FDNAMES)",
        ),
        (
            config_text("8080"),
            "relay.yaml:3: routes[0].listen: expected an address (host:port, [v6]:port,"
            " unix:/path or systemd:NAME), got an integer ('8080')",
        ),
    ],
)
def test_systemd_names_are_errors_elsewhere_with_file_and_line(text: str, error: str) -> None:
    assert errors_of(text) == [error]


def test_two_routes_on_one_systemd_name_are_duplicates() -> None:
    text = config_text("systemd:web") + (
        "  - name: api\n    listen: systemd:web\n    upstreams:\n      - address: 127.0.0.1:8001\n"
    )
    assert errors_of(text) == [
        "relay.yaml:7: routes[1].listen: systemd:web is already used by route 'web' (line 3)"
    ]


def test_two_systemd_names_are_two_listeners() -> None:
    text = config_text("systemd:web") + (
        "  - name: api\n    listen: systemd:api\n    upstreams:\n      - address: 127.0.0.1:8001\n"
    )
    listens = [route.listen for route in parse_config(text, FILE).routes]
    assert listens == [SystemdSocketAddress("web"), SystemdSocketAddress("api")]
