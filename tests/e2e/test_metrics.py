"""/metrics as Prometheus sees it: names, types, labels, and promtool's lint."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import trio
import yaml

from splicerelay import __version__
from tests.support.harness import (
    Metrics,
    Relay,
    RelayFactory,
    child_pids,
    fd_count,
    free_port,
    poll_until,
    relay_config,
)
from tests.support.peers import connect, echo, start_server
from tests.support.real_peers import require, running

ALERT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"

# prometheus_client's process collector: every process of the relay exports these.
PROCESS_FAMILIES = {
    "process_virtual_memory_bytes": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}
EXPECTED_FAMILIES = {
    "splicerelay_bytes_total": "counter",
    "splicerelay_connections_active": "gauge",
    "splicerelay_connections_total": "counter",
    "splicerelay_upstream_connect_errors_total": "counter",
    "splicerelay_pipes": "gauge",
    "splicerelay_pipe_resize_failures_total": "counter",
    "splicerelay_access_log_dropped_total": "counter",
    "splicerelay_build_info": "gauge",
    "splicerelay_upstream_up": "gauge",
    "splicerelay_upstream_connections_active": "gauge",
    "splicerelay_upstream_connect_duration_seconds": "histogram",
    "splicerelay_upstream_admin_state": "gauge",
    "splicerelay_upstream_weight": "gauge",
    "splicerelay_connection_duration_seconds": "histogram",
    "splicerelay_limit_wait_seconds_total": "counter",
    "splicerelay_global_limit_wait_seconds_total": "counter",
    "splicerelay_config_reloads_total": "counter",
    "splicerelay_config_last_reload_successful": "gauge",
    "splicerelay_config_last_reload_timestamp_seconds": "gauge",
    "splicerelay_max_connections": "gauge",
    **PROCESS_FAMILIES,
}
# Open only while a scrape is served: its own connection, and the directory that
# lists /proc/self/fd while the collector counts the entries.
SCRAPE_FDS = 2
FD_LIMIT = 4096  # set on the relay with prlimit, to tell the relay's limit from ours


def type_lines(text: str) -> dict[str, str]:
    return {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")
    }


async def test_metrics_families_types_and_labels(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        dead_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, dead_port, upstream_port))
        stream = await connect(listen_port)
        await stream.send_all(b"12345")
        await stream.send_eof()
        while await stream.receive_some(100):
            pass
        await stream.aclose()
        nursery.cancel_scope.cancel()

    def counted() -> bool:
        return relay.metrics().get("splicerelay_connections_total", outcome="completed") == 1

    await trio.to_thread.run_sync(poll_until, counted, 5, "the connection to be counted")
    text = relay.scrape_text()
    assert type_lines(text) == EXPECTED_FAMILIES
    metrics = relay.metrics()
    assert metrics.get("splicerelay_build_info", version=__version__) == 1
    assert metrics.get("splicerelay_connections_active", route="test") == 0
    assert (
        metrics.get(
            "splicerelay_bytes_total", route="test", direction="client_to_upstream", path="splice"
        )
        == 5
    )
    assert (
        metrics.get(
            "splicerelay_bytes_total", route="test", direction="upstream_to_client", path="splice"
        )
        == 5
    )
    assert (
        metrics.get(
            "splicerelay_upstream_connect_errors_total",
            route="test",
            upstream=f"127.0.0.1:{dead_port}",
            reason="refused",
        )
        == 1
    )
    assert metrics.get("splicerelay_upstream_up", upstream=f"127.0.0.1:{upstream_port}") == 1
    assert (
        metrics.get(
            "splicerelay_upstream_connect_duration_seconds_count",
            upstream=f"127.0.0.1:{upstream_port}",
        )
        == 1
    )
    assert metrics.get("splicerelay_connection_duration_seconds_count", route="test") == 1
    # Every outcome is exported from the start, so alerts and rates see zeros, not gaps.
    for outcome in ("completed", "client_reset", "upstream_reset", "connect_failed"):
        metrics.get("splicerelay_connections_total", route="test", outcome=outcome)


def limits_config(
    listen_port: int,
    upstream_port: int,
    *,
    workers: str = "1",
    route_limit: int = 10000,
    global_limit: int | None = None,
) -> str:
    top = f"workers: {workers}\n"
    if global_limit is not None:
        top += f"max_connections: {global_limit}\n"
    return top + relay_config(
        listen_port, upstream_port, extra=f"    max_connections: {route_limit}\n"
    )


def require_prlimit() -> list[str]:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (Debian package util-linux) is not installed")
    return [prlimit, f"--nofile={FD_LIMIT}:{FD_LIMIT}"]


def worker_pids(relay: Relay, count: int) -> list[int]:
    """The supervisor's `count` worker processes, once it has that many."""
    found: list[int] = []

    def has_count() -> bool:
        found[:] = child_pids(relay.pid)
        return len(found) == count

    poll_until(has_count, 15, f"{count} worker processes")
    return found


