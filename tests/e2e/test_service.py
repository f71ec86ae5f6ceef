"""Running as a service: sd_notify, socket activation, reload without loss, drain, and a
real Prometheus server scraping the relay."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import trio

from tests.support.harness import Relay, free_port, poll_until, relay_config
from tests.support.peers import (
    connect,
    echo,
    expected_transfer,
    start_server,
)
from tests.support.real_peers import require, running
from tests.support.service import (
    NotifySocket,
    can_connect,
    connect_when_listening,
    download,
    downloads_in_flight,
    sigterm_during_downloads,
    start_payload_server,
)

MiB = 1 << 20


def test_notify_ready_reloading_stopping_and_watchdog(relay_factory, tmp_path: Path):
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        listen_port = free_port()
        relay = relay_factory.start(
            relay_config(listen_port, free_port()),
            env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
        )
        ready = notify.next_with("READY")
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "0 connections"
        # READY=1 is only sent once the port accepts.
        assert can_connect(listen_port)
        assert notify.next_with("WATCHDOG", timeout=2)["WATCHDOG"] == "1"

        relay.process.send_signal(signal.SIGHUP)
        reloading = notify.next_with("RELOADING")
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert notify.next_with("READY")["READY"] == "1"

        relay.process.send_signal(signal.SIGTERM)
        assert notify.next_with("STOPPING")["STOPPING"] == "1"
        assert relay.process.wait(timeout=15) == 0
    finally:
        notify.close()


async def test_socket_activation_serves_on_the_passed_socket(relay_factory):
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        config = relay_config(listen_port, upstream_port).replace("name: test", "name: web")
        # systemd-socket-activate starts the relay on the first connection. The relay
        # would fail with "address in use" if it tried to bind the port itself.
        first: list[socket.socket] = []
        relay = await relay_factory.astart(
            config,
            prefix=[activate, "-l", f"127.0.0.1:{listen_port}", "--fdname=web"],
            after_launch=lambda: first.append(connect_when_listening(listen_port)),
        )
        streams = [trio.SocketStream(trio.socket.from_stdlib_socket(first[0]))]
        for index in range(20):
            stream = streams.pop() if streams else await connect(listen_port)
            message = f"exchange {index}".encode()
            await stream.send_all(message)
            await stream.send_eof()
            reply = b""
            while chunk := await stream.receive_some(100):
                reply += chunk
            await stream.aclose()
            assert reply == message
        nursery.cancel_scope.cancel()
    metrics = relay.metrics()
    assert metrics.get("splicerelay_connections_total", route="web", outcome="completed") == 20


async def test_reload_under_load_loses_nothing_and_moves_new_connections(
    relay_factory, tmp_path: Path
):
    size = 64 * MiB
    transfers = 16
    async with trio.open_nursery() as nursery:
        old_port = await start_payload_server(nursery, 81, size, b"old")
        new_port = await start_payload_server(nursery, 81, size, b"new")
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, old_port))
        async with downloads_in_flight(relay, listen_port, transfers, pace=0.004) as results:
            relay.config_path.write_text(
                relay.config_path.read_text().replace(
                    f"127.0.0.1:{old_port}", f"127.0.0.1:{new_port}"
                )
            )
            relay.process.send_signal(signal.SIGHUP)

            def reloaded() -> bool:
                return (
                    relay.metrics().get("splicerelay_config_reloads_total", result="success") == 1
                )

            await trio.to_thread.run_sync(poll_until, reloaded, 10, "the reload")
            assert relay.metrics().get("splicerelay_connections_active") == transfers
            # New connections go to the new upstream while the old transfers go on.
            tag, fresh = await download(listen_port, 3)
            assert tag == b"new" and fresh == expected_transfer(81, size)

            # A broken config on SIGHUP leaves the relay serving as it was.
            relay.config_path.write_text("routes: [ this is not yaml\n")
            relay.process.send_signal(signal.SIGHUP)

            def failed() -> bool:
                return (
                    relay.metrics().get("splicerelay_config_reloads_total", result="failure") == 1
                )

            await trio.to_thread.run_sync(poll_until, failed, 10, "the failed reload")
            tag, fresh = await download(listen_port, 3)
            assert tag == b"new" and fresh == expected_transfer(81, size)
        nursery.cancel_scope.cancel()

    assert len(results) == transfers
    expected = expected_transfer(81, size)
    for tag, transfer in results:
        assert tag == b"old"
        assert transfer == expected
    assert "reload failed: invalid config" in relay.stderr()


async def test_sigterm_drains_transfers_refuses_new_clients_and_exits_0(relay_factory):
    size = 32 * MiB
    transfers = 4
    async with trio.open_nursery() as nursery:
        upstream_port = await start_payload_server(nursery, 91, size, b"go!")
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        results = await sigterm_during_downloads(relay, listen_port, transfers)
        code = await trio.to_thread.run_sync(lambda: relay.process.wait(timeout=30))
        nursery.cancel_scope.cancel()
    assert code == 0
    assert len(results) == transfers
    for tag, transfer in results:
        assert tag == b"go!"
        assert transfer == expected_transfer(91, size)


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: splicerelay
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
"""


