"""The validated configuration: frozen dataclasses, their defaults and limits (pure)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Final, Literal

from splicerelay.config.addresses import Address, ListenAddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 3600.0
DEFAULT_PIPE_SIZE = 1 << 20
DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_METRICS_LISTEN = "127.0.0.1:9109"
DEFAULT_PROXY_PROTOCOL_TIMEOUT = 3.0
DEFAULT_RESOLVE_INTERVAL = 30.0
# The largest PROXY header a client may send. A v2 header with IPv6 addresses is 52
# bytes, and a few TLVs (ALPN, authority, a unique id, SSL details) stay well under 1 KiB;
# HAProxy reads the whole header from one buffer. 4 KiB leaves room for real TLVs and
# bounds what an unknown peer can make the relay read and checksum.
DEFAULT_PROXY_PROTOCOL_MAX_HEADER = 4 << 10
# A v1 line is at most 107 bytes and a v2 header for unix addresses 232: below this no
# valid header of every kind fits. 16 + 65535 is the largest v2 header there is.
MIN_PROXY_PROTOCOL_MAX_HEADER = 256
MAX_PROXY_PROTOCOL_MAX_HEADER = 16 + 0xFFFF

# How long a route that matches on TLS waits for the client's whole ClientHello, as
# HAProxy's `tcp-request inspect-delay` (which its docs show at 5s).
DEFAULT_TLS_INSPECT_TIMEOUT = 5.0
# The largest ClientHello a client may send, its record headers included: a 16 KiB
# handshake message (one full TLS record's worth; HAProxy inspects within one 16 KiB
# buffer, and today's largest hellos, with post-quantum key shares, are about 1.7 KiB)
# plus one 5-byte record header.
DEFAULT_TLS_MAX_CLIENT_HELLO = (16 << 10) + 5
MIN_TLS_MAX_CLIENT_HELLO = 512
MAX_TLS_MAX_CLIENT_HELLO = 256 << 10

MIN_PIPE_SIZE = 4 << 10
MAX_PIPE_SIZE = 1 << 30
MAX_CONNECTIONS_LIMIT = 1_000_000
MAX_GLOBAL_CONNECTIONS_LIMIT = 10_000_000
MAX_WEIGHT = 1000
MAX_CONNECT_ATTEMPTS_LIMIT = 100
MAX_HEALTH_COUNT = 100
MAX_WORKERS = 1024
WORKERS_AUTO: Final = "auto"

BALANCE_STRATEGIES = ("round_robin", "least_connections", "random", "source_hash")
PROXY_PROTOCOL_VERSIONS = ("none", "v1", "v2")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
# Which client address allow and deny check on a route that accepts PROXY headers: the
# one the header names ("proxy"), the socket's real peer ("peer"), or each of them.
ALLOW_APPLIES_TO = ("both", "proxy", "peer")
# Which addresses of an upstream host name become members: every address it resolves
# to (as nginx does), or only the first.
UPSTREAM_RESOLVE_MODES = ("all", "first")


class ConfigError(Exception):
    """One or more problems in a configuration, each a `FILE:LINE: message` line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class Upstream:
    """A backend a route forwards to; `weight` is its share of new connections.

    `resolve` says which addresses of a host name serve: "all" of them, sharing the
    weight, or only the "first"."""

    address: Address
    weight: int = 1
    resolve: str = "all"


@dataclass(frozen=True)
class HealthCheck:
    """Active checks of each upstream of a route: every `interval`, connect (and, if set,
    send `send` and wait for a reply starting with `expect`) within `timeout`. `fall`
    failures in a row take an upstream out, `rise` successes in a row bring it back."""

    interval: float = 5.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    send: bytes | None = None
    expect: bytes | None = None


