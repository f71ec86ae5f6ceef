"""Resource exhaustion, through the real relay: out of fds, many idle connections, and
pipes past the unprivileged pipe-page limit. All traffic stays on loopback, and every
wait is bounded in time."""

from __future__ import annotations

import enum
import os
import resource
import shutil
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.support.harness import Relay, free_port, poll_until, relay_config
from tests.support.peers import (
    Transfer,
    connect,
    echo,
    expected_transfer,
    receive_all,
    round_trip,
    send_payload,
    start_server,
)

MiB = 1 << 20
KiB = 1 << 10

DROP_TO_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


class PacedStream(trio.abc.SendStream):
    """Sends through `stream` at most `chunk` bytes per `interval`, to stretch a transfer
    over a window of time in which something else happens to the relay."""

    def __init__(self, stream: trio.SocketStream, chunk: int, interval: float) -> None:
        self.stream = stream
        self.chunk = chunk
        self.interval = interval

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), self.chunk):
            await self.stream.send_all(view[start : start + self.chunk])
            await trio.sleep(self.interval)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def echo_transfer(
    port: int, seed: int, size: int, pace: tuple[int, float] | None = None
) -> bool:
    """Send `size` bytes through an echo upstream and check the sha256 of what comes back.

    `pace` is (bytes, seconds): send at most that many bytes per that many seconds.
    """
    stream = await connect(port)
    sent: dict[str, Transfer] = {}
    received: dict[str, Transfer] = {}

    async def send() -> None:
        sender = stream if pace is None else PacedStream(stream, *pace)
        sent["sent"] = await send_payload(sender, seed, size)
        await stream.send_eof()

    async def receive() -> None:
        received["received"] = await receive_all(stream)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    finally:
        await stream.aclose()
    expected = expected_transfer(seed, size)
    return sent["sent"] == expected and received["received"] == expected


def count_lines(relay: Relay, text: str) -> int:
    return sum(1 for line in relay.stderr().splitlines() if text in line)


class Fate(enum.Enum):
    """What one storm client saw."""

    SERVED = "served"  # its bytes came back in full, in time
    GAVE_UP = "gave up"  # nothing came back before it gave up; it closed with a FIN
    RESET = "reset"  # the connection was reset (or refused)
    CUT = "cut"  # EOF, or only part of the echo, before it gave up


@dataclass
class FdStorm:
    relay: Relay
    transfers_intact: list[bool]
    fates: Counter[Fate]
    recovered: bool

    def backoff_warnings(self) -> int:
        """Warnings that accepting paused: before the fd limit (the relay keeps a reserve
        for its sessions' upstream sockets and pipes), or at it (EMFILE backoff)."""
        return count_lines(self.relay, "pausing accepts") + count_lines(
            self.relay, "accept failed, backing off"
        )

    def summary(self) -> str:
        fates = {fate.value: count for fate, count in self.fates.items()}
        return (
            f"client fates {fates}, {self.backoff_warnings()} backoff warnings, "
            f"{count_lines(self.relay, 'Traceback')} log lines with a traceback, "
            f"transfers intact {self.transfers_intact}"
        )


FD_STORM_CLIENTS = 400
FD_STORM_TRANSFERS = 5


async def run_fd_storm(relay_factory) -> FdStorm:  # type: ignore[no-untyped-def]
    """RLIMIT_NOFILE 256 for the relay, 400 clients at once, 5 transfers in flight.

    Each storm client connects, sends 64 bytes, waits for their echo until the hold
    ends (3 s), keeps its connection open until then, and closes it with a FIN. Clients the
    relay cannot take while it is out of fds sit in the kernel backlog and give up when
    the hold ends. The transfers (4 MiB each way through the echo upstream) are paced
    so that they start before the storm and end after it.
    """
    transfer_size = 4 * MiB
    ping = bytes(range(64))
    hold_seconds = 3.0
    fates: Counter[Fate] = Counter()
    intact: list[bool] = []

    async def storm_client(release_at: float) -> None:
        received = b""
        stream: trio.SocketStream | None = None
        fate = Fate.GAVE_UP  # unless something came back, or the relay ended it
        try:
            with trio.move_on_at(release_at):
                stream = await connect(listen_port)
                await stream.send_all(ping)
                while len(received) < len(ping):
                    data = await stream.receive_some(len(ping) - len(received))
                    if not data:
                        fate = Fate.CUT  # EOF before the whole echo
                        break
                    received += data
            if received == ping:
                fate = Fate.SERVED
            elif received:
                fate = Fate.CUT
            # Served or not, hold the connection until the storm ends.
            await trio.sleep_until(release_at)
        except (OSError, trio.BrokenResourceError):
            fate = Fate.RESET
        finally:
            if stream is not None:
                await stream.aclose()
        fates[fate] += 1

    async def transfer(seed: int) -> None:
        # 4 MiB at 32 KiB per 50 ms: over 6 s, spanning the whole storm.
        intact.append(await echo_transfer(listen_port, seed, transfer_size, (32 * KiB, 0.05)))

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(listen_port, upstream_port),
            prefix=["prlimit", "--nofile=256:256"],
        )
        with trio.fail_after(60):
            async with trio.open_nursery() as work:
                for seed in range(FD_STORM_TRANSFERS):
                    work.start_soon(transfer, 100 + seed)
                await trio.sleep(0.3)
                release_at = trio.current_time() + hold_seconds
                async with trio.open_nursery() as storm:
                    for _ in range(FD_STORM_CLIENTS):
                        storm.start_soon(storm_client, release_at)
            # Service resumes once the storm's clients are gone.
            with trio.fail_after(10):
                recovered = await round_trip(listen_port, b"after the storm") == b"after the storm"
        nursery.cancel_scope.cancel()
    return FdStorm(relay, intact, fates, recovered)


