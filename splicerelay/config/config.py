"""The YAML configuration: text in, validated frozen dataclasses out.

Parsing is pure. The YAML is composed into nodes rather than loaded into plain objects, so
every value keeps the line it was written on, and every problem is reported as
`FILE:LINE: KEYPATH: message`. All problems in a file are collected before ConfigError is
raised, and nothing else is ever raised, whatever the input.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal

import yaml

from splicerelay.config.addresses import (
    Address,
    AddressError,
    TcpAddress,
    UnixAddress,
    parse_address,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_METRICS_LISTEN",
    "DEFAULT_PIPE_SIZE",
    "DEFAULT_PROXY_PROTOCOL_TIMEOUT",
    "DEFAULT_RESOLVE_INTERVAL",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "Config",
    "ConfigError",
    "HealthCheck",
    "LogConfig",
    "MetricsConfig",
    "Network",
    "Route",
    "Upstream",
    "config_from_args",
    "file_identity",
    "format_duration",
    "format_size",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "read_config",
    "render_config",
    "worker_count",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 3600.0
DEFAULT_PIPE_SIZE = 1 << 20
DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_METRICS_LISTEN = "127.0.0.1:9109"
DEFAULT_PROXY_PROTOCOL_TIMEOUT = 3.0
DEFAULT_RESOLVE_INTERVAL = 30.0

COMMAND_LINE = "<command line>"
DEFAULT_ROUTE_NAME = "default"

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

TOP_KEYS = (
    "workers",
    "shutdown_timeout",
    "max_connections",
    "metrics",
    "log",
    "defaults",
    "routes",
)
METRICS_KEYS = ("listen",)
LOG_KEYS = ("level", "format", "access_log")
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
)
HEALTH_CHECK_KEYS = ("interval", "timeout", "rise", "fall", "send", "expect")
ROUTE_KEYS = (
    "name",
    "listen",
    "upstreams",
    "balance",
    "proxy_protocol",
    "accept_proxy_protocol",
    "allow",
    "deny",
    "health_check",
    *TUNABLE_KEYS,
)
UPSTREAM_KEYS = ("address", "weight")


class ConfigError(Exception):
    """One or more problems in a configuration, each a `FILE:LINE: message` line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class Upstream:
    """A backend a route forwards to; `weight` is its share of new connections."""

    address: Address
    weight: int = 1


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
class Route:
    """One listener and the upstreams its connections go to.

    `health_check` None means no active checks; `max_connect_attempts` None tries each
    upstream once; `max_duration` None lets a connection stay open as long as it is not
    idle for `idle_timeout`."""

    name: str
    listen: Address
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


@dataclass(frozen=True)
class MetricsConfig:
    """Where the Prometheus endpoint listens; None turns it off."""

    listen: Address | None


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


# --- durations and sizes ---------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT = "e.g. 250ms, 5s, 1.5s, 1m, 1h"
_DURATION = re.compile(r"(-?)([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", re.ASCII)

_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_SIZE_HINT = "e.g. 4096B, 64KiB, 1MiB, 1GiB"
_SIZE = re.compile(r"(-?)([0-9]+)([A-Za-z]*)", re.ASCII)
_MAX_SIZE_DIGITS = 15


