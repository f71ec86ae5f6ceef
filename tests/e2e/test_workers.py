"""`workers` above 1: a supervisor and its worker processes, seen from outside.

Real processes and real sockets on loopback. Each test starts the real relay, finds its
workers among the supervisor's children in /proc, and after the test checks that every
worker it saw is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from splicerelay import __version__
from splicerelay.config import parse_config, render_config
from splicerelay.ops.service import status_line
from splicerelay.workers.contract import InheritedSocket, WorkerSetup, decode, encode
from splicerelay.workers.merged_metrics import (
    cumulative_part,
    merge,
    parse_exposition,
    to_metrics,
    without,
)
from splicerelay.workers.worker_table import (
    WORKER_WATCHDOG_ENV,
    WORKER_WATCHDOG_SECONDS,
    connections_in_status,
    describe_exit,
    restart_delay,
    worker_watchdog_seconds,
)
from tests.support.harness import (
    Relay,
    RelayFactory,
    child_pids,
    free_port,
    is_running,
    poll_until,
    relay_config,
)
from tests.support.peers import (
    connect,
    echo,
    expected_transfer,
    start_server,
)
from tests.support.service import (
    NotifySocket,
    can_connect,
    connect_when_listening,
    download,
    sigterm_during_downloads,
    start_payload_server,
)

MiB = 1 << 20
CORES = len(os.sched_getaffinity(0))


def workers_config(listen_port: int, *upstream_ports: int, workers: str = "2") -> str:
    return f"workers: {workers}\n" + relay_config(listen_port, *upstream_ports)


class Workers:
    """Every worker pid seen during a test; all must be gone when it ends."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def of(self, relay: Relay, count: int, timeout: float = 15.0) -> list[int]:
        """The supervisor's `count` children, once it has that many."""
        found: list[int] = []

        def has_count() -> bool:
            found[:] = child_pids(relay.pid)
            self.seen.update(found)
            return len(found) == count

        poll_until(has_count, timeout, f"{count} worker processes")
        return found

    def check_gone(self) -> None:
        leftover = [pid for pid in self.seen if is_running(pid)]
        for pid in leftover:  # only pids this test saw as the relay's workers
            os.kill(pid, signal.SIGKILL)
        assert leftover == [], f"worker processes left running: {leftover}"


@pytest.fixture
def workers(relay_factory: RelayFactory) -> Iterator[Workers]:
    seen = Workers()
    yield seen
    # Stop the relays first (relay_factory's own teardown then finds them stopped).
    relay_factory.check_and_stop_all()
    poll_until(lambda: not any(is_running(pid) for pid in seen.seen), 15, "workers to exit")
    seen.check_gone()


