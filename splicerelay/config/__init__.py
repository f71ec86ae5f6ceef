"""The configuration: YAML text in, validated frozen dataclasses out (pure).

The package's public names are re-exported here, so that callers need not know which
module of the package holds them:

- model: the frozen dataclasses, ConfigError, the defaults and worker_count;
- units: durations and sizes;
- load: parse_config, read_config, load_config, file_identity, config_from_args;
- render: render_config, the effective config back to YAML;
- warnings: config_warnings, valid settings that are probably a mistake;
- addresses (imported from its own module): listen and upstream addresses.

Underneath, nodes is a generic reader of composed YAML, values reads the config's value
types with it, and schema and schema_routes hold the relay's schema.
"""

from __future__ import annotations

from splicerelay.config.load import (
    config_from_args,
    file_identity,
    load_config,
    parse_config,
    read_config,
)
from splicerelay.config.model import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_PIPE_SIZE,
    DEFAULT_PROXY_PROTOCOL_MAX_HEADER,
    DEFAULT_PROXY_PROTOCOL_TIMEOUT,
    DEFAULT_RESOLVE_INTERVAL,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Config,
    ConfigError,
    ControlConfig,
    HealthCheck,
    LogConfig,
    MetricsConfig,
    Network,
    Route,
    RouteMatch,
    Upstream,
    worker_count,
)
from splicerelay.config.render import render_config
from splicerelay.config.units import format_duration, format_size, parse_duration, parse_size
from splicerelay.config.warnings import config_warnings

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_METRICS_LISTEN",
    "DEFAULT_PIPE_SIZE",
    "DEFAULT_PROXY_PROTOCOL_MAX_HEADER",
    "DEFAULT_PROXY_PROTOCOL_TIMEOUT",
    "DEFAULT_RESOLVE_INTERVAL",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "Config",
    "ConfigError",
    "ControlConfig",
    "HealthCheck",
    "LogConfig",
    "MetricsConfig",
    "Network",
    "Route",
    "RouteMatch",
    "Upstream",
    "config_from_args",
    "config_warnings",
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
