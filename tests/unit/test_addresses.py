"""Parsing `host:port`, `[v6]:port` and `unix:/path`: whole tables, then properties."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splicerelay.config.addresses import (
    Address,
    AddressError,
    TcpAddress,
    UnixAddress,
    is_ip_literal,
    parse_address,
)

PROPERTY = settings(max_examples=300, database=None, derandomize=True, deadline=None)

VALID = [
    ("127.0.0.1:8080", TcpAddress("127.0.0.1", 8080), "127.0.0.1:8080"),
    ("0.0.0.0:0", TcpAddress("0.0.0.0", 0), "0.0.0.0:0"),
    ("255.255.255.255:65535", TcpAddress("255.255.255.255", 65535), "255.255.255.255:65535"),
    ("[::1]:80", TcpAddress("::1", 80), "[::1]:80"),
    ("[::]:8080", TcpAddress("::", 8080), "[::]:8080"),
    ("[2001:DB8:0:0::1]:443", TcpAddress("2001:db8::1", 443), "[2001:db8::1]:443"),
    ("[::ffff:10.0.0.1]:53", TcpAddress("::ffff:a00:1", 53), "[::ffff:a00:1]:53"),
    ("[fe80::1%eth0]:22", TcpAddress("fe80::1%eth0", 22), "[fe80::1%eth0]:22"),
    ("localhost:6379", TcpAddress("localhost", 6379), "localhost:6379"),
    ("Backend.Internal:8000", TcpAddress("backend.internal", 8000), "backend.internal:8000"),
    ("example.org.:80", TcpAddress("example.org.", 80), "example.org.:80"),
    ("my_service-1.svc:9000", TcpAddress("my_service-1.svc", 9000), "my_service-1.svc:9000"),
    ("10.0.0.2:08000", TcpAddress("10.0.0.2", 8000), "10.0.0.2:8000"),
    ("unix:/run/web.sock", UnixAddress("/run/web.sock"), "unix:/run/web.sock"),
    ("unix:/tmp/a b/ü.sock", UnixAddress("/tmp/a b/ü.sock"), "unix:/tmp/a b/ü.sock"),
    ("unix:/" + "x" * 106, UnixAddress("/" + "x" * 106), "unix:/" + "x" * 106),
]


@pytest.mark.parametrize(("text", "expected", "rendered"), VALID)
def test_valid_address(text: str, expected: Address, rendered: str) -> None:
    address = parse_address(text)
    assert address == expected
    assert str(address) == rendered
    assert parse_address(rendered) == expected


INVALID = [
    ("", "bad address '': missing port (expected host:port, [v6]:port or unix:/path)"),
    ("foo", "bad address 'foo': missing port (expected host:port, [v6]:port or unix:/path)"),
    ("foo:", "bad address 'foo:': missing port (expected host:port, [v6]:port or unix:/path)"),
    (":80", "bad address ':80': empty host (expected host:port, [v6]:port or unix:/path)"),
    ("::1:80", "bad address '::1:80': an IPv6 address needs brackets and a port, e.g. [::1]:80"),
    ("::1", "bad address '::1': an IPv6 address needs brackets and a port, e.g. [::1]:80"),
    ("fe80::1", "bad address 'fe80::1': an IPv6 address needs brackets and a port, e.g. [::1]:80"),
    ("[::1]", "bad address '[::1]': missing port (expected host:port, [v6]:port or unix:/path)"),
    ("[::1]:", "bad address '[::1]:': missing port (expected host:port, [v6]:port or unix:/path)"),
    ("[::1]80", "bad address '[::1]80': expected ':' and a port after ']'"),
    ("[::1:80", "bad address '[::1:80': missing ']' after the IPv6 address"),
    ("[]:80", "bad address '[]:80': empty host (expected host:port, [v6]:port or unix:/path)"),
    ("[1.2.3.4]:80", "bad address '[1.2.3.4]:80': '1.2.3.4' in brackets is not an IPv6 address"),
    ("host:http", "bad address 'host:http': port 'http' is not a number from 0 to 65535"),
    ("host:-1", "bad address 'host:-1': port '-1' is not a number from 0 to 65535"),
    ("host:+80", "bad address 'host:+80': port '+80' is not a number from 0 to 65535"),
    ("host: 80", "bad address 'host: 80': port ' 80' is not a number from 0 to 65535"),
    ("host:٨٠", "bad address 'host:٨٠': port '٨٠' is not a number from 0 to 65535"),
    ("host:65536", "bad address 'host:65536': port 65536 is out of range (0 to 65535)"),
    ("host:123456", "bad address 'host:123456': port '123456' is not a number from 0 to 65535"),
    ("1.2.3.256:80", "bad address '1.2.3.256:80': '1.2.3.256' is not a valid IPv4 address"),
    ("1.2.3:80", "bad address '1.2.3:80': '1.2.3' is not a valid IPv4 address"),
    ("01.2.3.4:80", "bad address '01.2.3.4:80': '01.2.3.4' is not a valid IPv4 address"),
    (
        "bad host:80",
        "bad address 'bad host:80': invalid hostname 'bad host'"
        " (letters, digits, '-' and '_' in dot-separated labels)",
    ),
    (
        "-lead.example:80",
        "bad address '-lead.example:80': invalid hostname '-lead.example'"
        " (letters, digits, '-' and '_' in dot-separated labels)",
    ),
    (
        "a..b:80",
        "bad address 'a..b:80': invalid hostname 'a..b'"
        " (letters, digits, '-' and '_' in dot-separated labels)",
    ),
    (
        "exa$mple.org:80",
        "bad address 'exa$mple.org:80': invalid hostname 'exa$mple.org'"
        " (letters, digits, '-' and '_' in dot-separated labels)",
    ),
    (
        "bücher.de:80",
        "bad address 'bücher.de:80': invalid hostname 'bücher.de'"
        " (letters, digits, '-' and '_' in dot-separated labels)",
    ),
    (
        "*:80",
        "bad address '*:80': invalid hostname '*'"
        " (letters, digits, '-' and '_' in dot-separated labels)",
    ),
    (
        ("a" * 64) + ".org:80",
        f"bad address '{'a' * 64}.org:80': invalid hostname '{'a' * 64}.org'"
        " (letters, digits, '-' and '_' in dot-separated labels)",
    ),
    (
        ("a." * 127) + "ab:80",
        f"bad address '{'a.' * 127}ab:80': hostname is longer than 253 characters",
    ),
    ("unix:", "bad address 'unix:': empty unix socket path (expected unix:/absolute/path)"),
    (
        "unix:run/x.sock",
        "bad address 'unix:run/x.sock': unix socket path must be absolute"
        " (expected unix:/absolute/path)",
    ),
    ("unix:/run/", "bad address 'unix:/run/': unix socket path names a directory"),
    (
        "unix:/run/x\x00.sock",
        "bad address 'unix:/run/x\\x00.sock': unix socket path contains control or invalid"
        " characters",
    ),
    (
        "unix:/" + "x" * 107,
        f"bad address 'unix:/{'x' * 107}': unix socket path is 108 bytes long (at most 107)",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_address(text: str, message: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_address(text)
    assert str(caught.value) == message


def test_address_error_is_a_value_error() -> None:
    assert issubclass(AddressError, ValueError)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("2001:db8::1", True),
        ("fe80::1%eth0", True),
        ("localhost", False),
        ("1.2.3", False),
        ("256.1.1.1", False),
        ("[::1]", False),
        ("", False),
    ],
)
def test_is_ip_literal(host: str, expected: bool) -> None:
    assert is_ip_literal(host) is expected


def test_addresses_are_frozen_and_hashable() -> None:
    address = TcpAddress("127.0.0.1", 80)
    with pytest.raises(AttributeError):
        address.port = 81  # type: ignore[misc]
    assert len({address, TcpAddress("127.0.0.1", 80), UnixAddress("/x")}) == 2


def test_two_spellings_of_one_address_are_equal() -> None:
    assert parse_address("[0:0::1]:80") == parse_address("[::1]:80")
    assert parse_address("Example.ORG:80") == parse_address("example.org:80")


_LABEL = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,10}[a-z0-9_])?", fullmatch=True)
_HOSTNAMES = (
    st.lists(_LABEL, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda name: not all(part.isdigit() for part in name.split(".")))
)
_TCP = st.builds(
    TcpAddress,
    st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        _HOSTNAMES,
    ),
    st.integers(0, 65535),
)
_UNIX = st.builds(
    UnixAddress,
    st.text(
        alphabet=st.characters(
            codec="utf-8", categories=["L", "N", "P", "S"], include_characters=" "
        ),
        max_size=30,
    )
    .map(lambda tail: "/" + tail)
    .filter(lambda path: not path.endswith("/") and len(path.encode()) <= 107),
)


@PROPERTY
@given(st.one_of(_TCP, _UNIX))
def test_str_parses_back_to_the_same_address(address: Address) -> None:
    assert parse_address(str(address)) == address


@PROPERTY
@given(
    st.one_of(
        st.text(),
        st.text(alphabet=string.printable),
        st.text(alphabet="[]:.0123456789abcdef/unix%", max_size=20),
    )
)
def test_any_text_parses_or_raises_address_error(text: str) -> None:
    try:
        address = parse_address(text)
    except AddressError as error:
        assert str(error).startswith(f"bad address {text!r}: ")
        return
    assert parse_address(str(address)) == address
    if isinstance(address, TcpAddress):
        assert 0 <= address.port <= 65535
        assert address.host
    else:
        assert address.path.startswith("/")


@settings(
    max_examples=100,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.ip_addresses(), st.integers(0, 65535))
def test_ip_literals_parse_to_themselves(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    assert parse_address(text) == TcpAddress(str(ip), port)
    assert is_ip_literal(str(ip))