def fd_total(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def exchange(stream: trio.SocketStream, message: bytes) -> None:
    await stream.send_all(message)
    received = b""
    while len(received) < len(message):
        chunk = await stream.receive_some(65536)
        assert chunk, "connection closed early"
        received += chunk
    assert received == message


# ----- processes and connections --------------------------------------------------


async def test_two_workers_are_children_and_both_take_connections(relay_factory, workers):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server_echo(nursery)
        listen_port = free_port()
        relay = await relay_factory.astart(workers_config(listen_port, upstream_port))
        pids = await trio.to_thread.run_sync(workers.of, relay, 2)
        assert relay.pid not in pids
        assert all(is_running(pid) for pid in pids)
        # Held open, each relayed connection costs its worker two sockets: counting fds
        # per worker shows which of them took connections.
        baseline = {pid: fd_total(pid) for pid in pids}
        streams: list[trio.SocketStream] = []
        for _batch in range(20):
            for _ in range(10):
                stream = await connect(listen_port)
                await exchange(stream, b"ping %d" % len(streams))
                streams.append(stream)
            took = {pid: fd_total(pid) - baseline[pid] for pid in pids}
            if all(extra >= 2 for extra in took.values()):
                break
        assert all(extra >= 2 for extra in took.values()), f"fds per worker: {took}"

        def all_counted() -> bool:
            return relay.metrics().get("splicerelay_connections_active") == len(streams)

        await trio.to_thread.run_sync(poll_until, all_counted, 10, "connections in /metrics")
        metrics = relay.metrics()
        assert metrics.get("splicerelay_workers") == 2
        assert metrics.get("splicerelay_worker_restarts_total") == 0
        for path in ("/readyz", "/healthz"):
            url = f"http://127.0.0.1:{relay.metrics_port}{path}"
            with urllib.request.urlopen(url, timeout=5) as reply:
                assert reply.status == 200
        # A fact, not an amount: one series, value 1, however many workers.
        assert metrics.get("splicerelay_build_info", version=__version__) == 1
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def start_server_echo(nursery: trio.Nursery) -> int:
    return await start_server(nursery, echo)


async def wait_replaced(relay: Relay, workers: Workers, victim: int) -> None:
    """Until the supervisor again has two workers, `victim` not among them."""

    def replaced() -> bool:
        now = child_pids(relay.pid)
        workers.seen.update(now)
        return len(now) == 2 and victim not in now

    await trio.to_thread.run_sync(poll_until, replaced, 15, "a new worker")


async def check_one_restart_and_service(relay: Relay, listen_port: int) -> None:
    """One restart counted on /metrics, and clients served again."""

    def counted() -> bool:
        return relay.metrics().get("splicerelay_worker_restarts_total") == 1

    await trio.to_thread.run_sync(poll_until, counted, 10, "the restart to be counted")
    for index in range(20):
        stream = await connect(listen_port)
        await exchange(stream, b"after the restart %d" % index)
        await stream.aclose()


async def test_a_killed_worker_is_replaced_and_service_goes_on(relay_factory, workers):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server_echo(nursery)
        listen_port = free_port()
        relay = await relay_factory.astart(workers_config(listen_port, upstream_port))
        before = await trio.to_thread.run_sync(workers.of, relay, 2)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        await wait_replaced(relay, workers, victim)
        await check_one_restart_and_service(relay, listen_port)
        assert relay.process.poll() is None
        log = relay.stderr()
        assert "worker exited; restarting it" in log
        assert "killed by SIGKILL" in log

        def readyz_ok() -> bool:
            return relay.metrics().get("splicerelay_workers") == 2

        await trio.to_thread.run_sync(poll_until, readyz_ok, 10, "two workers running")
        nursery.cancel_scope.cancel()


async def test_a_hung_worker_is_killed_and_replaced(relay_factory, workers):
    """A worker whose event loop stops (here: SIGSTOP) stops sending WATCHDOG=1 to the
    supervisor, which kills it after the watchdog time and starts another."""
    watchdog = 1.5
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server_echo(nursery)
        listen_port = free_port()
        relay = await relay_factory.astart(
            workers_config(listen_port, upstream_port),
            env={WORKER_WATCHDOG_ENV: str(watchdog)},
        )
        before = await trio.to_thread.run_sync(workers.of, relay, 2)
        # Longer than the watchdog time with both running: pings keep them alive.
        await trio.sleep(watchdog * 2)
        assert set(child_pids(relay.pid)) == set(before)
        victim = before[0]
        stopped_at = trio.current_time()
        os.kill(victim, signal.SIGSTOP)
        await wait_replaced(relay, workers, victim)
        assert trio.current_time() - stopped_at >= watchdog * 0.9
        assert not is_running(victim)
        log = relay.stderr()
        assert "worker stopped answering; killing it" in log
        assert "killed by SIGKILL" in log
        await check_one_restart_and_service(relay, listen_port)
        nursery.cancel_scope.cancel()


def test_the_worker_watchdog_setting():
    assert worker_watchdog_seconds({}) == WORKER_WATCHDOG_SECONDS
    assert worker_watchdog_seconds({WORKER_WATCHDOG_ENV: "2.5"}) == 2.5
    assert worker_watchdog_seconds({WORKER_WATCHDOG_ENV: "0"}) == 0  # off
    for bad in ("soon", "-1", "nan", ""):
        assert worker_watchdog_seconds({WORKER_WATCHDOG_ENV: bad}) == WORKER_WATCHDOG_SECONDS


async def test_merged_bytes_equal_the_bytes_moved_even_after_a_worker_dies(relay_factory, workers):
    connections = 24
    sizes = [1000 + 7919 * index for index in range(connections)]
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server_echo(nursery)
        listen_port = free_port()
        relay = await relay_factory.astart(workers_config(listen_port, upstream_port))
        pids = await trio.to_thread.run_sync(workers.of, relay, 2)

        async def one(size: int) -> None:
            stream = await connect(listen_port)
            await exchange(stream, bytes([size % 251]) * size)
            await stream.send_eof()
            assert await stream.receive_some(10) == b""
            await stream.aclose()

        async with trio.open_nursery() as clients:
            for size in sizes:
                clients.start_soon(one, size)
        total = sum(sizes)

        def moved(metrics_total: float = total, finished: int = connections) -> bool:
            metrics = relay.metrics()
            return (
                metrics.get("splicerelay_bytes_total", direction="client_to_upstream")
                == metrics_total
                and metrics.get("splicerelay_bytes_total", direction="upstream_to_client")
                == metrics_total
                and metrics.get("splicerelay_connections_total", outcome="completed") == finished
            )

        await trio.to_thread.run_sync(poll_until, moved, 10, "the bytes moved in /metrics")
        metrics = relay.metrics()
        assert metrics.get("splicerelay_bytes_total", path="copy") == 0
        assert metrics.get("splicerelay_connection_duration_seconds_count") == connections

        # A worker that dies takes its counters along; the supervisor keeps them.
        os.kill(pids[0], signal.SIGKILL)
        os.kill(pids[1], signal.SIGKILL)

        def both_replaced() -> bool:
            now = child_pids(relay.pid)
            workers.seen.update(now)
            return len(now) == 2 and not set(now) & set(pids)

        await trio.to_thread.run_sync(poll_until, both_replaced, 15, "two new workers")
        await one(500)
        await trio.to_thread.run_sync(
            poll_until, lambda: moved(total + 500, connections + 1), 10, "totals"
        )
        metrics = relay.metrics()
        assert metrics.get("splicerelay_worker_restarts_total") == 2
        assert metrics.get("splicerelay_connections_active") == 0
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool (Debian package prometheus) is not installed"
)
async def test_promtool_finds_nothing_to_fix_in_the_merged_metrics(relay_factory, workers):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server_echo(nursery)
        listen_port = free_port()
        dead_port = free_port()
        relay = await relay_factory.astart(workers_config(listen_port, dead_port, upstream_port))
        await trio.to_thread.run_sync(workers.of, relay, 2)
        for index in range(6):
            stream = await connect(listen_port)
            await exchange(stream, b"lint %d" % index)
            await stream.aclose()
        nursery.cancel_scope.cancel()
    text = relay.scrape_text()
    assert "splicerelay_upstream_connect_duration_seconds_bucket" in text
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


