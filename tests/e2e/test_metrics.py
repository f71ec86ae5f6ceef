"""/metrics as Prometheus sees it: names, types, labels, and promtool's lint."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import trio

from splicerelay import __version__
from tests.support.harness import free_port, poll_until, relay_config
from tests.support.peers import connect, echo, start_server

EXPECTED_FAMILIES = {
    "splicerelay_bytes_total": "counter",
    "splicerelay_connections_active": "gauge",
    "splicerelay_connections_total": "counter",
    "splicerelay_upstream_connect_errors_total": "counter",
    "splicerelay_pipes": "gauge",
    "splicerelay_pipe_resize_failures_total": "counter",
    "splicerelay_build_info": "gauge",
    "splicerelay_upstream_up": "gauge",
    "splicerelay_upstream_connections_active": "gauge",
    "splicerelay_upstream_connect_duration_seconds": "histogram",
    "splicerelay_connection_duration_seconds": "histogram",
    "splicerelay_limit_wait_seconds_total": "counter",
    "splicerelay_global_limit_wait_seconds_total": "counter",
    "splicerelay_config_reloads_total": "counter",
}


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


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool (Debian package prometheus) is not installed"
)
async def test_promtool_finds_nothing_to_fix(relay_factory):
    listen_port = free_port()
    relay = await relay_factory.astart(relay_config(listen_port, free_port()))
    text = relay.scrape_text()
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