async def test_out_of_fds_keeps_transfers_backs_off_quietly_and_recovers(relay_factory):
    """Asserted: all 5 in-flight transfers arrive intact (sha256); the relay did run out
    of fds ("accept failed, backing off" logged at least once) but logged it at most 5
    times; some storm clients were served; a fresh connection afterwards round-trips."""
    storm = await run_fd_storm(relay_factory)
    print(storm.summary())
    assert storm.transfers_intact == [True] * FD_STORM_TRANSFERS, storm.summary()
    assert storm.recovered, storm.summary()
    assert sum(storm.fates.values()) == FD_STORM_CLIENTS, storm.summary()
    assert storm.fates[Fate.SERVED] > 0, storm.summary()
    assert 1 <= storm.backoff_warnings() <= 5, storm.summary()


async def test_out_of_fds_every_client_is_served_or_waits_in_the_backlog(relay_factory):
    """Asserted: every one of the 400 storm clients is either SERVED (its whole echo came
    back) or GAVE_UP (nothing came back while it waited in the kernel backlog, and it
    closed cleanly itself): none was reset or cut short by the relay; and the relay's
    stderr holds no traceback."""
    storm = await run_fd_storm(relay_factory)
    print(storm.summary())
    assert storm.fates[Fate.SERVED] + storm.fates[Fate.GAVE_UP] == FD_STORM_CLIENTS, storm.summary()
    assert "Traceback" not in storm.relay.stderr(), storm.summary()


def raise_own_fd_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to `needed` (within the hard limit) or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} fds in the test process; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


IDLE_CONNECTIONS = 5000
MAX_FDS_PER_CONNECTION = 2.2
MAX_RSS_PER_CONNECTION = 4 * KiB


async def open_idle_connections(port: int, count: int, batch: int = 250) -> list[trio.SocketStream]:
    """`count` connections, each after one echoed round trip; opened `batch` at a time."""
    streams: list[trio.SocketStream] = []

    async def one(index: int) -> None:
        stream = await connect(port)
        streams.append(stream)
        message = index.to_bytes(4, "big") * 4
        await stream.send_all(message)
        received = b""
        while len(received) < len(message):
            data = await stream.receive_some(len(message) - len(received))
            assert data, f"connection {index} closed before its echo"
            received += data
        assert received == message

    try:
        for start in range(0, count, batch):
            async with trio.open_nursery() as nursery:
                for index in range(start, min(start + batch, count)):
                    nursery.start_soon(one, index)
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    return streams


