"""The YAML configuration: valid files, every kind of mistake, rendering, and fuzzing."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from splicerelay.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PIPE_SIZE,
    DEFAULT_PROXY_PROTOCOL_TIMEOUT,
    DEFAULT_RESOLVE_INTERVAL,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Config,
    ConfigError,
    HealthCheck,
    LogConfig,
    MetricsConfig,
    Network,
    Route,
    RouteMatch,
    Upstream,
    config_from_args,
    format_duration,
    format_size,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    render_config,
)
from splicerelay.config.addresses import Address, TcpAddress, UnixAddress

FILE = "relay.yaml"
EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "relay.yaml"
PROPERTY = settings(
    max_examples=300,
    database=None,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HypothesisHealthCheck.too_slow],
)

MINIMAL = """\
routes:
  - name: web
    listen: 127.0.0.1:8080
    upstreams:
      - address: 127.0.0.1:8000
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, FILE)
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


def network(text: str) -> Network:
    return ipaddress.ip_network(text)


# --- durations and sizes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1ms", 0.001),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("0.1s", 0.1),
        ("1m", 60.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("24h", 86400.0),
        ("007s", 7.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5", "bad duration '5': missing unit (e.g. 250ms, 5s, 1.5s, 1m, 1h)"),
        ("5sec", "bad duration '5sec': unknown unit 'sec' (expected ms, s, m or h)"),
        ("1d", "bad duration '1d': unknown unit 'd' (expected ms, s, m or h)"),
        ("5S", "bad duration '5S': unknown unit 'S' (expected ms, s, m or h)"),
        ("0s", "bad duration '0s': must be greater than zero"),
        ("0.0ms", "bad duration '0.0ms': must be greater than zero"),
        ("-5s", "bad duration '-5s': must be greater than zero"),
        (
            "5 s",
            "bad duration '5 s': expected a number and a unit (e.g. 250ms, 5s, 1.5s, 1m, 1h)",
        ),
        ("", "bad duration '': expected a number and a unit (e.g. 250ms, 5s, 1.5s, 1m, 1h)"),
        ("s", "bad duration 's': expected a number and a unit (e.g. 250ms, 5s, 1.5s, 1m, 1h)"),
        (".5s", "bad duration '.5s': expected a number and a unit (e.g. 250ms, 5s, 1.5s, 1m, 1h)"),
        (
            "1e3s",
            "bad duration '1e3s': expected a number and a unit (e.g. 250ms, 5s, 1.5s, 1m, 1h)",
        ),
        (
            "1h30m",
            "bad duration '1h30m': expected a number and a unit (e.g. 250ms, 5s, 1.5s, 1m, 1h)",
        ),
        ("9" * 400 + "h", f"bad duration '{'9' * 400}h': too large"),
    ],
)
def test_bad_duration(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (0.001, "1ms"),
        (5.0, "5s"),
        (1.5, "1500ms"),
        (90.0, "90s"),
        (60.0, "1m"),
        (3600.0, "1h"),
        (5400.0, "90m"),
        (0.0001, "0.0001s"),
        (1e-7, "0.0000001s"),
        (0.1 + 0.2, "0.30000000000000004s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096B", 4096),
        ("0B", 0),
        ("64KiB", 65536),
        ("1MiB", 1 << 20),
        ("1GiB", 1 << 30),
        ("3GiB", 3 << 30),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4096", "bad size '4096': missing unit (e.g. 4096B, 64KiB, 1MiB, 1GiB)"),
        (
            "1MB",
            "bad size '1MB': unknown unit 'MB' (expected B, KiB, MiB or GiB; 1KiB is 1024 bytes)",
        ),
        (
            "64k",
            "bad size '64k': unknown unit 'k' (expected B, KiB, MiB or GiB; 1KiB is 1024 bytes)",
        ),
        (
            "1.5MiB",
            "bad size '1.5MiB': expected a whole number and a unit (e.g. 4096B, 64KiB, 1MiB, 1GiB)",
        ),
        ("-1MiB", "bad size '-1MiB': must not be negative"),
        ("", "bad size '': expected a whole number and a unit (e.g. 4096B, 64KiB, 1MiB, 1GiB)"),
        ("1" * 16 + "B", f"bad size '{'1' * 16}B': too large"),
    ],
)
def test_bad_size(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("size", "text"),
    [(4096, "4KiB"), (4097, "4097B"), (1 << 20, "1MiB"), (3 << 19, "1536KiB"), (1 << 30, "1GiB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


@PROPERTY
@given(st.floats(min_value=0, exclude_min=True, allow_infinity=False))
def test_every_duration_formats_to_text_that_parses_back_exactly(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@PROPERTY
@given(st.integers(0, 1 << 40))
def test_every_size_formats_to_text_that_parses_back_exactly(size: int) -> None:
    assert parse_size(format_size(size)) == size


# --- valid configs ---------------------------------------------------------------------


def default_route(**changes: Any) -> Route:
    values: dict[str, Any] = {
        "name": "web",
        "listen": TcpAddress("127.0.0.1", 8080),
        "upstreams": (Upstream(TcpAddress("127.0.0.1", 8000), 1),),
        "balance": "round_robin",
        "connect_timeout": DEFAULT_CONNECT_TIMEOUT,
        "idle_timeout": DEFAULT_IDLE_TIMEOUT,
        "pipe_size": DEFAULT_PIPE_SIZE,
        "max_connections": DEFAULT_MAX_CONNECTIONS,
        "allow": (),
        "deny": (),
    }
    values.update(changes)
    return Route(**values)


def test_minimal_config_is_complete_and_filled_with_defaults() -> None:
    assert parse_config(MINIMAL, FILE) == Config(
        workers=1,
        shutdown_timeout=30.0,
        metrics=MetricsConfig(TcpAddress("127.0.0.1", 9109)),
        log=LogConfig(level="info", format="json", access_log=True),
        routes=(default_route(),),
        source=FILE,
    )


def test_default_constants() -> None:
    assert DEFAULT_CONNECT_TIMEOUT == 5.0
    assert DEFAULT_IDLE_TIMEOUT == 3600.0
    assert DEFAULT_PIPE_SIZE == 1048576
    assert DEFAULT_MAX_CONNECTIONS == 10000
    assert DEFAULT_SHUTDOWN_TIMEOUT == 30.0
    assert DEFAULT_PROXY_PROTOCOL_TIMEOUT == 3.0
    assert DEFAULT_RESOLVE_INTERVAL == 30.0
    assert HealthCheck() == HealthCheck(5.0, 1.0, 2, 3, None, None)


def test_minimal_config_leaves_every_optional_feature_off() -> None:
    config = parse_config(MINIMAL, FILE)
    assert config.max_connections is None
    (route,) = config.routes
    assert route.balance == "round_robin"
    assert route.proxy_protocol == "none"
    assert route.accept_proxy_protocol is False
    assert route.proxy_protocol_timeout == 3.0
    assert route.health_check is None
    assert route.max_connect_attempts is None
    assert route.max_duration is None
    assert route.resolve_interval == 30.0


FULL = """\
workers: 1
shutdown_timeout: 10s
max_connections: 20_000
metrics:
  listen: "[::1]:9200"
log: {level: debug, format: text, access_log: false}
defaults:
  connect_timeout: 250ms
  idle_timeout: 10m
  max_duration: 12h
  pipe_size: 64KiB
  max_connections: 500
  max_connect_attempts: 2
  proxy_protocol_timeout: 500ms
  resolve_interval: 1m
routes:
  - name: web
    listen: 0.0.0.0:8080
    upstreams:
      - address: 10.0.0.2:8000
        weight: 2
      - address: backend.internal:8000
    balance: least_connections
    proxy_protocol: v2
    accept_proxy_protocol: true
    allow: [10.0.0.0/8, "::1/128", 192.168.1.7]
    deny: ["10.1.0.0/16"]
    health_check:
      interval: 10s
      timeout: 2s
      rise: 1
      fall: 5
      send: "PING\\r\\n"
      expect: +PONG
    max_connect_attempts: null
  - name: socket.v2
    listen: unix:/run/web.sock
    upstreams:
      - address: unix:/run/backend.sock
        weight: 1000
    balance: source_hash
    proxy_protocol: v1
    accept_proxy_protocol: false
    proxy_protocol_timeout: 2s
    health_check: true
    connect_timeout: 1.5s
    idle_timeout: 2h
    max_duration: 30s
    pipe_size: 1GiB
    max_connections: 1_000_000
    max_connect_attempts: 100
    resolve_interval: 5s
"""


def test_full_config_with_every_key() -> None:
    assert parse_config(FULL, "full.yaml") == Config(
        workers=1,
        shutdown_timeout=10.0,
        metrics=MetricsConfig(TcpAddress("::1", 9200)),
        log=LogConfig(level="debug", format="text", access_log=False),
        routes=(
            Route(
                name="web",
                listen=TcpAddress("0.0.0.0", 8080),
                upstreams=(
                    Upstream(TcpAddress("10.0.0.2", 8000), 2),
                    Upstream(TcpAddress("backend.internal", 8000), 1),
                ),
                balance="least_connections",
                connect_timeout=0.25,
                idle_timeout=600.0,
                pipe_size=65536,
                max_connections=500,
                allow=(network("10.0.0.0/8"), network("::1/128"), network("192.168.1.7/32")),
                deny=(network("10.1.0.0/16"),),
                proxy_protocol="v2",
                accept_proxy_protocol=True,
                proxy_protocol_timeout=0.5,
                health_check=HealthCheck(
                    interval=10.0, timeout=2.0, rise=1, fall=5, send=b"PING\r\n", expect=b"+PONG"
                ),
                max_connect_attempts=None,
                max_duration=43200.0,
                resolve_interval=60.0,
            ),
            Route(
                name="socket.v2",
                listen=UnixAddress("/run/web.sock"),
                upstreams=(Upstream(UnixAddress("/run/backend.sock"), 1000),),
                balance="source_hash",
                connect_timeout=1.5,
                idle_timeout=7200.0,
                pipe_size=1 << 30,
                max_connections=1_000_000,
                allow=(),
                deny=(),
                proxy_protocol="v1",
                accept_proxy_protocol=False,
                proxy_protocol_timeout=2.0,
                health_check=HealthCheck(),
                max_connect_attempts=100,
                max_duration=30.0,
                resolve_interval=5.0,
            ),
        ),
        source="full.yaml",
        max_connections=20_000,
    )


@pytest.mark.parametrize(
    ("metrics", "listen"),
    [
        ("metrics: {listen: null}\n", None),
        ("metrics: {listen: ~}\n", None),
        ("metrics: false\n", None),
        ("metrics: {}\n", TcpAddress("127.0.0.1", 9109)),
        ("metrics:\n  listen: 0.0.0.0:9100\n", TcpAddress("0.0.0.0", 9100)),
        ("metrics:\n  listen: 127.0.0.1:0\n", TcpAddress("127.0.0.1", 0)),
    ],
)
def test_metrics_listen(metrics: str, listen: Address | None) -> None:
    assert parse_config(metrics + MINIMAL, FILE).metrics == MetricsConfig(listen)


def test_booleans_in_every_yaml_spelling() -> None:
    for spelling, value in [("true", True), ("False", False), ("yes", True), ("off", False)]:
        config = parse_config(f"log: {{access_log: {spelling}}}\n" + MINIMAL, FILE)
        assert config.log.access_log is value


def test_anchors_aliases_merge_keys_and_explicit_tags_are_accepted() -> None:
    text = """\
defaults: &tuning
  idle_timeout: 5m
routes:
  - &route
    name: !!str 1
    listen: 127.0.0.1:8080
    upstreams: &backends
      - address: 127.0.0.1:8000
        weight: !!int "3"
  - <<: *route
    name: two
    listen: 127.0.0.1:8081
    upstreams: *backends
  - <<: [*tuning, *route]
    name: three
    listen: 127.0.0.1:8082
"""
    config = parse_config(text, FILE)
    upstreams = (Upstream(TcpAddress("127.0.0.1", 8000), 3),)
    assert config.routes == (
        default_route(name="1", upstreams=upstreams, idle_timeout=300.0),
        default_route(
            name="two",
            listen=TcpAddress("127.0.0.1", 8081),
            upstreams=upstreams,
            idle_timeout=300.0,
        ),
        default_route(
            name="three",
            listen=TcpAddress("127.0.0.1", 8082),
            upstreams=upstreams,
            idle_timeout=300.0,
        ),
    )


def test_route_settings_override_defaults_one_by_one() -> None:
    text = "defaults: {connect_timeout: 1s, max_connections: 7}\n" + MINIMAL.replace(
        "    upstreams:", "    connect_timeout: 2s\n    upstreams:"
    )
    assert parse_config(text, FILE).routes == (
        default_route(connect_timeout=2.0, max_connections=7),
    )


# Each new route key: YAML lines appended to the route in MINIMAL, and the Route fields
# they give.
ROUTE_SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("balance: round_robin\n", {"balance": "round_robin"}),
    ("balance: least_connections\n", {"balance": "least_connections"}),
    ("balance: random\n", {"balance": "random"}),
    ("balance: source_hash\n", {"balance": "source_hash"}),
    ("proxy_protocol: none\n", {"proxy_protocol": "none"}),
    ("proxy_protocol: v1\n", {"proxy_protocol": "v1"}),
    ("proxy_protocol: v2\n", {"proxy_protocol": "v2"}),
    ("accept_proxy_protocol: true\n", {"accept_proxy_protocol": True}),
    ("accept_proxy_protocol: false\n", {"accept_proxy_protocol": False}),
    ("accept_proxy_protocol: yes\n", {"accept_proxy_protocol": True}),
    ("proxy_protocol_timeout: 500ms\n", {"proxy_protocol_timeout": 0.5}),
    ("proxy_protocol_timeout: 1m\n", {"proxy_protocol_timeout": 60.0}),
    ("health_check: {}\n", {"health_check": HealthCheck()}),
    ("health_check: true\n", {"health_check": HealthCheck()}),
    ("health_check: on\n", {"health_check": HealthCheck()}),
    ("health_check: false\n", {"health_check": None}),
    ("health_check: {interval: 1s}\n", {"health_check": HealthCheck(interval=1.0)}),
    (
        "health_check: {interval: 250ms, timeout: 250ms}\n",
        {"health_check": HealthCheck(interval=0.25, timeout=0.25)},
    ),
    ("health_check: {timeout: 5s}\n", {"health_check": HealthCheck(timeout=5.0)}),
    ("health_check: {rise: 1, fall: 1}\n", {"health_check": HealthCheck(rise=1, fall=1)}),
    ("health_check: {rise: 100, fall: 100}\n", {"health_check": HealthCheck(rise=100, fall=100)}),
    (
        'health_check:\n      send: "PING\\r\\n"\n      expect: "+PONG\\r\\n"\n',
        {"health_check": HealthCheck(send=b"PING\r\n", expect=b"+PONG\r\n")},
    ),
    ("health_check: {expect: SSH-}\n", {"health_check": HealthCheck(expect=b"SSH-")}),
    (
        "health_check: {send: 'a\\r\\n'}\n",
        {"health_check": HealthCheck(send=b"a\\r\\n")},
    ),
    (
        'health_check: {send: "h\\xe9\\x00\\u2603"}\n',
        {"health_check": HealthCheck(send="h\u00e9\x00\u2603".encode())},
    ),
    (
        "health_check: {send: null, expect: ~}\n",
        {"health_check": HealthCheck(send=None, expect=None)},
    ),
    (
        "health_check:\n      send: |\n        QUIT\n",
        {"health_check": HealthCheck(send=b"QUIT\n")},
    ),
    ("max_connect_attempts: 1\n", {"max_connect_attempts": 1}),
    ("max_connect_attempts: 100\n", {"max_connect_attempts": 100}),
    ("max_connect_attempts: null\n", {"max_connect_attempts": None}),
    ("max_connect_attempts:\n", {"max_connect_attempts": None}),
    ("max_duration: 250ms\n", {"max_duration": 0.25}),
    ("max_duration: 24h\n", {"max_duration": 86400.0}),
    ("max_duration: ~\n", {"max_duration": None}),
    ("resolve_interval: 5s\n", {"resolve_interval": 5.0}),
    ("resolve_interval: 1h\n", {"resolve_interval": 3600.0}),
]


@pytest.mark.parametrize(("lines", "changes"), ROUTE_SETTINGS)
def test_route_setting(lines: str, changes: dict[str, Any]) -> None:
    assert parse_config(MINIMAL + "    " + lines, FILE).routes == (default_route(**changes),)


@pytest.mark.parametrize(
    ("lines", "limit"),
    [
        ("", None),
        ("max_connections: null\n", None),
        ("max_connections: 1\n", 1),
        ("max_connections: 10_000_000\n", 10_000_000),
        ("max_connections: 0x100\n", 256),
    ],
)
def test_global_max_connections(lines: str, limit: int | None) -> None:
    config = parse_config(lines + MINIMAL, FILE)
    assert config.max_connections == limit
    # Only the global limit: each route keeps its own.
    assert config.routes == (default_route(),)


# The keys `defaults` may set: the value in defaults, the value it gives, and a route's
# override with the value that gives. A route without the key inherits the default.
DEFAULT_SETTINGS: list[tuple[str, str, Any, str, Any]] = [
    ("proxy_protocol_timeout", "10s", 10.0, "100ms", 0.1),
    ("max_connect_attempts", "3", 3, "1", 1),
    ("max_connect_attempts", "3", 3, "null", None),
    ("max_connect_attempts", "null", None, "7", 7),
    ("max_duration", "1h", 3600.0, "5m", 300.0),
    ("max_duration", "1h", 3600.0, "null", None),
    ("max_duration", "~", None, "30s", 30.0),
    ("resolve_interval", "5m", 300.0, "1s", 1.0),
    ("connect_timeout", "1s", 1.0, "2s", 2.0),
    ("idle_timeout", "1m", 60.0, "2h", 7200.0),
    ("pipe_size", "64KiB", 65536, "4KiB", 4096),
    ("max_connections", "7", 7, "8", 8),
]


@pytest.mark.parametrize(
    ("key", "default_text", "default", "override_text", "override"), DEFAULT_SETTINGS
)
def test_defaults_are_inherited_and_a_route_overrides_them(
    key: str, default_text: str, default: Any, override_text: str, override: Any
) -> None:
    text = (
        f"defaults:\n  {key}: {default_text}\n"
        + MINIMAL
        + SECOND_ROUTE.replace("web", "api")
        + f"    {key}: {override_text}\n"
    )
    inheriting, overriding = parse_config(text, FILE).routes
    assert inheriting == default_route(**{key: default})
    assert overriding == default_route(
        name="api",
        listen=TcpAddress("127.0.0.1", 8081),
        upstreams=(Upstream(TcpAddress("h", 1)),),
        **{key: override},
    )


def test_the_newer_defaults_together_and_a_route_overriding_one() -> None:
    text = """\
defaults:
  proxy_protocol_timeout: 1s
  max_connect_attempts: 2
  max_duration: 1h
  resolve_interval: 10s
routes:
  - name: web
    listen: 127.0.0.1:8080
    upstreams:
      - address: 127.0.0.1:8000
    max_duration: 2h
"""
    assert parse_config(text, FILE).routes == (
        default_route(
            proxy_protocol_timeout=1.0,
            max_connect_attempts=2,
            max_duration=7200.0,
            resolve_interval=10.0,
        ),
    )


def test_yaml_integer_spellings() -> None:
    for spelling, value in [("0x10", 16), ("1_000", 1000), ("010", 8), ("+5", 5), ("1:00", 60)]:
        text = MINIMAL + f"    max_connections: {spelling}\n"
        assert parse_config(text, FILE).routes[0].max_connections == value


# --- one mistake, one error line -------------------------------------------------------

ROUTE_KEYS_LIST = (
    "name, listen, match, upstreams, balance, proxy_protocol, accept_proxy_protocol,"
    " proxy_protocol_trusted, allow, deny, allow_applies_to,"
    " health_check, connect_timeout, idle_timeout, max_duration, pipe_size, max_connections,"
    " max_connect_attempts, max_connections_per_source, proxy_protocol_timeout, resolve_interval,"
    " proxy_protocol_max_header, defer_accept, tls_inspect_timeout, tls_max_client_hello"
)
TOP_KEYS_LIST = (
    "workers, shutdown_timeout, max_connections, metrics, control, log, defaults, routes"
)
DEFAULTS_KEYS_LIST = (
    "connect_timeout, idle_timeout, max_duration, pipe_size, max_connections,"
    " max_connect_attempts, max_connections_per_source, proxy_protocol_timeout, resolve_interval,"
    " proxy_protocol_max_header, defer_accept, tls_inspect_timeout, tls_max_client_hello"
)
HEALTH_CHECK_KEYS_LIST = "interval, timeout, rise, fall, send, expect"
DURATION_HINT = "(e.g. 250ms, 5s, 1.5s, 1m, 1h)"
SECOND_ROUTE = "  - name: web\n    listen: 127.0.0.1:8081\n    upstreams:\n      - address: h:1\n"

BAD_CONFIGS = {
    "unknown key": (
        MINIMAL + "    colour: blue\n",
        f"relay.yaml:6: routes[0].colour: unknown key (allowed keys: {ROUTE_KEYS_LIST})",
    ),
    "unknown key with a suggestion": (
        "shutdown_timout: 5s\n" + MINIMAL,
        "relay.yaml:1: shutdown_timout: unknown key; did you mean 'shutdown_timeout'?"
        f" (allowed keys: {TOP_KEYS_LIST})",
    ),
    "bad duration": (
        MINIMAL + "    connect_timeout: 5 seconds\n",
        "relay.yaml:6: routes[0].connect_timeout: bad duration '5 seconds':"
        " expected a number and a unit (e.g. 250ms, 5s, 1.5s, 1m, 1h)",
    ),
    "duration without unit": (
        "shutdown_timeout: 30\n" + MINIMAL,
        "relay.yaml:1: shutdown_timeout: bad duration '30': missing unit"
        " (e.g. 250ms, 5s, 1.5s, 1m, 1h)",
    ),
    "bad size": (
        "defaults:\n  pipe_size: 1MB\n" + MINIMAL,
        "relay.yaml:2: defaults.pipe_size: bad size '1MB': unknown unit 'MB'"
        " (expected B, KiB, MiB or GiB; 1KiB is 1024 bytes)",
    ),
    "pipe size out of range": (
        MINIMAL + "    pipe_size: 2GiB\n",
        "relay.yaml:6: routes[0].pipe_size: 2GiB is out of range (4KiB to 1GiB)",
    ),
    "bad address": (
        MINIMAL.replace("127.0.0.1:8000", "foo"),
        "relay.yaml:5: routes[0].upstreams[0].address: bad address 'foo': missing port"
        " (expected host:port, [v6]:port or unix:/path)",
    ),
    "unbracketed IPv6": (
        MINIMAL.replace("127.0.0.1:8080", "::1:8080"),
        "relay.yaml:3: routes[0].listen: bad address '::1:8080':"
        " an IPv6 address needs brackets and a port, e.g. [::1]:80",
    ),
    "listen port 0": (
        MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0"),
        "relay.yaml:3: routes[0].listen: port 0 is not allowed here"
        " (a listener needs a fixed port)",
    ),
    "upstream port 0": (
        MINIMAL.replace("127.0.0.1:8000", "'[::1]:0'"),
        "relay.yaml:5: routes[0].upstreams[0].address: port 0 is not allowed for an upstream",
    ),
    "duplicate route name": (
        MINIMAL + SECOND_ROUTE,
        "relay.yaml:6: routes[1].name: duplicate route name 'web' (first on line 2)",
    ),
    "duplicate listen address": (
        MINIMAL + SECOND_ROUTE.replace("web", "api").replace("8081", "8080"),
        "relay.yaml:7: routes[1].listen: 127.0.0.1:8080 is already used by route 'web' (line 3)",
    ),
    "listen on the default metrics address": (
        MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:9109"),
        "relay.yaml:3: routes[0].listen: 127.0.0.1:9109 is already used by the metrics endpoint"
        " (the default metrics.listen)",
    ),
    "missing upstreams": (
        "routes:\n  - name: web\n    listen: 127.0.0.1:8080\n",
        "relay.yaml:2: routes[0]: missing required key 'upstreams'",
    ),
    "empty upstreams": (
        "routes:\n  - name: web\n    listen: 127.0.0.1:8080\n    upstreams: []\n",
        "relay.yaml:4: routes[0].upstreams: must list at least one upstream",
    ),
    "missing address": (
        MINIMAL.replace("address: 127.0.0.1:8000", "weight: 2"),
        "relay.yaml:5: routes[0].upstreams[0]: missing required key 'address'",
    ),
    "missing routes": (
        "workers: 1\n",
        "relay.yaml:1: missing required key 'routes'",
    ),
    "empty routes": (
        "routes: []\n",
        "relay.yaml:1: routes: must list at least one route",
    ),
    "not YAML": (
        "routes:\n  - name: [web\n",
        "relay.yaml:3: not valid YAML: expected ',' or ']', but got '<stream end>'"
        " (while parsing a flow sequence)",
    ),
    "unquoted IPv6 address": (
        MINIMAL.replace("127.0.0.1:8080", "[::]:8080"),
        "relay.yaml:3: not valid YAML: expected the node content, but found ':'"
        " (while parsing a flow node); an address in brackets must be quoted, e.g. '[::1]:80'",
    ),
    "tab indentation": (
        "routes:\n\t- name: web\n",
        "relay.yaml:2: not valid YAML: found character '\\t' that cannot start any token"
        " (while scanning for the next token)",
    ),
    "two documents": (
        MINIMAL + "---\n" + MINIMAL,
        "relay.yaml:6: not valid YAML: but found another document"
        " (expected a single document in the stream)",
    ),
    "control character": (
        MINIMAL + "\x07",
        "relay.yaml:6: not valid YAML: character #x0007 is not allowed here"
        " (special characters are not allowed)",
    ),
    "empty file": ("", "relay.yaml:1: the config is empty (it needs at least a 'routes' list)"),
    "only comments": (
        "# nothing here\n",
        "relay.yaml:1: the config is empty (it needs at least a 'routes' list)",
    ),
    "duplicate YAML key": (
        MINIMAL + "    name: other\n",
        "relay.yaml:6: routes[0].name: duplicate key (first on line 2)",
    ),
    "wrong type: string for a mapping": (
        "log: info\n" + MINIMAL,
        "relay.yaml:1: log: expected a mapping, got a string ('info')",
    ),
    "wrong type: mapping for a list": (
        "routes:\n  name: web\n",
        "relay.yaml:2: routes: expected a list, got a mapping",
    ),
    "wrong type: number for a string": (
        MINIMAL.replace("name: web", "name: 42"),
        "relay.yaml:2: routes[0].name: expected a string, got an integer ('42')"
        " (quote it to make it a string)",
    ),
    "wrong type: string for a boolean": (
        "log:\n  access_log: 'true'\n" + MINIMAL,
        "relay.yaml:2: log.access_log: expected true or false, got a string ('true')",
    ),
    "wrong type: top level is a list": (
        "- routes\n",
        "relay.yaml:1: expected a mapping at the top level, got a list",
    ),
    "non-string key": (
        MINIMAL + "    8080: x\n",
        "relay.yaml:6: routes[0]: keys must be strings, not an integer ('8080')",
    ),
    "custom tag": (
        MINIMAL.replace("name: web", "name: !secret web"),
        "relay.yaml:2: routes[0].name: expected a string, got a value tagged !secret ('web')",
    ),
    "standard tag of the wrong kind": (
        "routes: !!binary aGVsbG8=\n",
        "relay.yaml:1: routes: expected a list, got a value tagged !!binary ('aGVsbG8=')",
    ),
    "bad route name": (
        MINIMAL.replace("name: web", "name: web site"),
        "relay.yaml:2: routes[0].name: bad route name 'web site'"
        " (letters, digits, '_', '.' and '-')",
    ),
    "weight out of range": (
        MINIMAL + "        weight: 0\n",
        "relay.yaml:6: routes[0].upstreams[0].weight: 0 is out of range (1 to 1000)",
    ),
    "max_connections out of range": (
        MINIMAL + "    max_connections: 1000001\n",
        "relay.yaml:6: routes[0].max_connections: 1000001 is out of range (1 to 1000000)",
    ),
    "workers too many": (
        "workers: 1025\n" + MINIMAL,
        "relay.yaml:1: workers: 1025: at most 1024 processes",
    ),
    "workers unknown word": (
        "workers: many\n" + MINIMAL,
        "relay.yaml:1: workers: expected an integer or 'auto', got a string ('many')",
    ),
    "workers 0": ("workers: 0\n" + MINIMAL, "relay.yaml:1: workers: 0: must be at least 1"),
    "balance wrong type": (
        MINIMAL + "    balance: [random]\n",
        "relay.yaml:6: routes[0].balance: expected one of round_robin, least_connections,"
        " random, source_hash, got a list",
    ),
    "balance unknown": (
        MINIMAL + "    balance: roundrobin\n",
        "relay.yaml:6: routes[0].balance: unknown value 'roundrobin'; did you mean"
        " 'round_robin'? (expected one of: round_robin, least_connections, random, source_hash)",
    ),
    "balance in the wrong case": (
        MINIMAL + "    balance: Random\n",
        "relay.yaml:6: routes[0].balance: unknown value 'Random'; did you mean 'random'?"
        " (expected one of: round_robin, least_connections, random, source_hash)",
    ),
    "balance in defaults": (
        "defaults: {balance: random}\n" + MINIMAL,
        "relay.yaml:1: defaults.balance: can only be set in each route, not in defaults"
        f" (allowed keys here: {DEFAULTS_KEYS_LIST})",
    ),
    "proxy protocol unknown": (
        MINIMAL + "    proxy_protocol: v3\n",
        "relay.yaml:6: routes[0].proxy_protocol: unknown value 'v3'"
        " (expected one of: none, v1, v2)",
    ),
    "proxy protocol misspelt": (
        MINIMAL + "    proxy_protocol: v 2\n",
        "relay.yaml:6: routes[0].proxy_protocol: unknown value 'v 2'; did you mean 'v2'?"
        " (expected one of: none, v1, v2)",
    ),
    "proxy protocol as a number": (
        MINIMAL + "    proxy_protocol: 2\n",
        "relay.yaml:6: routes[0].proxy_protocol: expected one of none, v1, v2,"
        " got an integer ('2')",
    ),
    "proxy protocol as a boolean": (
        MINIMAL + "    proxy_protocol: false\n",
        "relay.yaml:6: routes[0].proxy_protocol: expected one of none, v1, v2,"
        " got a boolean ('false')",
    ),
    "proxy protocol in defaults": (
        "defaults:\n  proxy_protocol: v1\n" + MINIMAL,
        "relay.yaml:2: defaults.proxy_protocol: can only be set in each route, not in defaults"
        f" (allowed keys here: {DEFAULTS_KEYS_LIST})",
    ),
    "accept proxy protocol not a boolean": (
        MINIMAL + "    accept_proxy_protocol: v1\n",
        "relay.yaml:6: routes[0].accept_proxy_protocol: expected true or false,"
        " got a string ('v1')",
    ),
    "accept proxy protocol quoted": (
        MINIMAL + "    accept_proxy_protocol: 'yes'\n",
        "relay.yaml:6: routes[0].accept_proxy_protocol: expected true or false,"
        " got a string ('yes')",
    ),
    "proxy protocol timeout without unit": (
        MINIMAL + "    proxy_protocol_timeout: 3\n",
        "relay.yaml:6: routes[0].proxy_protocol_timeout: bad duration '3': missing unit"
        f" {DURATION_HINT}",
    ),
    "proxy protocol timeout zero": (
        MINIMAL + "    proxy_protocol_timeout: 0s\n",
        "relay.yaml:6: routes[0].proxy_protocol_timeout: bad duration '0s':"
        " must be greater than zero",
    ),
    "proxy protocol timeout null": (
        MINIMAL + "    proxy_protocol_timeout: null\n",
        f"relay.yaml:6: routes[0].proxy_protocol_timeout: expected a duration {DURATION_HINT},"
        " got null",
    ),
    "proxy protocol timeout in defaults": (
        "defaults:\n  proxy_protocol_timeout: 1d\n" + MINIMAL,
        "relay.yaml:2: defaults.proxy_protocol_timeout: bad duration '1d': unknown unit 'd'"
        " (expected ms, s, m or h)",
    ),
    "health check a number": (
        MINIMAL + "    health_check: 5\n",
        "relay.yaml:6: routes[0].health_check: expected a mapping, true or false,"
        " got an integer ('5')",
    ),
    "health check a quoted boolean": (
        MINIMAL + "    health_check: 'true'\n",
        "relay.yaml:6: routes[0].health_check: expected a mapping, true or false,"
        " got a string ('true')",
    ),
    "health check left empty": (
        MINIMAL + "    health_check:\n",
        "relay.yaml:6: routes[0].health_check: expected a mapping, true or false, got null",
    ),
    "health check a list": (
        MINIMAL + "    health_check: []\n",
        "relay.yaml:6: routes[0].health_check: expected a mapping, true or false, got a list",
    ),
    "health check unknown key": (
        MINIMAL + "    health_check:\n      intervall: 5s\n",
        "relay.yaml:7: routes[0].health_check.intervall: unknown key; did you mean 'interval'?"
        f" (allowed keys: {HEALTH_CHECK_KEYS_LIST})",
    ),
    "health check in defaults": (
        "defaults: {health_check: true}\n" + MINIMAL,
        "relay.yaml:1: defaults.health_check: can only be set in each route, not in defaults"
        f" (allowed keys here: {DEFAULTS_KEYS_LIST})",
    ),
    "health check interval zero": (
        MINIMAL + "    health_check:\n      interval: 0s\n",
        "relay.yaml:7: routes[0].health_check.interval: bad duration '0s':"
        " must be greater than zero",
    ),
    "health check timeout not a duration": (
        MINIMAL + "    health_check: {timeout: fast}\n",
        "relay.yaml:6: routes[0].health_check.timeout: bad duration 'fast':"
        f" expected a number and a unit {DURATION_HINT}",
    ),
    "health check timeout longer than interval": (
        MINIMAL + "    health_check:\n      interval: 1s\n      timeout: 2s\n",
        "relay.yaml:8: routes[0].health_check.timeout: 2s is longer than the interval (1s)",
    ),
    "health check timeout longer than the default interval": (
        MINIMAL + "    health_check: {timeout: 6s}\n",
        "relay.yaml:6: routes[0].health_check.timeout: 6s is longer than the interval (5s)",
    ),
    "health check interval shorter than the default timeout": (
        MINIMAL + "    health_check:\n      interval: 500ms\n",
        "relay.yaml:7: routes[0].health_check.interval: 500ms is shorter than the default"
        " timeout (1s); set a timeout of at most 500ms",
    ),
    "health check rise zero": (
        MINIMAL + "    health_check: {rise: 0}\n",
        "relay.yaml:6: routes[0].health_check.rise: 0 is out of range (1 to 100)",
    ),
    "health check fall too large": (
        MINIMAL + "    health_check: {fall: 101}\n",
        "relay.yaml:6: routes[0].health_check.fall: 101 is out of range (1 to 100)",
    ),
    "health check rise not an integer": (
        MINIMAL + "    health_check: {rise: 2.5}\n",
        "relay.yaml:6: routes[0].health_check.rise: expected an integer, got a number ('2.5')",
    ),
    "health check send a number": (
        MINIMAL + "    health_check: {send: 42}\n",
        "relay.yaml:6: routes[0].health_check.send: expected a string, got an integer ('42')"
        " (quote it to make it a string)",
    ),
    "health check send empty": (
        MINIMAL + "    health_check: {send: ''}\n",
        "relay.yaml:6: routes[0].health_check.send: must not be empty"
        " (leave it out to send nothing)",
    ),
    "health check expect empty": (
        MINIMAL + '    health_check: {expect: ""}\n',
        "relay.yaml:6: routes[0].health_check.expect: must not be empty"
        " (leave it out to need no reply)",
    ),
    "health check expect a list": (
        MINIMAL + "    health_check: {expect: [a]}\n",
        "relay.yaml:6: routes[0].health_check.expect: expected a string, got a list",
    ),
    "health check send binary": (
        MINIMAL + "    health_check: {send: !!binary aGVsbG8=}\n",
        "relay.yaml:6: routes[0].health_check.send: expected a string,"
        " got a value tagged !!binary ('aGVsbG8=')",
    ),
    "max_connect_attempts zero": (
        MINIMAL + "    max_connect_attempts: 0\n",
        "relay.yaml:6: routes[0].max_connect_attempts: 0 is out of range (1 to 100)",
    ),
    "max_connect_attempts too large": (
        MINIMAL + "    max_connect_attempts: 101\n",
        "relay.yaml:6: routes[0].max_connect_attempts: 101 is out of range (1 to 100)",
    ),
    "max_connect_attempts quoted": (
        MINIMAL + "    max_connect_attempts: '3'\n",
        "relay.yaml:6: routes[0].max_connect_attempts: expected an integer or null,"
        " got a string ('3')",
    ),
    "max_connect_attempts a number": (
        MINIMAL + "    max_connect_attempts: 2.5\n",
        "relay.yaml:6: routes[0].max_connect_attempts: expected an integer or null,"
        " got a number ('2.5')",
    ),
    "max_connect_attempts in defaults": (
        "defaults:\n  max_connect_attempts: 0\n" + MINIMAL,
        "relay.yaml:2: defaults.max_connect_attempts: 0 is out of range (1 to 100)",
    ),
    "max_duration zero": (
        MINIMAL + "    max_duration: 0s\n",
        "relay.yaml:6: routes[0].max_duration: bad duration '0s': must be greater than zero",
    ),
    "max_duration forever": (
        MINIMAL + "    max_duration: forever\n",
        "relay.yaml:6: routes[0].max_duration: bad duration 'forever':"
        f" expected a number and a unit {DURATION_HINT}",
    ),
    "max_duration a list": (
        MINIMAL + "    max_duration: []\n",
        f"relay.yaml:6: routes[0].max_duration: expected a duration {DURATION_HINT} or null,"
        " got a list",
    ),
    "max_duration in defaults": (
        "defaults:\n  max_duration: -1s\n" + MINIMAL,
        "relay.yaml:2: defaults.max_duration: bad duration '-1s': must be greater than zero",
    ),
    "resolve_interval without unit": (
        MINIMAL + "    resolve_interval: 30\n",
        "relay.yaml:6: routes[0].resolve_interval: bad duration '30': missing unit"
        f" {DURATION_HINT}",
    ),
    "resolve_interval null": (
        MINIMAL + "    resolve_interval: null\n",
        f"relay.yaml:6: routes[0].resolve_interval: expected a duration {DURATION_HINT}, got null",
    ),
    "resolve_interval in defaults": (
        "defaults:\n  resolve_interval: -1s\n" + MINIMAL,
        "relay.yaml:2: defaults.resolve_interval: bad duration '-1s': must be greater than zero",
    ),
    "global max_connections zero": (
        "max_connections: 0\n" + MINIMAL,
        "relay.yaml:1: max_connections: 0 is out of range (1 to 10000000)",
    ),
    "global max_connections too large": (
        "max_connections: 10_000_001\n" + MINIMAL,
        "relay.yaml:1: max_connections: 10000001 is out of range (1 to 10000000)",
    ),
    "global max_connections not a number": (
        "max_connections: many\n" + MINIMAL,
        "relay.yaml:1: max_connections: expected an integer or null, got a string ('many')",
    ),
    "global max_connections a mapping": (
        "max_connections: {}\n" + MINIMAL,
        "relay.yaml:1: max_connections: expected an integer or null, got a mapping",
    ),
    "network with host bits": (
        MINIMAL + "    allow: [10.0.0.1/8]\n",
        "relay.yaml:6: routes[0].allow[0]: bad network '10.0.0.1/8':"
        " host bits are set; did you mean 10.0.0.0/8?",
    ),
    "bad network": (
        MINIMAL + "    deny:\n      - ::1/129\n",
        "relay.yaml:7: routes[0].deny[0]: bad network '::1/129': expected an IPv4 or IPv6"
        " address or network, e.g. 10.0.0.0/8 or fd00::/8",
    ),
    "metrics on a unix socket": (
        "metrics: {listen: 'unix:/run/m.sock'}\n" + MINIMAL,
        "relay.yaml:1: metrics.listen: must be a TCP address (host:port)",
    ),
    "metrics true": (
        "metrics: true\n" + MINIMAL,
        "relay.yaml:1: metrics: expected a mapping or false, got a boolean ('true')",
    ),
    "log level": (
        "log:\n  level: verbose\n" + MINIMAL,
        "relay.yaml:2: log.level: unknown value 'verbose'"
        " (expected one of: debug, info, warning, error)",
    ),
    "merge of a scalar": (
        MINIMAL + "    <<: 5\n",
        "relay.yaml:6: routes[0]: '<<' merges mappings, not an integer ('5')",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_one_mistake_gives_exactly_one_error_line(case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    errors = errors_of(text)
    assert errors == [expected]
    assert re.match(r"^relay\.yaml:[0-9]+: \S", errors[0])


def test_every_problem_in_a_file_is_reported_in_line_order() -> None:
    text = """\
workers: 0
routes:
  - name: web
    listen: 127.0.0.1:80
    upstreams:
      - address: nowhere
    idle_timeout: forever
  - name: web
    upstreams: []
    colour: blue
"""
    assert errors_of(text) == [
        "relay.yaml:1: workers: 0: must be at least 1",
        "relay.yaml:6: routes[0].upstreams[0].address: bad address 'nowhere': missing port"
        " (expected host:port, [v6]:port or unix:/path)",
        "relay.yaml:7: routes[0].idle_timeout: bad duration 'forever':"
        " expected a number and a unit (e.g. 250ms, 5s, 1.5s, 1m, 1h)",
        "relay.yaml:8: routes[1].name: duplicate route name 'web' (first on line 3)",
        "relay.yaml:8: routes[1]: missing required key 'listen'",
        "relay.yaml:9: routes[1].upstreams: must list at least one upstream",
        f"relay.yaml:10: routes[1].colour: unknown key (allowed keys: {ROUTE_KEYS_LIST})",
    ]


def test_a_bad_default_is_reported_once_not_per_route() -> None:
    text = "defaults: {idle_timeout: 0s}\n" + MINIMAL + SECOND_ROUTE.replace("web", "api")
    assert errors_of(text) == [
        "relay.yaml:1: defaults.idle_timeout: bad duration '0s': must be greater than zero"
    ]
    text = "defaults: {max_connect_attempts: 0}\n" + MINIMAL + SECOND_ROUTE.replace("web", "api")
    assert errors_of(text) == [
        "relay.yaml:1: defaults.max_connect_attempts: 0 is out of range (1 to 100)"
    ]


def test_every_problem_in_the_newer_settings_is_reported() -> None:
    text = (
        "max_connections: -1\n"
        + MINIMAL
        + """\
    balance: fastest
    proxy_protocol: v3
    accept_proxy_protocol: maybe
    proxy_protocol_timeout: 0s
    health_check:
      interval: 0s
      timeout: 1
      rise: 0
      fall: many
      send: 5
      expect: ""
      colour: red
    max_connect_attempts: 0
    max_duration: soon
    resolve_interval: ~
"""
    )
    assert errors_of(text) == [
        "relay.yaml:1: max_connections: -1 is out of range (1 to 10000000)",
        "relay.yaml:7: routes[0].balance: unknown value 'fastest'"
        " (expected one of: round_robin, least_connections, random, source_hash)",
        "relay.yaml:8: routes[0].proxy_protocol: unknown value 'v3'"
        " (expected one of: none, v1, v2)",
        "relay.yaml:9: routes[0].accept_proxy_protocol: expected true or false,"
        " got a string ('maybe')",
        "relay.yaml:10: routes[0].proxy_protocol_timeout: bad duration '0s':"
        " must be greater than zero",
        "relay.yaml:12: routes[0].health_check.interval: bad duration '0s':"
        " must be greater than zero",
        f"relay.yaml:13: routes[0].health_check.timeout: bad duration '1': missing unit"
        f" {DURATION_HINT}",
        "relay.yaml:14: routes[0].health_check.rise: 0 is out of range (1 to 100)",
        "relay.yaml:15: routes[0].health_check.fall: expected an integer, got a string ('many')",
        "relay.yaml:16: routes[0].health_check.send: expected a string, got an integer ('5')"
        " (quote it to make it a string)",
        "relay.yaml:17: routes[0].health_check.expect: must not be empty"
        " (leave it out to need no reply)",
        "relay.yaml:18: routes[0].health_check.colour: unknown key"
        f" (allowed keys: {HEALTH_CHECK_KEYS_LIST})",
        "relay.yaml:19: routes[0].max_connect_attempts: 0 is out of range (1 to 100)",
        "relay.yaml:20: routes[0].max_duration: bad duration 'soon':"
        f" expected a number and a unit {DURATION_HINT}",
        f"relay.yaml:21: routes[0].resolve_interval: expected a duration {DURATION_HINT}, got null",
    ]


# --- files and the command line --------------------------------------------------------


def test_example_config_runs_as_it_is() -> None:
    config = load_config(str(EXAMPLE))
    assert config.max_connections is None
    assert config.routes == (default_route(),)


# A key the example shows commented out: "# key: value", with nothing else after the "#".
_COMMENTED_KEY = re.compile(r"^(\s*)# (\s*[a-z_]+:(?: .*)?)$", re.MULTILINE)


def test_example_config_with_every_commented_out_key_in_use() -> None:
    text = EXAMPLE.read_text()
    uncommented = _COMMENTED_KEY.sub(r"\1\2", text)
    assert uncommented != text
    config = parse_config(uncommented, "relay.yaml")
    assert config.max_connections == 50000
    assert config.routes == (
        default_route(
            max_duration=86400.0,
            max_connect_attempts=3,
            health_check=HealthCheck(
                interval=5.0, timeout=1.0, rise=2, fall=3, send=b"PING\r\n", expect=b"+PONG"
            ),
            allow=(network("127.0.0.0/8"), network("::1/128")),
            proxy_protocol_trusted=(network("10.0.0.5/32"), network("fd00::5/128")),
            defer_accept=True,
            match=RouteMatch(sni=("app.example.com", "*.app.example.com"), alpn=("h2", "http/1.1")),
        ),
    )


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(MINIMAL)
    config = load_config(str(path))
    assert config.source == str(path)
    assert config.routes == (default_route(),)


def test_load_config_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("routes: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.errors == [f"{path}:1: routes: expected a list, got an integer ('5')"]


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.errors == [f"{path}: cannot read: No such file or directory"]
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path))
    assert caught.value.errors == [f"{tmp_path}: cannot read: Is a directory"]


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_bytes(b"routes: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.errors == [f"{path}: cannot read: not UTF-8 text (byte 8)"]


def test_config_from_args() -> None:
    config = config_from_args("127.0.0.1:8080", ["127.0.0.1:8000", "unix:/run/b.sock"])
    assert config == Config(
        workers=1,
        shutdown_timeout=30.0,
        metrics=MetricsConfig(TcpAddress("127.0.0.1", 9109)),
        log=LogConfig(),
        routes=(
            default_route(
                name="default",
                upstreams=(
                    Upstream(TcpAddress("127.0.0.1", 8000)),
                    Upstream(UnixAddress("/run/b.sock")),
                ),
            ),
        ),
        source="<command line>",
    )


@pytest.mark.parametrize(
    ("listen", "upstreams", "errors"),
    [
        (
            "8080",
            ["127.0.0.1:1"],
            [
                "<command line>: --listen: bad address '8080': missing port"
                " (expected host:port, [v6]:port or unix:/path)"
            ],
        ),
        (
            "127.0.0.1:0",
            ["127.0.0.1:1"],
            ["<command line>: --listen: port 0 is not allowed in '127.0.0.1:0'"],
        ),
        (
            "127.0.0.1:8080",
            ["ok:1", "x:y"],
            [
                "<command line>: --upstream: bad address 'x:y':"
                " port 'y' is not a number from 0 to 65535"
            ],
        ),
        (
            "127.0.0.1:8080",
            [],
            ["<command line>: --upstream: at least one upstream is needed"],
        ),
    ],
)
def test_config_from_bad_args(listen: str, upstreams: list[str], errors: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_args(listen, upstreams)
    assert caught.value.errors == errors


# --- rendering -------------------------------------------------------------------------

RENDERED_MINIMAL = """\
# Effective configuration: every default is written out.
workers: 1
shutdown_timeout: 30s
max_connections: null
metrics:
  listen: 127.0.0.1:9109
control:
  socket: auto
log:
  level: info
  format: json
  access_log: true
routes:
- name: web
  listen: 127.0.0.1:8080
  defer_accept: false
  upstreams:
  - address: 127.0.0.1:8000
    weight: 1
    resolve: all
  balance: round_robin
  proxy_protocol: none
  accept_proxy_protocol: false
  proxy_protocol_trusted: []
  proxy_protocol_timeout: 3s
  proxy_protocol_max_header: 4KiB
  tls_inspect_timeout: 5s
  tls_max_client_hello: 16389B
  health_check: false
  connect_timeout: 5s
  idle_timeout: 1h
  max_duration: null
  pipe_size: 1MiB
  max_connections: 10000
  max_connect_attempts: null
  resolve_interval: 30s
  max_connections_per_source: null
  allow: []
  deny: []
  allow_applies_to: both
"""


def test_render_minimal_config_writes_out_every_default() -> None:
    assert render_config(parse_config(MINIMAL, FILE)) == RENDERED_MINIMAL


def test_render_writes_out_every_new_setting() -> None:
    text = (
        "max_connections: 5000\n"
        + MINIMAL
        + """\
    balance: source_hash
    proxy_protocol: v1
    accept_proxy_protocol: true
    proxy_protocol_timeout: 250ms
    proxy_protocol_trusted: [10.0.0.0/8, "::1"]
    proxy_protocol_max_header: 1KiB
    allow_applies_to: peer
    health_check: {send: "PING\\r\\n", expect: "+PONG", interval: 2m}
    max_connect_attempts: 2
    max_duration: 90m
    resolve_interval: 1m
    max_connections_per_source: 20
"""
    )
    rendered = render_config(parse_config(text, FILE))
    assert rendered.startswith(
        "# Effective configuration: every default is written out.\n"
        "workers: 1\n"
        "shutdown_timeout: 30s\n"
        "max_connections: 5000\n"
    )
    assert rendered.endswith(
        """\
  balance: source_hash
  proxy_protocol: v1
  accept_proxy_protocol: true
  proxy_protocol_trusted:
  - 10.0.0.0/8
  - ::1/128
  proxy_protocol_timeout: 250ms
  proxy_protocol_max_header: 1KiB
  tls_inspect_timeout: 5s
  tls_max_client_hello: 16389B
  health_check:
    interval: 2m
    timeout: 1s
    rise: 2
    fall: 3
    send: "PING\\r\\n"
    expect: +PONG
  connect_timeout: 5s
  idle_timeout: 1h
  max_duration: 90m
  pipe_size: 1MiB
  max_connections: 10000
  max_connect_attempts: 2
  resolve_interval: 1m
  max_connections_per_source: 20
  allow: []
  deny: []
  allow_applies_to: peer
"""
    )


ROUND_TRIPS = [
    MINIMAL,
    FULL,
    "metrics: false\n" + MINIMAL,
    "max_connections: 1\n" + MINIMAL + "    health_check: true\n",
    MINIMAL + '    health_check: {send: "\\0\\t\\x85\\u2028\\ufeff\\U0001F600 #: \'"}\n',
    MINIMAL + "    health_check: {send: 'null', expect: '5s'}\n",
    MINIMAL + "    health_check: {send: ' a ', expect: '- b'}\n",
    MINIMAL + '    health_check: {send: "a\\Nb", expect: "\\x85\\L\\P "}\n',
    "defaults: {max_duration: 1h, max_connect_attempts: 3}\n"
    + MINIMAL
    + "    max_duration: null\n    max_connect_attempts: ~\n",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_rendered_config_parses_back_to_an_equal_config(text: str) -> None:
    config = parse_config(text, FILE)
    rendered = render_config(config)
    assert parse_config(rendered, FILE) == config
    assert render_config(parse_config(rendered, FILE)) == rendered


def test_rendered_command_line_config_parses_back() -> None:
    config = config_from_args("[::]:8080", ["backend:80", "unix:/run/x.sock"])
    again = parse_config(render_config(config), "<command line>")
    assert again == config


_LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_HOSTNAMES = st.lists(_LABEL, min_size=1, max_size=3).map(".".join)
_HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), _HOSTNAMES, st.just("::")
)
_UNIX_PATHS = (
    st.text(
        alphabet=st.characters(
            codec="utf-8", categories=["L", "N", "P", "S"], include_characters=" "
        ),
        min_size=1,
        max_size=30,
    )
    .map(lambda tail: "/" + tail)
    .filter(lambda path: not path.endswith("/") and len(path.encode()) <= 107)
)


def _addresses(min_port: int) -> st.SearchStrategy[Address]:
    return st.one_of(
        st.builds(TcpAddress, _HOSTS, st.integers(min_port, 65535)),
        st.builds(UnixAddress, _UNIX_PATHS),
    )


_DURATIONS = st.one_of(
    st.sampled_from([0.001, 0.25, 1.5, 5.0, 60.0, 3600.0, 86400.0]),
    st.floats(min_value=0, exclude_min=True, allow_infinity=False),
)
_NETWORKS = st.builds(
    lambda address, bits: ipaddress.ip_network(
        f"{address}/{bits % (address.max_prefixlen + 1)}", strict=False
    ),
    st.ip_addresses(),
    st.integers(0, 128),
)
# Any text UTF-8 can hold, control characters and all, with YAML's line breaks and
# punctuation often.
_PAYLOADS = st.one_of(
    st.none(),
    st.text(
        st.one_of(st.characters(codec="utf-8"), st.sampled_from("\r\n\x85\u2028\u2029\t '\"#:-\\")),
        min_size=1,
        max_size=20,
    ).map(str.encode),
)
_HEALTH_CHECKS = st.one_of(
    st.none(),
    st.builds(
        lambda durations, rise, fall, send, expect: HealthCheck(
            max(durations), min(durations), rise, fall, send, expect
        ),
        st.tuples(_DURATIONS, _DURATIONS),
        st.integers(1, 100),
        st.integers(1, 100),
        _PAYLOADS,
        _PAYLOADS,
    ),
)
_ROUTES = st.builds(
    Route,
    name=st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True),
    listen=_addresses(1),
    upstreams=st.lists(
        st.builds(Upstream, _addresses(1), st.integers(1, 1000)), min_size=1, max_size=3
    ).map(tuple),
    balance=st.sampled_from(["round_robin", "least_connections", "random", "source_hash"]),
    connect_timeout=_DURATIONS,
    idle_timeout=_DURATIONS,
    pipe_size=st.integers(4096, 1 << 30),
    max_connections=st.integers(1, 1_000_000),
    allow=st.lists(_NETWORKS, max_size=3).map(tuple),
    deny=st.lists(_NETWORKS, max_size=3).map(tuple),
    proxy_protocol=st.sampled_from(["none", "v1", "v2"]),
    accept_proxy_protocol=st.booleans(),
    proxy_protocol_timeout=_DURATIONS,
    health_check=_HEALTH_CHECKS,
    max_connect_attempts=st.one_of(st.none(), st.integers(1, 100)),
    max_duration=st.one_of(st.none(), _DURATIONS),
    resolve_interval=_DURATIONS,
)
_CONFIGS = st.builds(
    Config,
    workers=st.just(1),
    shutdown_timeout=_DURATIONS,
    metrics=st.builds(
        MetricsConfig,
        st.one_of(st.none(), st.builds(TcpAddress, _HOSTS, st.integers(0, 65535))),
    ),
    log=st.builds(
        LogConfig,
        st.sampled_from(["debug", "info", "warning", "error"]),
        st.sampled_from(["json", "text"]),
        st.booleans(),
    ),
    routes=st.lists(
        _ROUTES,
        min_size=1,
        max_size=3,
        unique_by=(lambda route: route.name, lambda route: route.listen),
    ).map(tuple),
    source=st.just(FILE),
    max_connections=st.one_of(st.none(), st.integers(1, 10_000_000)),
)


@PROPERTY
@given(_CONFIGS)
def test_any_config_renders_to_yaml_that_parses_back_to_it(config: Config) -> None:
    assume(all(route.listen != config.metrics.listen for route in config.routes))
    assert parse_config(render_config(config), FILE) == config


# --- fuzzing: only a Config or a ConfigError ever comes out ----------------------------

ERROR_LINE = re.compile(r"relay\.yaml:[0-9]+: \S.*")


def parses_or_reports_cleanly(text: str) -> None:
    try:
        config = parse_config(text, FILE)
    except ConfigError as error:
        assert error.errors, "a ConfigError must carry at least one error"
        lines = text.count("\n") + 2
        for line in error.errors:
            assert ERROR_LINE.fullmatch(line), line
            assert 1 <= int(line.split(":")[1]) <= lines, line
        return
    assert isinstance(config, Config)
    assert parse_config(render_config(config), FILE) == config


@PROPERTY
@given(st.text(max_size=300))
def test_random_text_gives_a_config_or_config_error(text: str) -> None:
    parses_or_reports_cleanly(text)


@PROPERTY
@given(st.text(alphabet="abcdeflnorstu:{}[]-,&*!<>|'\"#%@ \n\t0123456789", max_size=200))
def test_yaml_punctuation_soup_gives_a_config_or_config_error(text: str) -> None:
    parses_or_reports_cleanly(text)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["5s", "1MiB", "127.0.0.1:80", "unix:/x", "10.0.0.0/8", "auto", "none"]),
)
_KEYS = st.one_of(
    st.sampled_from(
        [
            "workers",
            "shutdown_timeout",
            "metrics",
            "log",
            "defaults",
            "routes",
            "listen",
            "name",
            "upstreams",
            "address",
            "weight",
            "allow",
            "level",
            "health_check",
            "interval",
            "send",
            "max_connections",
            "max_duration",
        ]
    ),
    st.text(max_size=10),
    st.integers(),
)
_TREES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=4)
    ),
    max_leaves=25,
)