def pipe_fds(metrics: Metrics) -> float:
    """fds of the relay's pipes, pooled or lent: two per pipe, none a connection's own."""
    return 2 * (
        metrics.get("splicerelay_pipes", state="idle")
        + metrics.get("splicerelay_pipes", state="in_use")
    )


async def close_all(relay: Relay, streams: list[trio.SocketStream]) -> None:
    """Close the clients and wait until the relay has closed every connection (before
    the echo server is cancelled, which would leave its sockets open)."""
    for stream in streams:
        await stream.aclose()

    def all_closed() -> bool:
        return relay.metrics().get("splicerelay_connections_active") == 0

    await trio.to_thread.run_sync(poll_until, all_closed, 10, "every connection to close")


def open_fds_by_worker(metrics: Metrics) -> dict[str | None, float]:
    """process_open_fds by the value of its `worker` label (None: no such label)."""
    return {
        dict(labels).get("worker"): value
        for (name, labels), value in metrics.samples.items()
        if name == "process_open_fds"
    }


async def test_process_metrics_are_the_relays_own(relay_factory: RelayFactory) -> None:
    prefix = require_prlimit()
    connections = 20
    started = time.time()
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port), prefix=prefix)
        seen: list[tuple[float, float]] = []

        def fds_as_in_proc() -> bool:
            # What /proc/PID/fd lists, plus the scrape's own fds while it is served.
            # (Polled: the socket of an earlier scrape may linger for a moment.)
            metrics = relay.metrics()
            seen.append((metrics.get("process_open_fds"), pipe_fds(metrics)))
            return seen[-1][0] == relay.fds() + SCRAPE_FDS

        await trio.to_thread.run_sync(poll_until, fds_as_in_proc, 5, "fds as in /proc")
        idle = seen[-1][0] - seen[-1][1]
        metrics = relay.metrics()
        assert metrics.get("process_max_fds") == FD_LIMIT
        assert 0 < metrics.get("process_resident_memory_bytes") <= 2 * relay.rss()
        assert metrics.get("process_cpu_seconds_total") > 0
        assert started - 1 <= metrics.get("process_start_time_seconds") <= time.time()
        assert set(open_fds_by_worker(metrics)) == {None}  # one process, no worker label

        # Each relayed connection holds two sockets (no data yet: no pipes either).
        streams = [await connect(listen_port) for _ in range(connections)]

        def all_connected() -> bool:
            return relay.metrics().get("splicerelay_upstream_connections_active") == connections

        await trio.to_thread.run_sync(poll_until, all_connected, 10, "upstream connections")
        await trio.to_thread.run_sync(poll_until, fds_as_in_proc, 5, "fds as in /proc")
        assert seen[-1][0] - seen[-1][1] == idle + 2 * connections
        await close_all(relay, streams)
        nursery.cancel_scope.cancel()