# ----- reload, drain, start-up ----------------------------------------------------


async def test_sighup_reaches_every_worker_and_a_bad_config_keeps_the_old(
    relay_factory, workers, tmp_path: Path
):
    async with trio.open_nursery() as nursery:
        old_port = await start_payload_server(nursery, 5, 1000, b"old")
        new_port = await start_payload_server(nursery, 5, 1000, b"new")
        listen_port = free_port()
        relay = await relay_factory.astart(workers_config(listen_port, old_port))
        await trio.to_thread.run_sync(workers.of, relay, 2)
        template = relay.config_path.read_text()
        relay.config_path.write_text(
            template.replace(f"127.0.0.1:{old_port}", f"127.0.0.1:{new_port}")
        )
        relay.process.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            return relay.metrics().get("splicerelay_config_reloads_total", result="success") == 1

        await trio.to_thread.run_sync(poll_until, reloaded, 15, "the reload")
        log = relay.stderr()
        for slot in (0, 1):
            assert any(
                '"message": "config reloaded"' in line and f'"worker": {slot}' in line
                for line in log.splitlines()
            ), f"worker {slot} did not reload"
        tags = await held_downloads(listen_port, 20)
        assert tags == [b"new"] * 20

        # A broken file: refused by the supervisor, counted once, the workers untouched.
        relay.config_path.write_text("routes: [ this is not yaml\n")
        relay.process.send_signal(signal.SIGHUP)

        def failed(count: int) -> bool:
            return (
                relay.metrics().get("splicerelay_config_reloads_total", result="failure") == count
            )

        await trio.to_thread.run_sync(poll_until, lambda: failed(1), 15, "the failed reload")
        assert "reload failed: invalid config" in relay.stderr()
        # A new unix socket listener cannot be shared by the workers: refused too.
        unix_path = tmp_path / "added.sock"
        relay.config_path.write_text(
            template.replace(f"127.0.0.1:{old_port}", f"127.0.0.1:{new_port}")
            + f"  - name: added\n    listen: unix:{unix_path}\n"
            f"    upstreams:\n      - address: 127.0.0.1:{new_port}\n"
        )
        relay.process.send_signal(signal.SIGHUP)
        await trio.to_thread.run_sync(poll_until, lambda: failed(2), 15, "the refused reload")
        assert "needs a restart when workers > 1" in relay.stderr()
        assert not unix_path.exists()
        assert await held_downloads(listen_port, 10) == [b"new"] * 10
        metrics = relay.metrics()
        assert metrics.get("splicerelay_config_reloads_total", result="success") == 1
        assert metrics.get("splicerelay_worker_restarts_total") == 0
        nursery.cancel_scope.cancel()