def prometheus_query(port: int, query: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success"
    return list(body["data"]["result"])


async def test_prometheus_scrapes_the_bytes_moved(relay_factory, tmp_path: Path):
    prometheus = require("prometheus", "prometheus")
    size = 5 * MiB + 77
    async with trio.open_nursery() as nursery:
        upstream_port = await start_payload_server(nursery, 95, size, b"tag")
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        _tag, transfer = await download(listen_port, 3)
        assert transfer == expected_transfer(95, size)
        nursery.cancel_scope.cancel()

    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(metrics_port=relay.metrics_port))
    port = free_port()
    command = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running(command, port, tmp_path / "prometheus.log"):
        query = 'sum by (direction) (splicerelay_bytes_total{route="test",path="splice"})'

        def scraped() -> bool:
            try:
                result = prometheus_query(port, query)
            except OSError:
                return False
            values = {item["metric"]["direction"]: float(item["value"][1]) for item in result}  # type: ignore[index]
            return values == {"upstream_to_client": size + 3, "client_to_upstream": 0.0}

        await trio.to_thread.run_sync(
            poll_until, scraped, 30, "Prometheus to scrape the bytes moved", 0.5
        )
        up = prometheus_query(port, 'up{job="splicerelay"}')
        assert float(up[0]["value"][1]) == 1  # type: ignore[index]


def test_readyz_and_healthz(relay_factory):
    listen_port = free_port()
    relay: Relay = relay_factory.start(relay_config(listen_port, free_port()))
    for path, status in (("/healthz", 200), ("/readyz", 200), ("/nothing", 404)):
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{relay.metrics_port}{path}", timeout=5
            ) as reply:
                assert reply.status == status
        except urllib.error.HTTPError as error:
            assert error.code == status


def test_readyz_is_503_while_every_upstream_is_down(relay_factory):
    listen_port = free_port()
    dead = free_port()
    config = relay_config(
        listen_port,
        dead,
        extra="    health_check: {interval: 100ms, timeout: 100ms, rise: 1, fall: 1}\n",
    )
    relay: Relay = relay_factory.start(config)

    def not_ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/readyz", timeout=5):
                return False
        except urllib.error.HTTPError as error:
            return error.code == 503

    poll_until(not_ready, 5, "/readyz to say 503")
    with urllib.request.urlopen(
        f"http://127.0.0.1:{relay.metrics_port}/healthz", timeout=5
    ) as reply:
        assert reply.status == 200


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_access_log_has_one_line_per_connection(relay_factory, log_format: str):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_payload_server(nursery, 7, 1000, b"abc")
        listen_port = free_port()
        config = relay_config(listen_port, upstream_port).replace(
            "format: json", f"format: {log_format}"
        )
        relay = await relay_factory.astart(config)
        for _ in range(3):
            await download(listen_port, 3)
        nursery.cancel_scope.cancel()

    def three_lines() -> bool:
        return len(relay.stdout().splitlines()) == 3

    await trio.to_thread.run_sync(poll_until, three_lines, 5, "three access log lines")
    for line in relay.stdout().splitlines():
        if log_format == "json":
            record = json.loads(line)
            assert record["message"] == "connection"
        else:
            timestamp, level, message, *pairs = line.split(" ")
            assert (level, message) == ("info", "connection")
            record = {key: value for key, _, value in (pair.partition("=") for pair in pairs)}
            record["time"] = timestamp
            record["bytes_in"], record["bytes_out"] = (
                int(record["bytes_in"]),
                int(record["bytes_out"]),
            )
            record["duration_seconds"] = float(record["duration_seconds"])
        assert record["route"] == "test"
        assert record["upstream"] == f"127.0.0.1:{upstream_port}"
        assert record["client"].startswith("127.0.0.1:")
        assert record["bytes_out"] == 1003
        assert record["bytes_in"] == 0
        assert record["outcome"] == "completed"
        assert 0 <= record["duration_seconds"] < 10
        assert record["time"].endswith("Z")


async def test_watch_reloads_when_a_configmap_style_symlink_flips(relay_factory, tmp_path: Path):
    """Kubernetes updates a mounted ConfigMap by pointing the ..data symlink at a new dir."""
    async with trio.open_nursery() as nursery:
        first_port = await start_payload_server(nursery, 3, 10, b"one")
        second_port = await start_payload_server(nursery, 3, 10, b"two")
        listen_port = free_port()
        mount = tmp_path / "mount"
        mount.mkdir()
        relay = await relay_factory.astart(
            relay_config(listen_port, first_port), extra_args=["--watch"]
        )
        template = relay.config_path.read_text()
        for version, port in (("v1", first_port), ("v2", second_port)):
            (mount / version).mkdir()
            (mount / version / "relay.yaml").write_text(
                template.replace(f"127.0.0.1:{first_port}", f"127.0.0.1:{port}")
            )
        (mount / "..data").symlink_to("v1")
        (mount / "relay.yaml").symlink_to("..data/relay.yaml")
        # Point the running relay's file at the mount, the way a pod sees it.
        relay.config_path.unlink()
        relay.config_path.symlink_to(mount / "relay.yaml")
        (mount / "..data_tmp").symlink_to("v2")
        (mount / "..data_tmp").rename(mount / "..data")  # atomic, as the kubelet does

        def reloaded() -> bool:
            return relay.metrics().get("splicerelay_config_reloads_total", result="success") >= 1

        await trio.to_thread.run_sync(poll_until, reloaded, 10, "the watch to reload")
        tag, _ = await download(listen_port, 3)
        assert tag == b"two"
        nursery.cancel_scope.cancel()