@PROPERTY
@given(_TREES)
def test_random_yaml_structures_give_a_config_or_config_error(tree: Any) -> None:
    parses_or_reports_cleanly(yaml.safe_dump(tree))


def _maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid-looking value, once in a while anything at all."""
    return st.integers(0, 15).flatmap(lambda dice: _TREES if dice == 0 else valid)


def _pick(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
    """A good value from `good` mostly, a bad one from `bad` now and then."""
    return st.integers(0, 7).flatmap(
        lambda dice: st.sampled_from(bad) if dice == 0 else st.sampled_from(good)
    )


_UPSTREAM_TREES = st.fixed_dictionaries(
    {"address": _maybe(_pick(["127.0.0.1:8000", "[::1]:1", "unix:/u"], ["b:0", "x"]))},
    optional={"weight": _maybe(_pick([1, 1000], [0, 1001, "2"]))},
)
_ROUTE_TREES = st.fixed_dictionaries(
    {
        "name": _maybe(_pick(["web", "api", "db"], ["a b", ""])),
        "listen": _maybe(_pick(["127.0.0.1:8080", "[::]:80", "unix:/s", "h:81"], ["h:0", ":1"])),
        "upstreams": _maybe(st.lists(_maybe(_UPSTREAM_TREES), min_size=1, max_size=3)),
    },
    optional={
        "balance": _maybe(
            _pick(["round_robin", "least_connections", "random", "source_hash"], ["x", 1])
        ),
        "proxy_protocol": _maybe(_pick(["none", "v1", "v2"], ["v3", False])),
        "accept_proxy_protocol": _maybe(_pick([False, True], ["no"])),
        "proxy_protocol_timeout": _maybe(_pick(["3s", "100ms"], ["0s", None])),
        "health_check": _maybe(
            st.one_of(
                st.booleans(),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "interval": _pick(["5s", "1s"], ["500ms", "0s"]),
                        "timeout": _pick(["1s", "100ms"], ["1h", 1]),
                        "rise": _pick([1, 100], [0, 101]),
                        "fall": _pick([3], [0, "3"]),
                        "send": _pick(["PING\r\n", "\x00\u2028", None], ["", 5]),
                        "expect": _pick(["+PONG", "é", None], ["", []]),
                    },
                ),
            )
        ),
        "max_connect_attempts": _maybe(_pick([1, 100, None], [0, 101, "3"])),
        "max_duration": _maybe(_pick(["1h", None], ["0s", 5])),
        "resolve_interval": _maybe(_pick(["30s"], ["30", None])),
        "allow": _maybe(st.lists(_pick(["10.0.0.0/8", "::1", "0.0.0.0/0"], ["1.2.3.4/8"]))),
        "deny": _maybe(st.lists(_pick(["0.0.0.0/0", "fd00::/8"], ["::/129"]))),
        "connect_timeout": _maybe(_pick(["5s", "250ms"], ["0s", "1x", 5])),
        "pipe_size": _maybe(_pick(["64KiB", "1GiB"], ["1KiB", "1MB"])),
        "max_connections": _maybe(_pick([1, 1_000_000], [0, 1_000_001])),
    },
)
_CONFIG_TREES = st.fixed_dictionaries(
    {"routes": _maybe(st.lists(_maybe(_ROUTE_TREES), min_size=1, max_size=3))},
    optional={
        "workers": _maybe(_pick([1], [2, "auto"])),
        "max_connections": _maybe(_pick([1, 10_000_000, None], [0, 10_000_001, "1"])),
        "shutdown_timeout": _maybe(_pick(["30s", "250ms"], ["-1s"])),
        "metrics": _maybe(
            st.one_of(
                st.just(False),
                st.fixed_dictionaries(
                    {}, optional={"listen": _pick([None, "127.0.0.1:9"], ["unix:/m"])}
                ),
            )
        ),
        "log": _maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "level": _pick(["info", "error"], ["loud"]),
                    "format": _pick(["json", "text"], ["xml"]),
                    "access_log": _pick([True, False], ["yes"]),
                },
            )
        ),
        "defaults": _maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "idle_timeout": _pick(["1h"], ["1"]),
                    "pipe_size": _pick(["1MiB"], ["2GiB"]),
                    "max_duration": _pick(["1h", None], ["0s"]),
                    "max_connect_attempts": _pick([3, None], [0]),
                    "proxy_protocol_timeout": _pick(["1s"], ["-1s"]),
                    "resolve_interval": _pick(["1m"], [None]),
                    "balance": st.just("random"),  # a route-only key
                },
            )
        ),
    },
)


@PROPERTY
@given(_CONFIG_TREES, st.booleans())
def test_nearly_valid_configs_give_a_config_or_config_error(tree: Any, flow: bool) -> None:
    parses_or_reports_cleanly(yaml.safe_dump(tree, default_flow_style=flow))
