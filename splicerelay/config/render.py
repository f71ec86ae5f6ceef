"""The effective configuration written back out as YAML, every default spelled out (pure)."""

from __future__ import annotations

from typing import Any

import yaml

from splicerelay.config.model import Config, HealthCheck, Route, RouteMatch
from splicerelay.config.nodes import STR
from splicerelay.config.units import format_duration, format_size


def render_config(config: Config) -> str:
    """The effective config as YAML, every default written out; parse_config reads it
    back to an equal Config."""
    metrics_listen = config.metrics.listen
    data: dict[str, Any] = {
        "workers": config.workers,
        "shutdown_timeout": format_duration(config.shutdown_timeout),
        "max_connections": config.max_connections,
        "metrics": {"listen": None if metrics_listen is None else str(metrics_listen)},
        "control": {"socket": config.control.socket},
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
    return dumper.represent_scalar(STR, text, style=style)


_Dumper.add_representer(str, _represent_str)


def _route_data(route: Route) -> dict[str, Any]:
    # A route without match has no `match` key: there is no default to write out.
    match = {} if route.match is None else {"match": _match_data(route.match)}
    return {
        "name": route.name,
        "listen": str(route.listen),
        **match,
        "defer_accept": route.defer_accept,
        "upstreams": [
            {
                "address": str(upstream.address),
                "weight": upstream.weight,
                "resolve": upstream.resolve,
            }
            for upstream in route.upstreams
        ],
        "balance": route.balance,
        "proxy_protocol": route.proxy_protocol,
        "accept_proxy_protocol": route.accept_proxy_protocol,
        "proxy_protocol_trusted": [str(network) for network in route.proxy_protocol_trusted],
        "proxy_protocol_timeout": format_duration(route.proxy_protocol_timeout),
        "proxy_protocol_max_header": format_size(route.proxy_protocol_max_header),
        "tls_inspect_timeout": format_duration(route.tls_inspect_timeout),
        "tls_max_client_hello": format_size(route.tls_max_client_hello),
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
        "allow_applies_to": route.allow_applies_to,
    }


def _match_data(match: RouteMatch) -> dict[str, list[str]]:
    data: dict[str, list[str]] = {}
    if match.sni:
        data["sni"] = list(match.sni)
    if match.alpn:
        data["alpn"] = list(match.alpn)
    return data


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