async def test_process_metrics_of_every_worker_and_of_the_supervisor(
    relay_factory: RelayFactory,
) -> None:
    prefix = require_prlimit()
    connections = 20
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            limits_config(listen_port, upstream_port, workers="2"), prefix=prefix
        )
        workers = await trio.to_thread.run_sync(worker_pids, relay, 2)
        # Which slot is which pid the scrape does not say; as a set, the values must be
        # what /proc says of each process (plus each scrape's own fds, see SCRAPE_FDS).
        by_worker: dict[str | None, float] = {}

        def as_in_proc() -> bool:
            by_worker.update(open_fds_by_worker(relay.metrics()))
            return by_worker["supervisor"] == fd_count(relay.pid) + SCRAPE_FDS and sorted(
                by_worker[slot] for slot in ("0", "1")
            ) == sorted(fd_count(pid) + SCRAPE_FDS for pid in workers)

        await trio.to_thread.run_sync(poll_until, as_in_proc, 5, "fds as in /proc, per process")
        assert set(by_worker) == {"0", "1", "supervisor"}
        metrics = relay.metrics()
        for worker in ("0", "1", "supervisor"):
            # The alert's expression, process by process.
            ratio = metrics.get("process_open_fds", worker=worker) / metrics.get(
                "process_max_fds", worker=worker
            )
            assert 0 < ratio < 0.1, worker
            assert metrics.get("process_max_fds", worker=worker) == FD_LIMIT
            assert metrics.get("process_cpu_seconds_total", worker=worker) > 0
        before = dict(by_worker)
        pipes_before = pipe_fds(metrics)

        # The workers' fds grow by two per connection, the supervisor's not at all.
        streams = [await connect(listen_port) for _ in range(connections)]

        def all_counted() -> bool:
            metrics = relay.metrics()
            by_worker.update(open_fds_by_worker(metrics))
            grown = sum(by_worker[slot] - before[slot] for slot in ("0", "1"))
            grown -= pipe_fds(metrics) - pipes_before
            return grown == 2 * connections and by_worker["supervisor"] == before["supervisor"]

        await trio.to_thread.run_sync(poll_until, all_counted, 10, "2 fds per connection")
        await close_all(relay, streams)
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool (Debian package prometheus) is not installed"
)
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_promtool_finds_nothing_to_fix(relay_factory: RelayFactory, workers: str) -> None:
    listen_port = free_port()
    relay = await relay_factory.astart(
        limits_config(listen_port, free_port(), workers=workers, global_limit=500)
    )
    text = relay.scrape_text()
    # Every family, the optional global limit and (with workers) the supervisor's too.
    assert "splicerelay_max_connections_global " in text
    assert "process_open_fds" in text
    if workers == "2":
        assert "splicerelay_worker_restarts_total " in text
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