async def test_a_reload_every_worker_refused_is_not_what_a_restarted_worker_runs(
    relay_factory, workers
):
    """The supervisor checks a config before the workers load it, but a worker can still
    refuse one (here: an upstream name that does not resolve). When all of them refused
    it, they all run the old config, and so must a worker that is restarted later."""
    async with trio.open_nursery() as nursery:
        old_port = await start_payload_server(nursery, 5, 1000, b"old")
        listen_port = free_port()
        relay = await relay_factory.astart(workers_config(listen_port, old_port))
        before = await trio.to_thread.run_sync(workers.of, relay, 2)
        template = relay.config_path.read_text()
        relay.config_path.write_text(
            template.replace(f"127.0.0.1:{old_port}", "no-such-host.invalid:9")
        )
        relay.process.send_signal(signal.SIGHUP)

        def failed() -> bool:
            return relay.metrics().get("splicerelay_config_reloads_total", result="failure") == 1

        await trio.to_thread.run_sync(poll_until, failed, 30, "the refused reload")
        assert "reload failed in every worker; the running config stays" in relay.stderr()
        assert await held_downloads(listen_port, 10) == [b"old"] * 10
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        await wait_replaced(relay, workers, victim)

        def both_ready() -> bool:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{relay.metrics_port}/readyz", timeout=5
                ) as reply:
                    ready = reply.status == 200
            except urllib.error.HTTPError:
                return False  # 503 while a worker is not ready
            return ready and relay.metrics().get("splicerelay_workers") == 2

        await trio.to_thread.run_sync(poll_until, both_ready, 15, "the new worker to be ready")
        assert await held_downloads(listen_port, 20) == [b"old"] * 20
        metrics = relay.metrics()
        assert metrics.get("splicerelay_worker_restarts_total") == 1
        assert metrics.get("splicerelay_config_reloads_total", result="success") == 0
        assert "worker failed" not in relay.stderr()
        nursery.cancel_scope.cancel()