@dataclass(frozen=True)
class RouteMatch:
    """What a connection's TLS ClientHello must offer for a route to take it.

    `sni`: host names, lower case, each exact (`app.example.com`) or a wildcard for one
    label (`*.example.com`); empty matches any name and none. `alpn`: protocols, of
    which the hello must offer at least one; empty matches any hello."""

    sni: tuple[str, ...] = ()
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    """One listener and the upstreams its connections go to.

    `health_check` None means no active checks; `max_connect_attempts` None tries each
    upstream once; `max_duration` None lets a connection stay open as long as it is not
    idle for `idle_timeout`."""

    name: str
    listen: ListenAddress  # systemd:NAME: the socket the service manager passes as NAME
    upstreams: tuple[Upstream, ...]
    balance: str
    connect_timeout: float
    idle_timeout: float
    pipe_size: int
    max_connections: int
    allow: tuple[Network, ...]
    deny: tuple[Network, ...]
    proxy_protocol: str = "none"
    accept_proxy_protocol: bool = False
    proxy_protocol_timeout: float = DEFAULT_PROXY_PROTOCOL_TIMEOUT
    health_check: HealthCheck | None = None
    max_connect_attempts: int | None = None
    max_duration: float | None = None
    resolve_interval: float = DEFAULT_RESOLVE_INTERVAL
    # None: no limit on the connections one client address may hold open at once.
    max_connections_per_source: int | None = None
    # Peers allowed to send a PROXY header; empty trusts every peer (warned at load).
    proxy_protocol_trusted: tuple[Network, ...] = ()
    allow_applies_to: str = "both"
    proxy_protocol_max_header: int = DEFAULT_PROXY_PROTOCOL_MAX_HEADER
    # TCP_DEFER_ACCEPT on the listener: a connection is accepted once the client has
    # sent something (see relay/listeners.py). Only for TCP listeners the relay binds.
    defer_accept: bool = False
    # Routes may share a listen address when each but one (the fallback) has a match;
    # a route with a match reads nothing until the ClientHello is in (relay/tls_peek.py).
    match: RouteMatch | None = None
    tls_inspect_timeout: float = DEFAULT_TLS_INSPECT_TIMEOUT
    tls_max_client_hello: int = DEFAULT_TLS_MAX_CLIENT_HELLO


@dataclass(frozen=True)
class Tunables:
    """The settings `defaults` gives every route, and each route may override."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_duration: float | None = None
    pipe_size: int = DEFAULT_PIPE_SIZE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connect_attempts: int | None = None
    proxy_protocol_timeout: float = DEFAULT_PROXY_PROTOCOL_TIMEOUT
    resolve_interval: float = DEFAULT_RESOLVE_INTERVAL
    max_connections_per_source: int | None = None
    proxy_protocol_max_header: int = DEFAULT_PROXY_PROTOCOL_MAX_HEADER
    defer_accept: bool = False
    tls_inspect_timeout: float = DEFAULT_TLS_INSPECT_TIMEOUT
    tls_max_client_hello: int = DEFAULT_TLS_MAX_CLIENT_HELLO


def route_with(tunables: Tunables, **settings: Any) -> Route:
    """A Route with `settings`, and every tunable from `tunables`."""
    for field in dataclasses.fields(tunables):
        settings[field.name] = getattr(tunables, field.name)
    return Route(**settings)


@dataclass(frozen=True)
class MetricsConfig:
    """Where the Prometheus endpoint listens; None turns it off."""

    listen: Address | None


CONTROL_SOCKET_AUTO: Final = "auto"


@dataclass(frozen=True)
class ControlConfig:
    """Where the control socket is: an absolute path, "auto" for the default place
    (chosen at start from $RUNTIME_DIRECTORY and the user: see the relay's control
    socket), or None for no control socket."""

    socket: str | None = CONTROL_SOCKET_AUTO


@dataclass(frozen=True)
class LogConfig:
    """Diagnostics on stderr; with `access_log`, one line per finished connection."""

    level: str = "info"
    format: str = "json"
    access_log: bool = True


Workers = int | Literal["auto"]


def worker_count(workers: Workers) -> int:
    """The number of relay processes `workers` asks for: "auto" is one per usable core.

    Why sched_getaffinity and not os.cpu_count(): a container or `taskset` may confine the
    process to fewer cores than the machine has, and more workers than cores only adds
    context switches."""
    if isinstance(workers, int):
        return workers
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Config:
    """The whole validated configuration, and the file it came from.

    `max_connections` caps the connections of all routes together; None is no such cap.
    `workers` is a process count, or "auto" for one per usable core (see worker_count)."""

    workers: Workers
    shutdown_timeout: float
    metrics: MetricsConfig
    log: LogConfig
    routes: tuple[Route, ...]
    source: str
    max_connections: int | None = None
    control: ControlConfig = ControlConfig()