def parse_duration(text: str) -> float:
    """Seconds in `text` such as "250ms", "5s", "1.5s", "1m" or "1h"; must be above zero."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"bad duration {text!r}: expected a number and a unit ({_DURATION_HINT})")
    sign, number, unit = match.groups()
    if not unit:
        raise ValueError(f"bad duration {text!r}: missing unit ({_DURATION_HINT})")
    if unit not in _DURATION_UNITS:
        raise ValueError(f"bad duration {text!r}: unknown unit {unit!r} (expected ms, s, m or h)")
    # Seconds are taken as written, milliseconds divided rather than multiplied by 0.001,
    # so that format_duration can always find a spelling that parses back exactly.
    value = float(number) / 1000 if unit == "ms" else float(number) * _DURATION_UNITS[unit]
    if sign or value <= 0:
        raise ValueError(f"bad duration {text!r}: must be greater than zero")
    if not math.isfinite(value):
        raise ValueError(f"bad duration {text!r}: too large")
    return value


def format_duration(seconds: float) -> str:
    """The shortest spelling of `seconds` that parse_duration reads back exactly."""
    for unit in ("h", "m", "s", "ms"):
        scaled = seconds * 1000 if unit == "ms" else seconds / _DURATION_UNITS[unit]
        if scaled >= 1 and scaled.is_integer() and scaled < 1e15:
            text = f"{int(scaled)}{unit}"
            if _parses_to(text, seconds):
                return text
    # A decimal number of seconds, without exponent: float() reads it back exactly.
    return f"{Decimal(repr(seconds)):f}s"


def _parses_to(text: str, seconds: float) -> bool:
    try:
        return parse_duration(text) == seconds
    except ValueError:
        return False


def parse_size(text: str) -> int:
    """Bytes in `text` such as "4096B", "64KiB", "1MiB" or "1GiB"."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"bad size {text!r}: expected a whole number and a unit ({_SIZE_HINT})")
    sign, number, unit = match.groups()
    if not unit:
        raise ValueError(f"bad size {text!r}: missing unit ({_SIZE_HINT})")
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f"bad size {text!r}: unknown unit {unit!r} (expected B, KiB, MiB or GiB;"
            " 1KiB is 1024 bytes)"
        )
    if sign:
        raise ValueError(f"bad size {text!r}: must not be negative")
    if len(number) > _MAX_SIZE_DIGITS:
        raise ValueError(f"bad size {text!r}: too large")
    return int(number) * _SIZE_UNITS[unit]


