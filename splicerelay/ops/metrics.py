"""Prometheus exposition: a collector that reads `stats` at scrape time, and its HTTP server.

The data path only increments plain integers (see stats.py); this module turns them into
metric families when Prometheus asks, so the cost of metrics is paid per scrape, never
per chunk. The HTTP server runs in its own thread: a scrape can never stall the relay,
and it only reads counters, copying each dict in one C call before iterating it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from splicerelay.config import Config
from splicerelay.config.addresses import Address, TcpAddress, UnixAddress
from splicerelay.datapath.stats import Histogram, RelayStats, RouteStats
from splicerelay.ops.access_log import ACCESS_LOG
from splicerelay.protocol.outcome import InspectFailure, Outcome

DIRECTIONS = ("client_to_upstream", "upstream_to_client")
PATHS = ("splice", "copy")
# The operator's admin states of an upstream (protocol/control.py's AdminState): one
# 0/1 series each, so that `== 1` selects an upstream in a state and the series never
# change their label values (a state label that changed value would end one series and
# start another, and `for: 1h` would forget how long the upstream had been there).
ADMIN_STATES = ("ready", "drain", "maint")


# Outcomes only a listener that routes by TLS ClientHello has (its own counters).
TLS_OUTCOMES = (Outcome.NO_ROUTE, Outcome.TLS_INSPECT_FAILED, Outcome.ROUTE_LIMIT)


def add_outcomes(family: CounterMetricFamily, route: RouteStats) -> None:
    """Every outcome of `route`, zeros too, so that alerts and rates see no gaps; on a
    TLS-routing listener, tls_inspect_failed once per reason."""
    outcomes = dict(route.outcomes)
    for outcome in Outcome:
        if outcome in TLS_OUTCOMES and not route.inspects_tls:
            continue
        if outcome is Outcome.TLS_INSPECT_FAILED:
            failures = dict(route.inspect_failures)
            for reason in InspectFailure:
                count = failures.get(reason.value, 0)
                family.add_metric([route.name, outcome.value, reason.value], count)
            continue
        family.add_metric([route.name, outcome.value, ""], outcomes.get(outcome.value, 0))


class RelayCollector(Collector):
    """Builds the splicerelay_* families from a RelayStats snapshot.

    `config` returns the config running now (it changes on reload): the limit gauges
    come from it.
    """

    def __init__(
        self, stats: RelayStats, version: str, config: Callable[[], Config] | None = None
    ) -> None:
        self._stats = stats
        self._version = version
        self._config = config

    def collect(self) -> Iterable[Metric]:
        routes = list(self._stats.routes.values())
        bytes_total = CounterMetricFamily(
            "splicerelay_bytes",
            "Bytes relayed, by route, direction and data path (splice is zero-copy).",
            labels=["route", "direction", "path"],
        )
        active = GaugeMetricFamily(
            "splicerelay_connections_active", "Client connections open now.", labels=["route"]
        )
        finished = CounterMetricFamily(
            "splicerelay_connections",
            "Client connections that ended, by how they ended (reason: why a TLS"
            " ClientHello inspection failed; empty for every other outcome).",
            labels=["route", "outcome", "reason"],
        )
        connect_errors = CounterMetricFamily(
            "splicerelay_upstream_connect_errors",
            "Failed connects to an upstream, by reason.",
            labels=["route", "upstream", "reason"],
        )
        for route in routes:
            for direction in DIRECTIONS:
                counter = getattr(route, direction)
                bytes_total.add_metric([route.name, direction, "splice"], counter.splice)
                bytes_total.add_metric([route.name, direction, "copy"], counter.copy)
            active.add_metric([route.name], route.active)
            add_outcomes(finished, route)
            for (upstream, reason), count in list(route.connect_errors.items()):
                connect_errors.add_metric([route.name, upstream, reason], count)
        yield bytes_total
        yield active
        yield finished
        yield connect_errors
        yield from self._upstream_families(routes)
        durations = HistogramMetricFamily(
            "splicerelay_connection_duration_seconds",
            "How long client connections lasted, from accept to close.",
            labels=["route"],
        )
        limited = CounterMetricFamily(
            "splicerelay_limit_wait_seconds",
            "Time the route's accepting was paused at its max_connections.",
            labels=["route"],
        )
        for route in routes:
            add_histogram(durations, [route.name], route.duration_seconds)
            limited.add_metric([route.name], route.limited_seconds)
        yield durations
        yield limited
        reloads = CounterMetricFamily(
            "splicerelay_config_reloads",
            "Config reloads (SIGHUP or --watch), by result; a failure keeps the running config.",
            labels=["result"],
        )
        counts = dict(self._stats.config_reloads)
        for result in ("success", "failure"):
            reloads.add_metric([result], counts.get(result, 0))
        yield reloads
        yield from reload_state_families(
            self._stats.reloads.last_successful, self._stats.reloads.last_time
        )
        if self._config is not None:
            yield from limit_families(self._config())
        yield CounterMetricFamily(
            "splicerelay_global_limit_wait_seconds",
            "Time accepting was paused at the global max_connections.",
            value=self._stats.global_limited_seconds,
        )

        pipes = self._stats.pipes
        pipe_gauge = GaugeMetricFamily(
            "splicerelay_pipes",
            "Kernel pipes: in_use carry bytes for a connection, idle wait in the pool.",
            labels=["state"],
        )
        pipe_gauge.add_metric(["in_use"], pipes.in_use)
        pipe_gauge.add_metric(["idle"], pipes.idle)
        yield pipe_gauge
        yield CounterMetricFamily(
            "splicerelay_pipe_resize_failures",
            "Pipes the kernel would not grow to pipe_size (F_SETPIPE_SZ refused).",
            value=pipes.resize_failures,
        )
        yield CounterMetricFamily(
            "splicerelay_access_log_dropped",
            "Access-log lines lost: the output (stdout) did not take them in time.",
            value=ACCESS_LOG.dropped,
        )
        build = GaugeMetricFamily(
            "splicerelay_build_info", "The running version; always 1.", labels=["version"]
        )
        build.add_metric([self._version], 1)
        yield build

    @staticmethod
    def _upstream_families(routes: list[RouteStats]) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "splicerelay_upstream_up",
            "1 when the upstream takes new connections, 0 when health checks marked it down.",
            labels=["route", "upstream"],
        )
        active = GaugeMetricFamily(
            "splicerelay_upstream_connections_active",
            "Connections open to the upstream now.",
            labels=["route", "upstream"],
        )
        connect_time = HistogramMetricFamily(
            "splicerelay_upstream_connect_duration_seconds",
            "Time to establish a connection to the upstream.",
            labels=["route", "upstream"],
        )
        admin = GaugeMetricFamily(
            "splicerelay_upstream_admin_state",
            "1 for the admin state an operator set on the upstream (ready, drain or maint), "
            "0 for the others; drain and maint take no new connections.",
            labels=["route", "upstream", "state"],
        )
        weight = GaugeMetricFamily(
            "splicerelay_upstream_weight",
            "The upstream's weight for new connections: the configured one, or the operator's.",
            labels=["route", "upstream"],
        )
        for route in routes:
            for upstream in list(route.upstreams.values()):
                labels = [route.name, upstream.label]
                up.add_metric(labels, 1 if upstream.up else 0)
                active.add_metric(labels, upstream.active)
                add_histogram(connect_time, labels, upstream.connect_seconds)
                state = upstream.admin_state
                for name in ADMIN_STATES:
                    admin.add_metric([*labels, name], 1 if name == state else 0)
                weight.add_metric(labels, upstream.weight)
        yield up
        yield active
        yield connect_time
        yield admin
        yield weight


def reload_state_families(successful: bool, timestamp: float) -> Iterator[Metric]:
    """How the last config reload went, and when: an alert on a failed reload can clear
    as soon as a good one follows, which a count of failures over a window cannot."""
    yield GaugeMetricFamily(
        "splicerelay_config_last_reload_successful",
        "1 if the last config reload succeeded (or none was tried since the start), "
        "0 if it was refused and the previous config still runs.",
        value=1 if successful else 0,
    )
    yield GaugeMetricFamily(
        "splicerelay_config_last_reload_timestamp_seconds",
        "Unix time of the last config reload, or of the start when there was none.",
        value=timestamp,
    )


def limit_families(config: Config) -> Iterator[Metric]:
    """The connection limits of the running config, to divide connections_active by."""
    per_route = GaugeMetricFamily(
        "splicerelay_max_connections",
        "The route's max_connections: at that many open connections it stops accepting. "
        "With workers, each worker has this limit and the supervisor serves their sum.",
        labels=["route"],
    )
    for route in config.routes:
        per_route.add_metric([route.name], route.max_connections)
    yield per_route
    if config.max_connections is not None:  # no global limit: no series
        yield GaugeMetricFamily(
            "splicerelay_max_connections_global",
            "The global max_connections across all routes; absent when none is set. "
            "With workers, each worker has this limit and the supervisor serves their sum.",
            value=config.max_connections,
        )


class ProcessMetrics(Collector):
    """process_* of this process from /proc: open and max fds, RSS, CPU, start time.

    Why: each relayed connection holds two fds, so RLIMIT_NOFILE is the limit a busy
    relay meets first; process_open_fds / process_max_fds is what an alert watches.
    The cost is per scrape: a listing of /proc/self/fd, one entry per open fd.

    `worker` (a worker's slot, as text) labels every sample: under a supervisor, which
    serves the families of all its processes together, each process stays its own
    series (see workers/scrape.py).
    """

    def __init__(self, worker: str | None = None) -> None:
        self._collector = ProcessCollector(registry=None)
        self._worker = worker

    def collect(self) -> Iterable[Metric]:
        families = self._collector.collect()
        if self._worker is None:
            return families
        return [with_label(family, "worker", self._worker) for family in families]


def with_label(family: Metric, name: str, value: str) -> Metric:
    """A copy of `family` whose every sample has label `name`=`value` as well."""
    labelled = Metric(family.name, family.documentation, family.type, family.unit)
    labelled.samples = [
        sample._replace(labels={**sample.labels, name: value}) for sample in family.samples
    ]
    return labelled


def add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    buckets = [(format_bound(bound), count) for bound, count in histogram.cumulative()]
    family.add_metric(labels, buckets, histogram.sum)


def format_bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def make_registry(
    stats: RelayStats,
    version: str,
    config: Callable[[], Config] | None = None,
    worker: str | None = None,
) -> CollectorRegistry:
    """The relay's families, and process_* of this process (labelled with `worker`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(stats, version, config))
    registry.register(ProcessMetrics(worker))
    return registry


class _QuietHandler(WSGIRequestHandler):
    """Scrapes arrive every few seconds; one log line each would drown the real logs."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def make_app(
    registry: CollectorRegistry, is_ready: Callable[[], bool]
) -> Callable[..., Iterator[bytes]]:
    """/metrics; /healthz answers while the process lives; /readyz once it serves."""
    metrics_app = make_wsgi_app(registry)

    def plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            return plain(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            if is_ready():
                return plain(start_response, "200 OK", "ready\n")
            return plain(
                start_response,
                "503 Service Unavailable",
                "not ready: listeners not bound yet, or a route has no upstream up\n",
            )
        return plain(
            start_response, "404 Not Found", "not found: try /metrics, /healthz or /readyz\n"
        )

    return app


class MetricsServer:
    """The /metrics endpoint, served from a daemon thread.

    On a TCP address for Prometheus; on a unix address for a worker process, whose
    supervisor scrapes it and serves the sum (see workers/scrape.py).
    """

    def __init__(
        self,
        address: Address,
        registry: CollectorRegistry,
        is_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        app = make_app(registry, is_ready)
        self._server: WSGIServer
        if isinstance(address, UnixAddress):
            self._server = _unix_server(address.path, app)
            self.port = 0
        elif isinstance(address, TcpAddress):
            self._server = _tcp_server(address, app)
            self.port = self._server.server_address[1]
        else:
            raise OSError(f"metrics.listen must be a TCP address, not {address}")
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _ThreadPerRequest(WSGIServer):
    """One short-lived thread per scrape, like socketserver.ThreadingMixIn."""

    daemon_threads = True
    allow_reuse_address = True

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_one, args=(request, client_address), daemon=True
        )
        thread.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def _tcp_server(address: TcpAddress, app: Callable[..., Any]) -> WSGIServer:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET

    class Server(_ThreadPerRequest):
        address_family = family

    return make_server(
        address.host, address.port, app, server_class=Server, handler_class=_QuietHandler
    )


class _UnixServer(_ThreadPerRequest):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        # Why not HTTPServer.server_bind: it takes (host, port) from the address and
        # looks the host up with getfqdn(); a unix socket has a path and no host.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "localhost"
        self.server_port = 0
        self.setup_environ()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Why a made-up peer: accept() on a unix socket gives an empty address, and the
        # WSGI handler reads client_address[0] for REMOTE_ADDR.
        connection, _ = self.socket.accept()
        return connection, ("unix", 0)


def _unix_server(path: str, app: Callable[..., Any]) -> WSGIServer:
    if not path.startswith("\0"):  # a name in the abstract namespace has no file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by an earlier process of the same worker slot
    server = _UnixServer(path, _QuietHandler)  # type: ignore[arg-type]
    server.set_app(app)
    return server