async def measure_idle_connections(relay_factory) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(fds, RSS bytes) the relay holds per idle connection, over its startup baseline."""
    raise_own_fd_limit(2 * IDLE_CONNECTIONS + 2000)
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        baseline_rss = relay.rss()
        with trio.fail_after(120):
            streams = await open_idle_connections(listen_port, IDLE_CONNECTIONS)
        try:

            def all_active() -> bool:
                active = relay.metrics().get("splicerelay_connections_active")
                return active == IDLE_CONNECTIONS

            await trio.to_thread.run_sync(poll_until, all_active, 30, "every connection")
            fds = relay.fds() - relay.baseline_fds
            rss = relay.rss() - baseline_rss
        finally:
            with trio.fail_after(60):
                for stream in streams:
                    await stream.aclose()
        nursery.cancel_scope.cancel()
    return fds / IDLE_CONNECTIONS, rss / IDLE_CONNECTIONS


async def test_5000_idle_connections_hold_about_two_fds_each(relay_factory):
    """5,000 connections, each served (an echoed round trip) and then idle: the relay
    holds at most 2.2 fds per connection over its baseline (two sockets, no pipes)."""
    fds, rss = await measure_idle_connections(relay_factory)
    measured = f"per idle connection: {fds:.3f} fds, {rss / KiB:.2f} KiB RSS"
    print(measured)
    assert fds <= MAX_FDS_PER_CONNECTION, measured


async def test_5000_idle_connections_cost_at_most_4_kib_of_rss_each(relay_factory):
    """The same 5,000 idle connections: at most 4 KiB of relay RSS per connection over
    its RSS right after startup (an established connection has no task of its own)."""
    fds, rss = await measure_idle_connections(relay_factory)
    measured = f"per idle connection: {fds:.3f} fds, {rss / KiB:.2f} KiB RSS"
    print(measured)
    assert rss <= MAX_RSS_PER_CONNECTION, measured


def can_drop_to_nobody() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


async def read_exactly(stream: trio.SocketStream, count: int) -> bytes:
    """`count` bytes, never more (what follows stays for the next reader)."""
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return data


@pytest.mark.skipif(not can_drop_to_nobody(), reason="needs root and setpriv to drop to nobody")
async def test_unprivileged_past_pipe_user_pages_soft_stays_intact_and_spliced(relay_factory):
    """As nobody, 300 concurrent 2 MiB transfers each way with pipe_size 1MiB.

    fs.pipe-user-pages-soft (16384 pages, 64 MiB) covers only 64 pipes of 1 MiB; past
    it, F_SETPIPE_SZ fails with EPERM and new pipes keep the kernel's small size. The
    relay must keep going with them: everything arrives intact, the refusals are
    counted, and every byte is still spliced.

    A flow holds a pipe only while its destination is full, so the upstream does not
    read until every transfer has filled its pipe. The upstream listens on a unix
    socket: loopback TCP grows the relay's send buffer to tcp_wmem's 4 MiB, which would
    swallow a whole 2 MiB transfer, while a unix socket's send buffer stays at
    net.core.wmem_default (about 208 KiB).
    """
    transfers = 300
    size = 2 * MiB
    header = 4
    upstream_saw: dict[int, Transfer] = {}
    client_saw: dict[int, Transfer] = {}
    gate = trio.Event()
    upstream_done = trio.Event()
    connected = 0

    async def upstream(stream: trio.SocketStream) -> None:
        nonlocal connected
        seed = int.from_bytes(await read_exactly(stream, header), "big")
        connected += 1

        async def reply() -> None:
            await send_payload(stream, seed + 1, size)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reply)
            await gate.wait()
            upstream_saw[seed] = await receive_all(stream)
        if len(upstream_saw) == transfers:
            upstream_done.set()

    async def client(seed: int) -> None:
        async with await connect(listen_port) as stream:

            async def send() -> None:
                await stream.send_all(seed.to_bytes(header, "big"))
                await send_payload(stream, seed, size)
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await gate.wait()
                client_saw[seed] = await receive_all(stream)

    def pipes_in_use() -> int:
        return int(relay.metrics().get("splicerelay_pipes", state="in_use"))

    # World-searchable, so that nobody can read the config and reach the upstream.
    work_dir = Path(tempfile.mkdtemp(prefix="splicerelay-"))
    work_dir.chmod(0o755)
    upstream_path = work_dir / "upstream.sock"
    try:
        async with trio.open_nursery() as nursery:
            server = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await server.bind(str(upstream_path))
            upstream_path.chmod(0o777)
            server.listen(transfers)
            nursery.start_soon(trio.serve_listeners, upstream, [trio.SocketListener(server)])
            listen_port = free_port()
            config = relay_config(listen_port, extra="    pipe_size: 1MiB\n").replace(
                "    upstreams:\n", f"    upstreams:\n      - address: unix:{upstream_path}\n"
            )
            relay = await relay_factory.astart(config, prefix=DROP_TO_NOBODY, config_dir=work_dir)
            with trio.fail_after(120):
                async with trio.open_nursery() as clients:
                    for index in range(transfers):
                        clients.start_soon(client, 2 * index)
                    while connected < transfers:
                        await trio.sleep(0.05)
                    await trio.to_thread.run_sync(
                        poll_until,
                        lambda: pipes_in_use() >= transfers,
                        20,
                        "every transfer to hold a pipe",
                    )
                    held = pipes_in_use()
                    gate.set()
                # Every client has its reply; the uploads may still be landing.
                with trio.move_on_after(10):
                    await upstream_done.wait()
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(work_dir)

    seeds = [2 * index for index in range(transfers)]
    damaged = [
        seed
        for seed in seeds
        if upstream_saw.get(seed) != expected_transfer(seed, size)
        or client_saw.get(seed) != expected_transfer(seed + 1, size)
    ]
    assert not damaged, f"{len(damaged)} of {transfers} transfers damaged: seeds {damaged[:10]}"

    def counted() -> bool:
        completed = relay.metrics().get("splicerelay_connections_total", outcome="completed")
        return completed == transfers

    await trio.to_thread.run_sync(poll_until, counted, 10, "every transfer to be counted")
    metrics = relay.metrics()
    failures = metrics.get("splicerelay_pipe_resize_failures_total")
    summary = f"{held} pipes held at once, {int(failures)} pipe resize refusals"
    print(summary)
    assert failures > 0, summary
    each_way = transfers * size
    assert (
        metrics.get("splicerelay_bytes_total", direction="client_to_upstream", path="splice")
        == each_way + transfers * header
    )
    assert (
        metrics.get("splicerelay_bytes_total", direction="upstream_to_client", path="splice")
        == each_way
    )
    assert metrics.get("splicerelay_bytes_total", path="copy") == 0