def format_size(size: int) -> str:
    """`size` bytes in the largest unit that holds it exactly, e.g. "1MiB" or "4097B"."""
    for unit in ("GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


# --- YAML nodes ------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + name for name in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ, _MERGE = (_TAG + name for name in ("map", "seq", "merge"))
_KINDS = {
    _STR: "a string",
    _INT: "an integer",
    _FLOAT: "a number",
    _BOOL: "a boolean",
    _NULL: "null",
    _MAP: "a mapping",
    _SEQ: "a list",
}
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")
_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_ROUTE_NAME = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
# Merge keys (<<) may pull in mappings that merge others in turn; this bounds the chain.
_MAX_MERGE_DEPTH = 32


def _describe(node: yaml.Node) -> str:
    """What a node is, for "expected X, got Y" messages."""
    tag = "!!" + node.tag[len(_TAG) :] if node.tag.startswith(_TAG) else node.tag
    kind = _KINDS.get(node.tag, f"a value tagged {tag}")
    if isinstance(node, yaml.ScalarNode) and node.tag != _NULL:
        return f"{kind} ({_quote(node.value)})"
    return kind


def _quote(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def _child(path: str, key: str) -> str:
    if not _SIMPLE_KEY.fullmatch(key):
        return f"{path}[{_quote(key)}]"
    return f"{path}.{key}" if path else key


def _is_scalar(node: yaml.Node, *tags: str) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag in tags


def _yaml_int(text: str) -> int:
    """An integer as YAML 1.1 writes it (as PyYAML resolves it): 1_000, 0x1f, 017, 1:30."""
    value = text.replace("_", "")
    sign = 1
    if value.startswith(("-", "+")):
        sign = -1 if value[0] == "-" else 1
        value = value[1:]
    if value.startswith("0b"):
        return sign * int(value[2:], 2)
    if value.startswith("0x"):
        return sign * int(value[2:], 16)
    if value.startswith("0") and len(value) > 1:
        return sign * int(value, 8)
    if ":" in value:
        total = 0
        for part in value.split(":"):
            total = total * 60 + int(part)
        return sign * total
    return sign * int(value)


def _unknown_key_message(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (allowed keys: {', '.join(allowed)})"


@dataclass(frozen=True)
class _Mapping:
    """A checked YAML mapping: the node itself and the value node of each allowed key."""

    node: yaml.Node
    path: str
    fields: dict[str, yaml.Node]


@dataclass(frozen=True)
class _Tunables:
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


@dataclass(frozen=True)
class _Listener:
    """A configured listen address, to find two things listening on the same one."""

    address: Address
    owner: str
    path: str
    node: yaml.Node | None  # None for the default metrics address, written nowhere


class _Reader:
    """Walks the composed YAML, building the config and collecting every problem."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[tuple[int, str]] = []
        self.listeners: list[_Listener] = []
        self._merged_keys: dict[int, dict[str, tuple[yaml.Node, yaml.Node]]] = {}

    # -- reporting

    def report(self, node: yaml.Node, path: str, message: str) -> None:
        text = f"{path}: {message}" if path else message
        self.problems.append((node.start_mark.line + 1, text))

    def errors(self) -> list[str]:
        """One line per problem, in line order; a node reached twice is reported once."""
        lines = (
            " ".join(f"{self.filename}:{line}: {text}".splitlines())
            for line, text in sorted(self.problems, key=lambda problem: problem[0])
        )
        return list(dict.fromkeys(lines))

    # -- structure

    def mapping(
        self, node: yaml.Node, path: str, allowed: Sequence[str], misplaced: str = ""
    ) -> _Mapping | None:
        """A mapping with only `allowed` keys. A key of `ROUTE_KEYS` that is not allowed
        here is reported with `misplaced`, which says where it belongs, if given."""
        if not isinstance(node, yaml.MappingNode) or node.tag != _MAP:
            self.report(node, path, f"expected a mapping, got {_describe(node)}")
            return None
        fields: dict[str, yaml.Node] = {}
        for name, (key, value) in self._keys(node, path, 0, set()).items():
            if name in allowed:
                fields[name] = value
            elif misplaced and name in ROUTE_KEYS:
                keys = ", ".join(allowed)
                self.report(key, _child(path, name), f"{misplaced} (allowed keys here: {keys})")
            else:
                self.report(key, _child(path, name), _unknown_key_message(name, allowed))
        return _Mapping(node, path, fields)

    def _keys(
        self, node: yaml.MappingNode, path: str, depth: int, active: set[int]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """String keys of a mapping, merge keys expanded: its own keys win, then earlier
        merged mappings over later ones."""
        cached = self._merged_keys.get(id(node))
        if cached is not None:
            return cached
        keys: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        merges: list[yaml.Node] = []
        for key, value in node.value:
            if _is_scalar(key, _MERGE):
                merges.append(value)
                continue
            name = self._key_name(key, path)
            if name is None:
                continue
            if name in keys:
                first = keys[name][0].start_mark.line + 1
                self.report(key, _child(path, name), f"duplicate key (first on line {first})")
                continue
            keys[name] = (key, value)
        active.add(id(node))
        for source in self._merge_sources(merges, path, depth, active):
            for name, pair in self._keys(source, path, depth + 1, active).items():
                keys.setdefault(name, pair)
        active.discard(id(node))
        self._merged_keys[id(node)] = keys
        return keys

    def _merge_sources(
        self, merges: list[yaml.Node], path: str, depth: int, active: set[int]
    ) -> list[yaml.MappingNode]:
        sources: list[yaml.MappingNode] = []
        for merge in merges:
            candidates = merge.value if _is_sequence(merge) else [merge]
            for source in candidates:
                if not isinstance(source, yaml.MappingNode) or source.tag != _MAP:
                    self.report(source, path, f"'<<' merges mappings, not {_describe(source)}")
                elif id(source) in active or depth >= _MAX_MERGE_DEPTH:
                    self.report(source, path, "'<<' merges are nested too deeply or loop")
                else:
                    sources.append(source)
        return sources

    def _key_name(self, key: yaml.Node, path: str) -> str | None:
        if _is_scalar(key, _STR):
            value: str = key.value
            return value
        self.report(key, path, f"keys must be strings, not {_describe(key)}")
        return None

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node] | None:
        if _is_sequence(node):
            items: list[yaml.Node] = node.value
            return items
        self.report(node, path, f"expected a list, got {_describe(node)}")
        return None

    def required(self, mapping: _Mapping, key: str) -> yaml.Node | None:
        node = mapping.fields.get(key)
        if node is None:
            self.report(mapping.node, mapping.path, f"missing required key {key!r}")
        return node

    # -- scalars

    def string(self, node: yaml.Node, path: str, expected: str = "a string") -> str | None:
        if _is_scalar(node, _STR):
            value: str = node.value
            return value
        quotable = expected == "a string" and _is_scalar(node, _INT, _FLOAT, _BOOL)
        hint = " (quote it to make it a string)" if quotable else ""
        self.report(node, path, f"expected {expected}, got {_describe(node)}{hint}")
        return None

    def integer(
        self, node: yaml.Node, path: str, low: int, high: int, *, or_null: bool = False
    ) -> int | None:
        """The integer at `node`, or None: reported, unless it is null and `or_null`."""
        if or_null and _is_scalar(node, _NULL):
            return None
        if not _is_scalar(node, _INT):
            expected = "an integer or null" if or_null else "an integer"
            self.report(node, path, f"expected {expected}, got {_describe(node)}")
            return None
        try:
            value = _yaml_int(node.value)
        except ValueError:
            self.report(node, path, f"{_quote(node.value)} is not a valid integer")
            return None
        if not low <= value <= high:
            self.report(node, path, f"{value} is out of range ({low} to {high})")
            return None
        return value

    def boolean(self, node: yaml.Node, path: str) -> bool | None:
        if _is_scalar(node, _BOOL):
            text = node.value.lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
        self.report(node, path, f"expected true or false, got {_describe(node)}")
        return None

    def duration(self, node: yaml.Node, path: str, *, or_null: bool = False) -> float | None:
        """The duration at `node`, or None: reported, unless it is null and `or_null`."""
        if or_null and _is_scalar(node, _NULL):
            return None
        if not _is_scalar(node, _STR, _INT, _FLOAT):
            expected = f"a duration ({_DURATION_HINT}){' or null' if or_null else ''}"
            self.report(node, path, f"expected {expected}, got {_describe(node)}")
            return None
        try:
            return parse_duration(node.value)
        except ValueError as error:
            self.report(node, path, str(error))
            return None

    def size(self, node: yaml.Node, path: str, low: int, high: int) -> int | None:
        if not _is_scalar(node, _STR, _INT, _FLOAT):
            self.report(node, path, f"expected a size ({_SIZE_HINT}), got {_describe(node)}")
            return None
        try:
            value = parse_size(node.value)
        except ValueError as error:
            self.report(node, path, str(error))
            return None
        if not low <= value <= high:
            self.report(
                node,
                path,
                f"{format_size(value)} is out of range ({format_size(low)} to {format_size(high)})",
            )
            return None
        return value

    def address(self, node: yaml.Node, path: str) -> Address | None:
        text = self.string(node, path, "an address (host:port, [v6]:port or unix:/path)")
        if text is None:
            return None
        try:
            return parse_address(text)
        except AddressError as error:
            self.report(node, path, str(error))
            return None

    def choice(self, node: yaml.Node, path: str, options: Sequence[str]) -> str | None:
        if not _is_scalar(node, _STR):
            expected = ", ".join(options)
            self.report(node, path, f"expected one of {expected}, got {_describe(node)}")
            return None
        value: str = node.value
        if value in options:
            return value
        close = difflib.get_close_matches(value, options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        self.report(
            node,
            path,
            f"unknown value {_quote(value)}{hint} (expected one of: {', '.join(options)})",
        )
        return None

    def networks(self, node: yaml.Node, path: str) -> tuple[Network, ...]:
        items = self.sequence(node, path)
        networks: list[Network] = []
        for index, item in enumerate(items or []):
            item_path = f"{path}[{index}]"
            text = self.string(item, item_path, "a network such as 10.0.0.0/8 or ::1/128")
            if text is not None:
                network = self.network(item, item_path, text)
                if network is not None:
                    networks.append(network)
        return tuple(networks)

    def network(self, node: yaml.Node, path: str, text: str) -> Network | None:
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError:
            pass
        try:
            hint = f"host bits are set; did you mean {ipaddress.ip_network(text, strict=False)}?"
        except ValueError:
            hint = "expected an IPv4 or IPv6 address or network, e.g. 10.0.0.0/8 or fd00::/8"
        self.report(node, path, f"bad network {_quote(text)}: {hint}")
        return None

    # -- the schema

    def config(self, root: yaml.Node) -> Config | None:
        if not isinstance(root, yaml.MappingNode):
            self.report(root, "", f"expected a mapping at the top level, got {_describe(root)}")
            return None
        top = self.mapping(root, "", TOP_KEYS)
        if top is None:
            return None
        fields = top.fields
        workers = self.workers(fields["workers"]) if "workers" in fields else 1
        shutdown_timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT
        if "shutdown_timeout" in fields:
            shutdown_timeout = self.duration(fields["shutdown_timeout"], "shutdown_timeout")
        max_connections = None
        if "max_connections" in fields:
            max_connections = self.integer(
                fields["max_connections"],
                "max_connections",
                1,
                MAX_GLOBAL_CONNECTIONS_LIMIT,
                or_null=True,
            )
        metrics = self.metrics(fields.get("metrics"))
        log = self.log(fields["log"]) if "log" in fields else LogConfig()
        defaults = _Tunables()
        if "defaults" in fields:
            defaults = self.tunables(fields["defaults"], "defaults", _Tunables())
        routes = self.routes(top, defaults)
        self.check_listeners()
        if workers is None or shutdown_timeout is None or metrics is None or log is None:
            return None
        if self.problems:
            return None
        return Config(
            workers,
            shutdown_timeout,
            metrics,
            log,
            tuple(routes),
            self.filename,
            max_connections=max_connections,
        )

    def workers(self, node: yaml.Node) -> Workers | None:
        if _is_scalar(node, _INT):
            count = self.integer(node, "workers", -(1 << 62), 1 << 62)
            if count is not None and count < 1:
                self.report(node, "workers", f"{count}: must be at least 1")
                return None
            if count is not None and count > MAX_WORKERS:
                self.report(node, "workers", f"{count}: at most {MAX_WORKERS} processes")
                return None
            return count
        if _is_scalar(node, _STR) and node.value == WORKERS_AUTO:
            return WORKERS_AUTO
        self.report(node, "workers", f"expected an integer or 'auto', got {_describe(node)}")
        return None

    def metrics(self, node: yaml.Node | None) -> MetricsConfig | None:
        if node is None:
            default = parse_address(DEFAULT_METRICS_LISTEN)
            self.listeners.append(_Listener(default, "the metrics endpoint", "metrics", None))
            return MetricsConfig(default)
        if _is_scalar(node, _BOOL) and node.value.lower() in _FALSE:
            return MetricsConfig(None)
        if not isinstance(node, yaml.MappingNode):
            self.report(node, "metrics", f"expected a mapping or false, got {_describe(node)}")
            return None
        section = self.mapping(node, "metrics", METRICS_KEYS)
        if section is None:
            return None
        listen = section.fields.get("listen")
        if listen is None:
            return self.metrics(None)
        if _is_scalar(listen, _NULL):
            return MetricsConfig(None)
        address = self.address(listen, "metrics.listen")
        if isinstance(address, UnixAddress):
            self.report(listen, "metrics.listen", "must be a TCP address (host:port)")
            return None
        if address is None:
            return None
        self.listeners.append(_Listener(address, "the metrics endpoint", "metrics.listen", listen))
        return MetricsConfig(address)

    def log(self, node: yaml.Node) -> LogConfig | None:
        section = self.mapping(node, "log", LOG_KEYS)
        if section is None:
            return None
        fields = section.fields
        changes: dict[str, Any] = {}
        if "level" in fields:
            changes["level"] = self.choice(fields["level"], "log.level", LOG_LEVELS)
        if "format" in fields:
            changes["format"] = self.choice(fields["format"], "log.format", LOG_FORMATS)
        if "access_log" in fields:
            changes["access_log"] = self.boolean(fields["access_log"], "log.access_log")
        if None in changes.values():
            return None
        return LogConfig(**changes)

    def tunables(self, node: yaml.Node, path: str, base: _Tunables) -> _Tunables:
        misplaced = "can only be set in each route, not in defaults"
        section = self.mapping(node, path, TUNABLE_KEYS, misplaced)
        return base if section is None else self.overrides(section, base)

    def overrides(self, section: _Mapping, base: _Tunables) -> _Tunables:
        """`base` with the tunables `section` sets; a bad value is reported, and ignored.

        The optional limits may be set to null, so that a route can lift a limit its
        defaults set."""
        readers: dict[str, Callable[[yaml.Node, str], float | int | None]] = {
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
        }
        changes: dict[str, Any] = {}
        for key, read in readers.items():
            if key in section.fields:
                # None is either an accepted null or a reported problem: tell them apart
                # by whether a problem was reported.
                problems = len(self.problems)
                value = read(section.fields[key], _child(section.path, key))
                if len(self.problems) == problems:
                    changes[key] = value
        return dataclasses.replace(base, **changes)

    def routes(self, top: _Mapping, defaults: _Tunables) -> list[Route]:
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
        self, node: yaml.Node, path: str, defaults: _Tunables, names: dict[str, int]
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
            health_check = self.health_check(fields["health_check"], f"{path}.health_check")
        health_check_valid = len(self.problems) == problems
        tunables = self.overrides(section, defaults)
        allow = self.networks(fields["allow"], f"{path}.allow") if "allow" in fields else ()
        deny = self.networks(fields["deny"], f"{path}.deny") if "deny" in fields else ()
        if name is None or listen is None or upstreams is None or balance is None:
            return None
        if proxy_protocol is None or accept_proxy_protocol is None or not health_check_valid:
            return None
        return _route(
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
        )

    def health_check(self, node: yaml.Node, path: str) -> HealthCheck | None:
        """The active checks `node` asks for: true is all defaults, false none. None when
        there are none, or when a problem was reported."""
        if _is_scalar(node, _BOOL) and node.value.lower() in (*_TRUE, *_FALSE):
            return HealthCheck() if node.value.lower() in _TRUE else None
        if not isinstance(node, yaml.MappingNode):
            self.report(node, path, f"expected a mapping, true or false, got {_describe(node)}")
            return None
        section = self.mapping(node, path, HEALTH_CHECK_KEYS)
        if section is None:
            return None
        fields = section.fields
        problems = len(self.problems)
        changes: dict[str, Any] = {}
        for key in ("interval", "timeout"):
            if key in fields:
                changes[key] = self.duration(fields[key], f"{path}.{key}")
        for key in ("rise", "fall"):
            if key in fields:
                changes[key] = self.integer(fields[key], f"{path}.{key}", 1, MAX_HEALTH_COUNT)
        if "send" in fields:
            changes["send"] = self.payload(fields["send"], f"{path}.send", "to send nothing")
        if "expect" in fields:
            changes["expect"] = self.payload(fields["expect"], f"{path}.expect", "to need no reply")
        if len(self.problems) > problems:
            return None
        check = HealthCheck(**changes)
        if check.timeout <= check.interval:
            return check
        interval, timeout = format_duration(check.interval), format_duration(check.timeout)
        if "timeout" in fields:
            message = f"{timeout} is longer than the interval ({interval})"
            self.report(fields["timeout"], f"{path}.timeout", message)
        else:
            message = (
                f"{interval} is shorter than the default timeout ({timeout});"
                f" set a timeout of at most {interval}"
            )
            self.report(fields["interval"], f"{path}.interval", message)
        return None

    def payload(self, node: yaml.Node, path: str, omitted: str) -> bytes | None:
        """Bytes written as a YAML string and encoded as UTF-8 (in double quotes, YAML's
        escapes such as \\r\\n apply), or None for null. An empty string is a problem:
        leaving the key out says that more plainly."""
        if _is_scalar(node, _NULL):
            return None
        text = self.string(node, path)
        if text is None:
            return None
        if not text:
            self.report(node, path, f"must not be empty (leave it out {omitted})")
            return None
        return text.encode("utf-8")

    def route_name(self, section: _Mapping, names: dict[str, int]) -> str | None:
        node = self.required(section, "name")
        if node is None:
            return None
        path = f"{section.path}.name"
        name = self.string(node, path)
        if name is None:
            return None
        if not _ROUTE_NAME.fullmatch(name):
            self.report(
                node, path, f"bad route name {_quote(name)} (letters, digits, '_', '.' and '-')"
            )
            return None
        line = node.start_mark.line + 1
        if name in names:
            self.report(node, path, f"duplicate route name {name!r} (first on line {names[name]})")
            return None
        names[name] = line
        return name

    def listen(self, section: _Mapping, owner: str) -> Address | None:
        node = self.required(section, "listen")
        if node is None:
            return None
        path = f"{section.path}.listen"
        address = self.address(node, path)
        if isinstance(address, TcpAddress) and address.port == 0:
            self.report(node, path, "port 0 is not allowed here (a listener needs a fixed port)")
            return None
        if address is not None:
            self.listeners.append(_Listener(address, f"route {owner!r}", path, node))
        return address

    def upstreams(self, section: _Mapping) -> tuple[Upstream, ...] | None:
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
        address_node = self.required(section, "address")
        if address_node is None:
            return None
        address = self.address(address_node, f"{path}.address")
        if isinstance(address, TcpAddress) and address.port == 0:
            self.report(address_node, f"{path}.address", "port 0 is not allowed for an upstream")
            return None
        if address is None or weight is None:
            return None
        return Upstream(address, weight)

    def check_listeners(self) -> None:
        """Report each listen address already used by something earlier in the file."""

        def position(listener: _Listener) -> tuple[int, int]:
            return (-1, -1) if listener.node is None else _position(listener.node)

        seen: dict[Address, _Listener] = {}
        for listener in sorted(self.listeners, key=position):
            first = seen.setdefault(listener.address, listener)
            if first is listener or listener.node is None:
                continue
            where = "" if first.node is None else f" (line {first.node.start_mark.line + 1})"
            default = " (the default metrics.listen)" if first.node is None else ""
            self.report(
                listener.node,
                listener.path,
                f"{listener.address} is already used by {first.owner}{where}{default}",
            )


def _route(tunables: _Tunables, **settings: Any) -> Route:
    """A Route with `settings`, and every tunable from `tunables`."""
    for field in dataclasses.fields(tunables):
        settings[field.name] = getattr(tunables, field.name)
    return Route(**settings)


def _is_sequence(node: yaml.Node) -> bool:
    return isinstance(node, yaml.SequenceNode) and node.tag == _SEQ


def _position(node: yaml.Node) -> tuple[int, int]:
    return (node.start_mark.line, node.start_mark.column)


# --- entry points ----------------------------------------------------------------------


def _compose(text: str, filename: str) -> yaml.Node | None:
    """The YAML document as a node tree, or ConfigError if it is not YAML."""
    try:
        node: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = 1 if mark is None else mark.line + 1
        problem = error.problem or error.context or "syntax error"
        if error.problem and error.context:
            problem = f"{error.problem} ({error.context})"
        hint = _yaml_hint(text, line)
        raise ConfigError([f"{filename}:{line}: not valid YAML: {problem}{hint}"]) from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, max(error.position, 0)) + 1
        character = error.character
        what = f"character #x{character:04x}" if isinstance(character, int) else "a character"
        raise ConfigError(
            [f"{filename}:{line}: not valid YAML: {what} is not allowed here ({error.reason})"]
        ) from None
    except RecursionError:
        raise ConfigError([f"{filename}:1: not valid YAML: nested too deeply"]) from None
    except yaml.YAMLError as error:
        message = " ".join(str(error).splitlines())
        raise ConfigError([f"{filename}:1: not valid YAML: {message}"]) from None
    return node


# `[::1]:80` unquoted starts a YAML flow sequence, a mistake the parser cannot explain.
_UNQUOTED_IPV6 = re.compile(r"(^|[\s:,-])\[[0-9A-Fa-f:.%]*\]:", re.ASCII)


def _yaml_hint(text: str, line: int) -> str:
    lines = text.splitlines()
    if 1 <= line <= len(lines) and _UNQUOTED_IPV6.search(lines[line - 1]):
        return "; an address in brackets must be quoted, e.g. '[::1]:80'"
    return ""


def parse_config(text: str, filename: str) -> Config:
    """Validate the YAML `text` of the file `filename`; raise ConfigError listing every
    problem."""
    root = _compose(text, filename)
    if root is None or _is_scalar(root, _NULL):
        raise ConfigError(
            [f"{filename}:1: the config is empty (it needs at least a 'routes' list)"]
        )
    reader = _Reader(filename)
    config = reader.config(root)
    if config is None or reader.problems:
        raise ConfigError(reader.errors() or [f"{filename}:1: invalid config"])
    return config


def read_config(path: str) -> tuple[Config, str]:
    """The validated config at `path`, and the text it was read from."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror or error}"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text (byte {error.start})"]) from None
    return parse_config(text, path), text


def load_config(path: str) -> Config:
    """Read and validate the config file at `path`."""
    return read_config(path)[0]


def file_identity(path: str) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or replaced (stat follows symlinks)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def config_from_args(listen: str, upstreams: list[str]) -> Config:
    """A one-route config, named "default", from `--listen A --upstream B [--upstream C]`."""
    errors: list[str] = []
    listen_address = _argument_address("--listen", listen, errors)
    upstream_addresses = [_argument_address("--upstream", text, errors) for text in upstreams]
    if not upstreams:
        errors.append(f"{COMMAND_LINE}: --upstream: at least one upstream is needed")
    if errors or listen_address is None:
        raise ConfigError(errors or [f"{COMMAND_LINE}: --listen: missing"])
    route = _route(
        _Tunables(),
        name=DEFAULT_ROUTE_NAME,
        listen=listen_address,
        upstreams=tuple(Upstream(address) for address in upstream_addresses if address),
        balance=BALANCE_STRATEGIES[0],
        allow=(),
        deny=(),
    )
    return Config(
        workers=1,
        shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT,
        metrics=MetricsConfig(parse_address(DEFAULT_METRICS_LISTEN)),
        log=LogConfig(),
        routes=(route,),
        source=COMMAND_LINE,
    )


def _argument_address(option: str, text: str, errors: list[str]) -> Address | None:
    try:
        address = parse_address(text)
    except AddressError as error:
        errors.append(f"{COMMAND_LINE}: {option}: {error}")
        return None
    if isinstance(address, TcpAddress) and address.port == 0:
        errors.append(f"{COMMAND_LINE}: {option}: port 0 is not allowed in {str(address)!r}")
        return None
    return address


def render_config(config: Config) -> str:
    """The effective config as YAML, every default written out; parse_config reads it
    back to an equal Config."""
    metrics_listen = config.metrics.listen
    data: dict[str, Any] = {
        "workers": config.workers,
        "shutdown_timeout": format_duration(config.shutdown_timeout),
        "max_connections": config.max_connections,
        "metrics": {"listen": None if metrics_listen is None else str(metrics_listen)},
        "log": {
            "level": config.log.level,
            "format": config.log.format,
            "access_log": config.log.access_log,
        },
        "routes": [_route_data(route) for route in config.routes],
    }
    header = "# Effective configuration: every default is written out.\n"
    return header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes a string holding a line break other than \\n or \\r in
    double quotes, where it is escaped."""


_UNICODE_BREAKS = "\x85\u2028\u2029"


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    # Why: PyYAML writes NEL (U+0085), and at times U+2028 and U+2029, raw inside single
    # quotes, and reading such a scalar back folds the break into a space. A health check
    # payload may hold any character, and must read back exactly.
    style = '"' if any(char in text for char in _UNICODE_BREAKS) else None
    return dumper.represent_scalar(_STR, text, style=style)


_Dumper.add_representer(str, _represent_str)


def _route_data(route: Route) -> dict[str, Any]:
    return {
        "name": route.name,
        "listen": str(route.listen),
        "upstreams": [
            {"address": str(upstream.address), "weight": upstream.weight}
            for upstream in route.upstreams
        ],
        "balance": route.balance,
        "proxy_protocol": route.proxy_protocol,
        "accept_proxy_protocol": route.accept_proxy_protocol,
        "proxy_protocol_timeout": format_duration(route.proxy_protocol_timeout),
        "health_check": _health_check_data(route.health_check),
        "connect_timeout": format_duration(route.connect_timeout),
        "idle_timeout": format_duration(route.idle_timeout),
        "max_duration": _optional_duration(route.max_duration),
        "pipe_size": format_size(route.pipe_size),
        "max_connections": route.max_connections,
        "max_connect_attempts": route.max_connect_attempts,
        "resolve_interval": format_duration(route.resolve_interval),
        "max_connections_per_source": route.max_connections_per_source,
        "allow": [str(network) for network in route.allow],
        "deny": [str(network) for network in route.deny],
    }


def _health_check_data(check: HealthCheck | None) -> dict[str, Any] | bool:
    if check is None:
        return False
    return {
        "interval": format_duration(check.interval),
        "timeout": format_duration(check.timeout),
        "rise": check.rise,
        "fall": check.fall,
        "send": _optional_text(check.send),
        "expect": _optional_text(check.expect),
    }


def _optional_duration(seconds: float | None) -> str | None:
    return None if seconds is None else format_duration(seconds)


def _optional_text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8")