async def test_reload_adds_and_removes_tcp_listeners_in_every_worker(relay_factory, workers):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server_echo(nursery)
        first_port, second_port = free_port(), free_port()
        config = workers_config(first_port, upstream_port)
        relay = await relay_factory.astart(config)
        pids = await trio.to_thread.run_sync(workers.of, relay, 2)
        added = config.replace(f"127.0.0.1:{first_port}", f"127.0.0.1:{second_port}")
        relay.config_path.write_text(added.replace("{metrics_port}", str(relay.metrics_port)))
        relay.process.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            return relay.metrics().get("splicerelay_config_reloads_total", result="success") == 1

        await trio.to_thread.run_sync(poll_until, reloaded, 15, "the reload")
        # The removed route's port: closed in the supervisor and in every worker.
        await trio.to_thread.run_sync(
            poll_until, lambda: not can_connect(first_port), 10, "the old port to refuse"
        )
        # The added one: each worker bound it with SO_REUSEPORT, and each serves on it.
        listening = [port for port in proc_net_tcp_listeners() if port == second_port]
        assert len(listening) == 2, f"listening sockets on the new port: {len(listening)}"
        streams = []
        for index in range(20):
            stream = await connect(second_port)
            await exchange(stream, b"moved %d" % index)
            streams.append(stream)
        for stream in streams:
            await stream.aclose()
        assert sorted(child_pids(relay.pid)) == sorted(pids)
        nursery.cancel_scope.cancel()


def proc_net_tcp_listeners() -> list[int]:
    """The local port of every IPv4 TCP socket in LISTEN state, one entry per socket."""
    ports = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def held_downloads(port: int, count: int) -> list[bytes]:
    """`count` downloads at once (so that both workers take some); their tags."""
    tags: list[bytes] = []

    async def one() -> None:
        tag, transfer = await download(port, 3)
        assert transfer == expected_transfer(5, 1000)
        tags.append(tag)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return tags


async def test_watch_reload_reaches_the_workers(relay_factory, workers):
    async with trio.open_nursery() as nursery:
        old_port = await start_payload_server(nursery, 5, 1000, b"old")
        new_port = await start_payload_server(nursery, 5, 1000, b"new")
        listen_port = free_port()
        relay = await relay_factory.astart(
            workers_config(listen_port, old_port), extra_args=["--watch"]
        )
        await trio.to_thread.run_sync(workers.of, relay, 2)
        replacement = relay.config_path.with_suffix(".next")
        replacement.write_text(
            relay.config_path.read_text().replace(f"127.0.0.1:{old_port}", f"127.0.0.1:{new_port}")
        )
        replacement.rename(relay.config_path)

        def reloaded() -> bool:
            return relay.metrics().get("splicerelay_config_reloads_total", result="success") == 1

        await trio.to_thread.run_sync(poll_until, reloaded, 15, "the watch to reload")
        assert await held_downloads(listen_port, 10) == [b"new"] * 10
        nursery.cancel_scope.cancel()


async def test_sigterm_drains_every_worker_then_all_exit(relay_factory, workers):
    size = 16 * MiB
    transfers = 4
    async with trio.open_nursery() as nursery:
        upstream_port = await start_payload_server(nursery, 91, size, b"go!")
        listen_port = free_port()
        relay = await relay_factory.astart(workers_config(listen_port, upstream_port))
        pids = await trio.to_thread.run_sync(workers.of, relay, 2)

        def workers_still_draining() -> None:
            assert any(is_running(pid) for pid in pids), "workers must drain, not die"

        results = await sigterm_during_downloads(
            relay, listen_port, transfers, while_draining=workers_still_draining
        )
        code = await trio.to_thread.run_sync(lambda: relay.process.wait(timeout=30))
        nursery.cancel_scope.cancel()
    assert code == 0
    assert not any(is_running(pid) for pid in pids)
    assert len(results) == transfers
    for tag, transfer in results:
        assert tag == b"go!"
        assert transfer == expected_transfer(91, size)
    assert "Traceback" not in relay.stderr()