async def test_idle_connections_hold_no_pipe(relay_factory):
    connections = 50
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        streams = []
        for _ in range(connections):
            stream = await connect(listen_port)
            await stream.send_all(b"x" * 100_000)
            received = 0
            while received < 100_000:
                received += len(await stream.receive_some(100_000))
            streams.append(stream)

        def all_idle() -> bool:
            metrics = relay.metrics()
            return (
                metrics.get("splicerelay_connections_active") == connections
                and metrics.get("splicerelay_pipes", state="in_use") == 0
            )

        await trio.to_thread.run_sync(poll_until, all_idle, 10, "connections to go idle")
        # Idle, each connection holds its two sockets and nothing else. (Polled: the
        # scrape that reads the pool size briefly holds a socket of its own.)
        seen: list[int] = []

        def two_sockets_each() -> bool:
            seen.append(relay.fds_held_for_connections())
            return seen[-1] == 2 * connections

        await trio.to_thread.run_sync(poll_until, two_sockets_each, 5, "2 fds per idle connection")
        assert min(seen) >= 2 * connections
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_limits_and_last_reload_follow_reloads(
    relay_factory: RelayFactory, workers: str
) -> None:
    processes = int(workers)  # each worker applies the limits; the scrape sums them
    listen_port = free_port()
    upstream_port = free_port()
    started = time.time()
    relay = await relay_factory.astart(
        limits_config(listen_port, upstream_port, workers=workers, route_limit=100)
    )
    metrics = relay.metrics()
    assert metrics.get("splicerelay_max_connections", route="test") == 100 * processes
    assert metrics.get("splicerelay_max_connections_global", default=-1.0) == -1.0  # unset
    assert metrics.get("splicerelay_config_last_reload_successful") == 1
    start_stamp = metrics.get("splicerelay_config_last_reload_timestamp_seconds")
    assert started - 1 <= start_stamp <= time.time()

    def reload(text: str) -> float:
        relay.config_path.write_text(text.replace("{metrics_port}", str(relay.metrics_port)))
        sent = time.time()
        relay.process.send_signal(signal.SIGHUP)
        return sent

    def reloaded(successful: int, since: float, route: int, global_: float) -> None:
        def done() -> bool:
            metrics = relay.metrics()
            return (
                metrics.get("splicerelay_config_last_reload_successful") == successful
                and metrics.get("splicerelay_config_last_reload_timestamp_seconds") >= since
                and metrics.get("splicerelay_max_connections", route="test") == route * processes
                and metrics.get("splicerelay_max_connections_global", default=-1.0)
                == (global_ * processes if global_ >= 0 else -1.0)
            )

        poll_until(done, 15, f"the reload (successful={successful}, limits {route}/{global_})")

    sent = reload(
        limits_config(listen_port, upstream_port, workers=workers, route_limit=50, global_limit=300)
    )
    await trio.to_thread.run_sync(reloaded, 1, sent, 50, 300)
    # A refused reload: the gauge says so, and the limits stay those running.
    sent = reload("routes: [ this is not yaml\n")
    await trio.to_thread.run_sync(reloaded, 0, sent, 50, 300)
    assert relay.metrics().get("splicerelay_config_reloads_total", result="failure") == 1
    # The next good reload clears it; a global limit taken away takes its series along.
    sent = reload(limits_config(listen_port, upstream_port, workers=workers, route_limit=70))
    await trio.to_thread.run_sync(reloaded, 1, sent, 70, -1)


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: splicerelay
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
"""


def alert_ratio(name: str) -> str:
    """The expression of alert `name` in alerts.yml, less its `> threshold`."""
    rules = [
        rule
        for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
        for rule in group["rules"]
    ]
    (expr,) = (rule["expr"] for rule in rules if rule["alert"] == name)
    ratio, _threshold = str(expr).rsplit(" > ", 1)
    return ratio


def prometheus_query(port: int, query: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success"
    return list(body["data"]["result"])


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_prometheus_computes_the_alert_ratios_per_process_and_route(
    relay_factory: RelayFactory, tmp_path: Path, workers: str
) -> None:
    """The fd and connection alerts, evaluated by Prometheus on what the relay serves:
    one fd ratio per process (each worker's and the supervisor's own), one connection
    ratio per route."""
    prometheus = require("prometheus", "prometheus")
    listen_port = free_port()
    relay = await relay_factory.astart(
        limits_config(listen_port, free_port(), workers=workers, route_limit=100)
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(metrics_port=relay.metrics_port))
    port = free_port()
    command = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    fds_ratio = alert_ratio("SplicerelayFdsNearLimit")
    connections_ratio = alert_ratio("SplicerelayConnectionsNearLimit")
    expected = {None} if workers == "1" else {"0", "1", "supervisor"}
    found: dict[str, list[dict[str, object]]] = {}

    def evaluated() -> bool:
        try:
            found["fds"] = prometheus_query(port, fds_ratio)
            found["connections"] = prometheus_query(port, connections_ratio)
        except OSError:
            return False
        processes = {item["metric"].get("worker") for item in found["fds"]}  # type: ignore[attr-defined]
        return processes == expected and len(found["connections"]) == 1

    with running(command, port, tmp_path / "prometheus.log"):
        await trio.to_thread.run_sync(poll_until, evaluated, 30, "Prometheus to scrape", 0.5)
    for item in found["fds"]:
        assert 0 < float(item["value"][1]) < 0.1, item  # type: ignore[index]
    (route,) = found["connections"]
    assert route["metric"]["route"] == "test"  # type: ignore[index]
    assert float(route["value"][1]) == 0  # type: ignore[index]
