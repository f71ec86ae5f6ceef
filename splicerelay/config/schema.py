"""The relay's schema: the top level, `metrics` and `log`, and the checks across the file.

`defaults` and `routes` are read by schema_routes; this module puts the whole Config
together and checks, with schema_shared, that no two things listen on the same address
unless they are routes that share a listener by `match`.
"""

from __future__ import annotations

from typing import Any

import yaml

from splicerelay.config.addresses import UnixAddress, parse_address
from splicerelay.config.model import (
    CONTROL_SOCKET_AUTO,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_SHUTDOWN_TIMEOUT,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_GLOBAL_CONNECTIONS_LIMIT,
    MAX_WORKERS,
    WORKERS_AUTO,
    Config,
    ControlConfig,
    LogConfig,
    MetricsConfig,
    Tunables,
    Workers,
)
from splicerelay.config.nodes import (
    INT,
    NULL,
    STR,
    boolean_value,
    describe,
    is_scalar,
)
from splicerelay.config.schema_routes import RouteReader
from splicerelay.config.schema_shared import Listener, check_listen_addresses

TOP_KEYS = (
    "workers",
    "shutdown_timeout",
    "max_connections",
    "metrics",
    "control",
    "log",
    "defaults",
    "routes",
)
METRICS_KEYS = ("listen",)
CONTROL_KEYS = ("socket",)
# sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_CONTROL_SOCKET_PATH_BYTES = 107
LOG_KEYS = ("level", "format", "access_log")


class ConfigReader(RouteReader):
    """Walks the composed YAML, building the config and collecting every problem.

    One reader in layers, each a class of its own that shares the list of problems:
    NodeReader (YAML), ValueReader (durations, sizes, addresses, networks), RouteReader
    (`defaults` and `routes`), and this class (the top level, `metrics`, `log`, and the
    checks across sections)."""

    def config(self, root: yaml.Node) -> Config | None:
        if not isinstance(root, yaml.MappingNode):
            self.report(root, "", f"expected a mapping at the top level, got {describe(root)}")
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
        control = self.control(fields["control"]) if "control" in fields else ControlConfig()
        log = self.log(fields["log"]) if "log" in fields else LogConfig()
        defaults = Tunables()
        if "defaults" in fields:
            defaults = self.tunables(fields["defaults"], "defaults", Tunables())
        routes = self.routes(top, defaults)
        self.check_listeners()
        if workers is None or shutdown_timeout is None or metrics is None or log is None:
            return None
        if control is None:
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
            control=control,
        )

    def workers(self, node: yaml.Node) -> Workers | None:
        if is_scalar(node, INT):
            count = self.integer(node, "workers", -(1 << 62), 1 << 62)
            if count is not None and count < 1:
                self.report(node, "workers", f"{count}: must be at least 1")
                return None
            if count is not None and count > MAX_WORKERS:
                self.report(node, "workers", f"{count}: at most {MAX_WORKERS} processes")
                return None
            return count
        if is_scalar(node, STR) and node.value == WORKERS_AUTO:
            return WORKERS_AUTO
        self.report(node, "workers", f"expected an integer or 'auto', got {describe(node)}")
        return None

    def metrics(self, node: yaml.Node | None) -> MetricsConfig | None:
        if node is None:
            default = parse_address(DEFAULT_METRICS_LISTEN)
            self.listeners.append(Listener(default, "the metrics endpoint", "metrics", None))
            return MetricsConfig(default)
        if boolean_value(node) is False:
            return MetricsConfig(None)
        if not isinstance(node, yaml.MappingNode):
            self.report(node, "metrics", f"expected a mapping or false, got {describe(node)}")
            return None
        section = self.mapping(node, "metrics", METRICS_KEYS)
        if section is None:
            return None
        listen = section.fields.get("listen")
        if listen is None:
            return self.metrics(None)
        if is_scalar(listen, NULL):
            return MetricsConfig(None)
        address = self.address(listen, "metrics.listen")
        if isinstance(address, UnixAddress):
            self.report(listen, "metrics.listen", "must be a TCP address (host:port)")
            return None
        if address is None:
            return None
        self.listeners.append(Listener(address, "the metrics endpoint", "metrics.listen", listen))
        return MetricsConfig(address)

    def control(self, node: yaml.Node) -> ControlConfig | None:
        """`control: {socket: auto | null | /absolute/path}`; `control: false` is off."""
        if boolean_value(node) is False:
            return ControlConfig(None)
        if not isinstance(node, yaml.MappingNode):
            self.report(node, "control", f"expected a mapping or false, got {describe(node)}")
            return None
        section = self.mapping(node, "control", CONTROL_KEYS)
        if section is None:
            return None
        socket = section.fields.get("socket")
        if socket is None:
            return ControlConfig()
        if is_scalar(socket, NULL):
            return ControlConfig(None)
        expected = "'auto', null or an absolute path"
        if not is_scalar(socket, STR) or not socket.value:
            self.report(socket, "control.socket", f"expected {expected}, got {describe(socket)}")
            return None
        path = str(socket.value)
        if path == CONTROL_SOCKET_AUTO:
            return ControlConfig()
        if not path.startswith("/"):
            self.report(socket, "control.socket", f"{path!r}: expected {expected}")
            return None
        if "\0" in path or len(path.encode("utf-8", "surrogateescape")) > (
            MAX_CONTROL_SOCKET_PATH_BYTES
        ):
            limit = MAX_CONTROL_SOCKET_PATH_BYTES
            self.report(
                socket, "control.socket", f"{path!r}: a socket path is at most {limit} bytes"
            )
            return None
        return ControlConfig(path)

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

    def check_listeners(self) -> None:
        """Report each listen address used twice where it may not be, and each conflict
        between routes that share a listener (schema_shared.py)."""
        check_listen_addresses(self, self.listeners, self.sources, self.default_nodes)