async def test_workers_auto_runs_one_per_usable_core(relay_factory, workers, tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server_echo(nursery)
        listen_port = free_port()
        config = workers_config(listen_port, upstream_port, workers="auto")
        relay = await relay_factory.astart(config)
        # One usable core means one process, the plain single-process relay.
        expected = CORES if CORES > 1 else 0
        await trio.to_thread.run_sync(workers.of, relay, expected)
        stream = await connect(listen_port)
        await exchange(stream, b"auto")
        await stream.aclose()
        nursery.cancel_scope.cancel()
    checked = subprocess.run(
        [sys.executable, "-m", "splicerelay", "check", "-c", str(relay.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    assert "\nworkers: auto\n" in checked.stdout


async def test_sockets_from_socket_activation_are_handed_to_the_workers(relay_factory, workers):
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server_echo(nursery)
        listen_port = free_port()
        config = workers_config(listen_port, upstream_port).replace("name: test", "name: web")
        # The supervisor would fail with "address in use" if it bound the port itself.
        first: list[socket.socket] = []
        relay = await relay_factory.astart(
            config,
            prefix=[activate, "-l", f"127.0.0.1:{listen_port}", "--fdname=web"],
            after_launch=lambda: first.append(connect_when_listening(listen_port)),
        )
        await trio.to_thread.run_sync(workers.of, relay, 2)
        streams = [trio.SocketStream(trio.socket.from_stdlib_socket(first[0]))]
        for index in range(10):
            streams.append(await connect(listen_port))
            for stream in streams:
                await exchange(stream, b"activated %d" % index)
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()

    def counted() -> bool:
        metrics = relay.metrics()
        return metrics.get("splicerelay_connections_total", route="web", outcome="completed") == 11

    await trio.to_thread.run_sync(poll_until, counted, 10, "11 connections counted")


@pytest.mark.parametrize("holder_reuses_port", [False, True])
def test_port_in_use_exits_1_with_a_clear_message(tmp_path: Path, holder_reuses_port: bool):
    with socket.socket() as holder:
        if holder_reuses_port:
            # Even a holder that set SO_REUSEPORT too must not be joined silently.
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        config = tmp_path / "relay.yaml"
        config.write_text(
            workers_config(port, free_port()).replace("{metrics_port}", str(free_port()))
        )
        result = subprocess.run(
            [sys.executable, "-m", "splicerelay", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"route test: cannot listen on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "starting workers" not in result.stderr


def test_a_worker_that_cannot_start_stops_the_relay_with_exit_1(tmp_path: Path):
    config = tmp_path / "relay.yaml"
    config.write_text(
        workers_config(free_port(), 80)
        .replace("127.0.0.1:80", "no-such-host.invalid:80")
        .replace("{metrics_port}", str(free_port()))
    )
    with subprocess.Popen(
        [sys.executable, "-m", "splicerelay", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
    assert process.returncode == 1
    assert "worker failed to start; stopping" in stderr
    assert "no-such-host.invalid" in stderr
    assert "Traceback" not in stderr


def test_sd_notify_speaks_for_all_workers(relay_factory, workers, tmp_path: Path):
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        listen_port = free_port()
        relay = relay_factory.start(
            workers_config(listen_port, free_port()),
            env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
        )
        ready = notify.next_with("READY")
        assert ready["STATUS"] == "0 connections in 2 workers"
        assert can_connect(listen_port)
        assert len(workers.of(relay, 2)) == 2
        assert notify.next_with("WATCHDOG", timeout=2)["WATCHDOG"] == "1"
        relay.process.send_signal(signal.SIGHUP)
        reloading = notify.next_with("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert notify.next_with("READY")["READY"] == "1"
        assert relay.metrics().get("splicerelay_config_reloads_total", result="success") == 1
        relay.process.send_signal(signal.SIGTERM)
        assert notify.next_with("STOPPING")["STOPPING"] == "1"
        assert relay.process.wait(timeout=15) == 0
        # Only the supervisor spoke to the service manager: one READY=1 per state change.
        readies = [message for message in notify.messages if message.get("READY") == "1"]
        assert len(readies) == 2
    finally:
        notify.close()


# ----- pure parts: the metrics merge and the worker contract ------------------------

WORKER_A = """\
# HELP splicerelay_bytes_total Bytes relayed.
# TYPE splicerelay_bytes_total counter
splicerelay_bytes_total{route="web",direction="client_to_upstream"} 100.0
splicerelay_bytes_total{route="web",direction="upstream_to_client"} 7.0
# HELP splicerelay_connections_active Open now.
# TYPE splicerelay_connections_active gauge
splicerelay_connections_active{route="web"} 3.0
# HELP splicerelay_upstream_up Up.
# TYPE splicerelay_upstream_up gauge
splicerelay_upstream_up{route="web",upstream="a:1"} 1.0
splicerelay_upstream_up{route="web",upstream="b:1"} 0.0
# HELP splicerelay_build_info Version.
# TYPE splicerelay_build_info gauge
splicerelay_build_info{version="1.0"} 1.0
# HELP splicerelay_connection_duration_seconds Durations.
# TYPE splicerelay_connection_duration_seconds histogram
splicerelay_connection_duration_seconds_bucket{route="web",le="0.5"} 1.0
splicerelay_connection_duration_seconds_bucket{route="web",le="+Inf"} 2.0
splicerelay_connection_duration_seconds_count{route="web"} 2.0
splicerelay_connection_duration_seconds_sum{route="web"} 3.25
"""

WORKER_B = """\
# HELP splicerelay_bytes_total Bytes relayed.
# TYPE splicerelay_bytes_total counter
splicerelay_bytes_total{direction="client_to_upstream",route="web"} 50.0
splicerelay_bytes_total{route="api",direction="client_to_upstream"} 9.0
# HELP splicerelay_connections_active Open now.
# TYPE splicerelay_connections_active gauge
splicerelay_connections_active{route="web"} 4.0
# HELP splicerelay_upstream_up Up.
# TYPE splicerelay_upstream_up gauge
splicerelay_upstream_up{route="web",upstream="a:1"} 1.0
splicerelay_upstream_up{route="web",upstream="b:1"} 1.0
# HELP splicerelay_build_info Version.
# TYPE splicerelay_build_info gauge
splicerelay_build_info{version="1.0"} 1.0
# HELP splicerelay_connection_duration_seconds Durations.
# TYPE splicerelay_connection_duration_seconds histogram
splicerelay_connection_duration_seconds_bucket{route="web",le="0.5"} 4.0
splicerelay_connection_duration_seconds_bucket{route="web",le="+Inf"} 5.0
splicerelay_connection_duration_seconds_count{route="web"} 5.0
splicerelay_connection_duration_seconds_sum{route="web"} 1.0
"""


def value(exposition, family: str, sample: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    return float(exposition[family].samples[(sample, tuple(sorted(labels.items())))])


def test_merge_sums_amounts_and_takes_the_max_of_facts():
    merged = merge([parse_exposition(WORKER_A), parse_exposition(WORKER_B)])
    bytes_total = ("splicerelay_bytes", "splicerelay_bytes_total")
    c2u = {"direction": "client_to_upstream"}
    assert value(merged, *bytes_total, route="web", **c2u) == 150
    assert value(merged, *bytes_total, route="api", **c2u) == 9
    assert value(merged, *bytes_total, route="web", direction="upstream_to_client") == 7
    active = "splicerelay_connections_active"
    assert value(merged, active, active, route="web") == 7
    up = "splicerelay_upstream_up"
    assert value(merged, up, up, route="web", upstream="a:1") == 1
    assert value(merged, up, up, route="web", upstream="b:1") == 1
    build = "splicerelay_build_info"
    assert value(merged, build, build, version="1.0") == 1
    duration = "splicerelay_connection_duration_seconds"
    assert value(merged, duration, duration + "_bucket", route="web", le="0.5") == 5
    assert value(merged, duration, duration + "_bucket", route="web", le="+Inf") == 7
    assert value(merged, duration, duration + "_count", route="web") == 7
    assert value(merged, duration, duration + "_sum", route="web") == 4.25
    # Buckets stay in order, so the rendered histogram is well-formed.
    buckets = [key for key in merged[duration].samples if key[0].endswith("_bucket")]
    assert [dict(labels)["le"] for _, labels in buckets] == ["0.5", "+Inf"]


def test_merge_leaves_its_inputs_alone_and_keeps_the_first_type():
    a = parse_exposition(WORKER_A)
    b = parse_exposition(WORKER_B)
    conflicting = parse_exposition(
        "# TYPE splicerelay_connections_active counter\n"
        'splicerelay_connections_active_total{route="web"} 100.0\n'
    )
    merge([a, b])
    assert a == parse_exposition(WORKER_A)
    merged = merge([a, conflicting])
    active = "splicerelay_connections_active"
    assert merged[active].type == "gauge"
    assert value(merged, active, active, route="web") == 3
    assert merge([]) == {}


def test_a_dead_workers_counters_are_kept_and_its_gauges_dropped():
    retired = cumulative_part(parse_exposition(WORKER_A))
    assert set(retired) == {"splicerelay_bytes", "splicerelay_connection_duration_seconds"}
    # The dead worker's last scrape plus a live worker: totals include both.
    merged = merge([parse_exposition(WORKER_B), retired])
    key = ("splicerelay_bytes", "splicerelay_bytes_total")
    assert value(merged, *key, route="web", direction="client_to_upstream") == 150
    active = "splicerelay_connections_active"
    assert value(merged, active, active, route="web") == 4
    # Folding a second dead worker into the tally adds up as well.
    tally = merge([retired, cumulative_part(parse_exposition(WORKER_B))])
    assert value(tally, *key, route="web", direction="client_to_upstream") == 150
    assert "splicerelay_upstream_up" not in tally
    assert "splicerelay_bytes" not in without(tally, ["splicerelay_bytes"])


def test_merged_families_render_back_to_the_same_samples():
    merged = merge([parse_exposition(WORKER_A), parse_exposition(WORKER_B)])

    class Fixed(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return to_metrics(merged)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    assert "# TYPE splicerelay_bytes_total counter" in text
    assert "# TYPE splicerelay_connection_duration_seconds histogram" in text
    assert parse_exposition(text) == merged


@pytest.mark.parametrize(
    ("status", "count"),
    [("0 connections", 0), ("1 connection", 1), ("25 connections", 25), ("reloading", None)],
)
def test_connections_in_a_worker_status(status: str, count: int | None):
    assert connections_in_status(status) == count


def test_supervisor_wording_and_backoff():
    assert status_line(1, 2) == "1 connection in 2 workers"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"
    delays = [restart_delay(failures) for failures in range(12)]
    assert delays[0] > 0 and delays == sorted(delays) and delays[-1] == 5.0


def test_worker_setup_round_trips_and_rejects_junk():
    setup = WorkerSetup(
        slot=1,
        supervisor_pid=42,
        metrics_path="/run/x/worker-3.sock",
        control_path="/run/x/control-3.sock",
        sockets=(InheritedSocket(7, "web", False), InheritedSocket(9, "from:systemd", True)),
        config_fd=5,
    )
    assert decode(encode(setup)) == setup
    for junk in ("", "{}", "[1]", '{"slot": "x"}'):
        with pytest.raises(ValueError):
            decode(junk)


@pytest.mark.parametrize("workers_value", ["auto", "2", "1"])
def test_check_renders_workers_so_that_they_read_back(workers_value: str):
    text = (
        f"workers: {workers_value}\nroutes:\n  - name: a\n    listen: 127.0.0.1:1\n"
        "    upstreams:\n      - address: 127.0.0.1:2\n"
    )
    config = parse_config(text, "relay.yaml")
    rendered = render_config(config)
    assert f"\nworkers: {workers_value}\n" in rendered
    assert parse_config(rendered, "relay.yaml") == config
