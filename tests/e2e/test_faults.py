"""Fault injection through the real relay, in the spirit of Envoy's tcp_proxy
integration tests, HAProxy's reg-tests and Toxiproxy's list of toxics.

Every test runs `splicerelay run -c` as a subprocess between peers in the test process
(one test puts its client in a network namespace of its own). Each one is bounded in
time with `trio.fail_after`, asserts the exact outcome the relay counted in /metrics, and
leaves the relay fixture to check afterwards that every fd the relay took for the test
was given back and that the relay exits 0 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import trio

from tests.support.harness import Relay, free_port, poll_until, refused_port, relay_config
from tests.support.peers import (
    Handler,
    Transfer,
    blackholed_listener,
    close_blackhole,
    connect,
    expected_transfer,
    receive_all,
    reset,
    send_payload,
    start_server,
)

MiB = 1 << 20
GiB = 1 << 30

OUTCOMES = "splicerelay_connections_total"


def outcomes(relay: Relay) -> dict[str, int]:
    """Every outcome the relay has counted so far, zero counts left out."""
    counted: dict[str, int] = {}
    for (name, labels), value in relay.metrics().samples.items():
        if name == OUTCOMES and value:
            outcome = dict(labels)["outcome"]
            counted[outcome] = counted.get(outcome, 0) + int(value)
    return counted


async def wait_for_outcomes(relay: Relay, expected: dict[str, int], timeout: float = 5) -> None:
    """Wait until the relay has counted exactly `expected`, and nothing else."""
    seen: dict[str, int] = {}

    def counted() -> bool:
        seen.clear()
        seen.update(outcomes(relay))
        return seen == expected

    try:
        await trio.to_thread.run_sync(poll_until, counted, timeout, f"outcomes {expected}")
    except AssertionError:
        raise AssertionError(f"expected outcomes {expected}, the relay counted {seen}") from None


TCP_CLOSE = 7  # include/net/tcp_states.h


async def first_end(stream: trio.SocketStream) -> str:
    """Read and discard until the stream ends; say how it ended: "eof" or "reset"."""
    try:
        while await stream.receive_some(1 << 16):
            pass
    except trio.BrokenResourceError:
        return "reset"
    # A reset socket reports its error to one call only. When this peer's own sending
    # task took it (and yielded before noticing), this read sees 0 as if a FIN had come.
    # The TCP state tells them apart: CLOSE after a reset, CLOSE_WAIT after a FIN.
    tcp_info = stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return "reset" if tcp_info[0] == TCP_CLOSE else "eof"


@dataclass
class EndSeen:
    """How a peer that was sending and reading saw its connection end."""

    signs: list[tuple[str, float]]  # ("eof" | "reset", time.monotonic()), in order

    @property
    def first(self) -> str:
        return self.signs[0][0]

    @property
    def first_at(self) -> float:
        return self.signs[0][1]


async def send_and_watch_end(stream: trio.SocketStream, chunk: bytes, limit: float) -> EndSeen:
    """Send `chunk` over and over while reading, until a reset or for `limit` seconds.

    Records each sign of the end in order: a clean EOF on the reading side, then (if
    one comes) the reset, which the sending side sees as a broken connection.
    """
    signs: list[tuple[str, float]] = []

    async def send() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while True:
                await stream.send_all(chunk)
        signs.append(("reset", time.monotonic()))
        watch.cancel_scope.cancel()

    async def receive() -> None:
        how = await first_end(stream)
        signs.append((how, time.monotonic()))
        if how == "reset":
            watch.cancel_scope.cancel()
        # After a clean EOF, the sender finds out whether a reset follows it.

    with trio.move_on_after(limit):
        async with trio.open_nursery() as watch:
            watch.start_soon(send)
            watch.start_soon(receive)
    await stream.aclose()
    assert signs, f"no sign of the end within {limit}s"
    return EndSeen(signs)


# ----- 1. integrity -----------------------------------------------------------------

STREAMS = 200
HALF_CLOSE_MODES = ("client_first", "upstream_first", "together")


@dataclass(frozen=True)
class StreamPlan:
    """What one stream of the integrity test does, drawn from the test's seed."""

    index: int
    up_size: int  # client -> upstream
    down_size: int  # upstream -> client
    mode: str  # who shuts its write side first: see HALF_CLOSE_MODES
    seed: int  # for the chunking and the slices of each side


def draw_size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.1:
        return 0
    if roll < 0.2:
        return 1
    if roll < 0.3:
        return rng.choice([2, 4095, 4096, 4097, 65535, 65536, 65537, 2 * MiB - 1, 2 * MiB])
    if roll < 0.6:
        return rng.randint(0, 2 * MiB)
    return int(2 ** rng.uniform(1, 21))  # log-uniform, 2 B .. 2 MiB


def draw_chunk(rng: random.Random) -> int:
    """A write (or read) size from 1 B to 64 KiB, log-uniform so small ones are common."""
    return int(2 ** rng.uniform(0, 16))


def make_plans(seed: int) -> list[StreamPlan]:
    rng = random.Random(seed)
    return [
        StreamPlan(
            index=index,
            up_size=draw_size(rng),
            down_size=draw_size(rng),
            mode=rng.choice(HALF_CLOSE_MODES),
            seed=rng.getrandbits(64),
        )
        for index in range(STREAMS)
    ]


async def send_chunked(
    stream: trio.SocketStream, rng: random.Random, block: bytes, total: int
) -> Transfer:
    """Send `total` bytes, sliced from `block` at random, in writes of random size."""
    digest = hashlib.sha256()
    view = memoryview(block)
    left = total
    while left:
        size = min(left, draw_chunk(rng))
        start = rng.randrange(0, len(block) - size + 1)
        piece = view[start : start + size]
        digest.update(piece)
        await stream.send_all(piece)
        left -= size
    return Transfer(total, digest.hexdigest())


async def receive_chunked(stream: trio.SocketStream, rng: random.Random) -> Transfer:
    """Read to EOF in reads of random size; the count and sha256 of what arrived."""
    digest = hashlib.sha256()
    count = 0
    while data := await stream.receive_some(draw_chunk(rng)):
        digest.update(data)
        count += len(data)
    return Transfer(count, digest.hexdigest())


class Barrier:
    """Both ends of a stream meet here, so that they shut their write sides at once."""

    def __init__(self, parties: int) -> None:
        self._left = parties
        self._all_here = trio.Event()

    async def wait(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._all_here.set()
        await self._all_here.wait()


async def run_end(
    stream: trio.SocketStream,
    plan: StreamPlan,
    block: bytes,
    *,
    is_client: bool,
    barrier: Barrier,
) -> tuple[Transfer, Transfer]:
    """One end of an integrity stream; returns (what it sent, what it received)."""
    role = 1 if is_client else 2
    send_rng = random.Random(plan.seed * 4 + role)
    receive_rng = random.Random(plan.seed * 4 + role + 2)
    size = plan.up_size if is_client else plan.down_size
    first = "client_first" if is_client else "upstream_first"
    result: dict[str, Transfer] = {}

    async def send() -> None:
        result["sent"] = await send_chunked(stream, send_rng, block, size)
        if plan.mode == "together":
            await barrier.wait()
        await stream.send_eof()

    async def receive() -> None:
        result["received"] = await receive_chunked(stream, receive_rng)

    if plan.mode == "together":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    elif plan.mode == first:
        await send()
        await receive()
    else:
        await receive()
        await send()
    await stream.aclose()
    return result["sent"], result["received"]


async def test_200_concurrent_streams_random_sizes_chunking_and_half_closes_arrive_intact(
    relay_factory,
):
    seed = int(os.environ.get("SPLICERELAY_FAULTS_SEED", random.randrange(1 << 32)))
    # Shown with the output of a failing test; SPLICERELAY_FAULTS_SEED replays it.
    print(f"integrity seed: {seed} (replay with SPLICERELAY_FAULTS_SEED={seed})")
    plans = make_plans(seed)
    block = random.Random(seed).randbytes(4 * MiB)
    accepted = [trio.Event() for _ in plans]
    upstream_count = 0
    barriers = [Barrier(2) for _ in plans]
    go = trio.Event()
    upstreams_done = trio.Event()
    client_saw: dict[int, tuple[Transfer, Transfer]] = {}
    upstream_saw: dict[int, tuple[Transfer, Transfer]] = {}

    async def upstream(stream: trio.SocketStream) -> None:
        # Clients connect one at a time, each after the previous one reached this
        # point, so the n-th connection accepted here is the n-th client's.
        nonlocal upstream_count
        index = upstream_count
        upstream_count += 1
        accepted[index].set()
        await go.wait()
        plan = plans[index]
        upstream_saw[index] = await run_end(
            stream, plan, block, is_client=False, barrier=barriers[index]
        )
        if len(upstream_saw) == STREAMS:
            upstreams_done.set()

    async def client(plan: StreamPlan, stream: trio.SocketStream) -> None:
        client_saw[plan.index] = await run_end(
            stream, plan, block, is_client=True, barrier=barriers[plan.index]
        )

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        with trio.fail_after(60):
            streams = []
            for plan in plans:
                streams.append(await connect(listen_port))
                await accepted[plan.index].wait()
            started = time.monotonic()
            async with trio.open_nursery() as clients:
                for plan, stream in zip(plans, streams, strict=True):
                    clients.start_soon(client, plan, stream)
                go.set()
            # A client may be done while its upstream still reads the last bytes.
            await upstreams_done.wait()
            elapsed = time.monotonic() - started
        nursery.cancel_scope.cancel()

    broken = []
    for plan in plans:
        client_sent, client_received = client_saw[plan.index]
        upstream_sent, upstream_received = upstream_saw[plan.index]
        if not (
            client_sent.count == plan.up_size
            and upstream_sent.count == plan.down_size
            and upstream_received == client_sent
            and client_received == upstream_sent
        ):
            broken.append(
                f"{plan}: client sent {client_sent}, upstream got {upstream_received}; "
                f"upstream sent {upstream_sent}, client got {client_received}"
            )
    assert not broken, f"seed {seed}: {len(broken)} streams broken, first: {broken[:3]}"

    up_total = sum(plan.up_size for plan in plans)
    down_total = sum(plan.down_size for plan in plans)
    print(f"{STREAMS} streams, {up_total + down_total} bytes in {elapsed:.1f}s")
    await wait_for_outcomes(relay, {"completed": STREAMS})
    metrics = relay.metrics()
    assert metrics.get("splicerelay_bytes_total", direction="client_to_upstream") == up_total
    assert metrics.get("splicerelay_bytes_total", direction="upstream_to_client") == down_total
    assert metrics.get("splicerelay_bytes_total", path="copy") == 0


# ----- 2. client faults ---------------------------------------------------------------


async def client_resets_mid_download(listen_port: int, seen: list[EndSeen]) -> float:
    """Download until the upstream is sending at full speed, then reset; when it was."""
    count = len(seen)
    stream = await connect(listen_port)
    received = 0
    while received < 4 * MiB:
        data = await stream.receive_some(1 << 16)
        assert data, "the download ended before the client reset it"
        received += len(data)
    reset(stream)
    reset_at = time.monotonic()
    while len(seen) == count:
        await trio.sleep(0.005)
    return reset_at


def upstream_sending_forever(seen: list[EndSeen]) -> Handler:
    """An upstream that sends far more than any client reads, and notes how it ended."""
    chunk = random.Random(1).randbytes(256 << 10)

    async def upstream(stream: trio.SocketStream) -> None:
        seen.append(await send_and_watch_end(stream, chunk, limit=5))

    return upstream


async def test_client_reset_mid_download_ends_the_upstream_promptly(relay_factory):
    seen: list[EndSeen] = []
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream_sending_forever(seen))
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        with trio.fail_after(20):
            reset_at = await client_resets_mid_download(listen_port, seen)
        nursery.cancel_scope.cancel()

    (end,) = seen
    took = end.first_at - reset_at
    assert took < 2.0, f"the upstream saw the end {took:.2f}s after the client's reset"
    assert end.first in ("reset", "eof")
    assert "reset" in dict(end.signs), f"the reset was not passed on: {end.signs}"
    await wait_for_outcomes(relay, {"client_reset": 1})


RESET_TRIALS = 40


async def test_client_reset_never_reaches_the_upstream_as_a_clean_eof(relay_factory):
    seen: list[EndSeen] = []
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream_sending_forever(seen))
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        with trio.fail_after(60):
            for _ in range(RESET_TRIALS):
                await client_resets_mid_download(listen_port, seen)
                if seen[-1].first != "reset":
                    break
        nursery.cancel_scope.cancel()

    await wait_for_outcomes(relay, {"client_reset": len(seen)})
    firsts = [end.first for end in seen]
    assert firsts == ["reset"] * RESET_TRIALS, (
        f"trial {len(seen)}: the upstream saw {seen[-1].signs} (a FIN before the RST)"
    )


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=15)


def netns_unusable() -> str | None:
    """Why this machine cannot run the namespace test, or None when it can."""
    if os.geteuid() != 0:
        return "creating a network namespace needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"srprobe{os.getpid()}"
    added = run_ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip()}"
    run_ip("netns", "del", probe, check=False)
    return None


def free_test_subnet() -> str:
    """A 10.250.N.0/30 that no address or route on this host touches yet."""
    start = os.getpid() % 250
    for step in range(250):
        prefix = f"10.250.{(start + step) % 250 + 1}"
        inside = run_ip("-4", "route", "show", "root", f"{prefix}.0/30").stdout.strip()
        covering = [
            line
            for line in run_ip("-4", "route", "show", "match", f"{prefix}.1").stdout.splitlines()
            if not line.startswith("default")
        ]
        addresses = run_ip("-4", "-o", "addr", "show", "to", f"{prefix}.0/30").stdout.strip()
        if not inside and not covering and not addresses:
            return prefix
    pytest.skip("no free 10.250.N.0/30 subnet for the test namespace")


# The client in the namespace: relay a greeting through the echo upstream, say so, then
# sit there holding the connection until it is killed.
VANISHING_CLIENT = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.sendall(b"hello")
got = b""
while len(got) < 5:
    data = sock.recv(5 - len(got))
    if not data:
        break
    got += data
print(got.decode(), flush=True)
time.sleep(60)
"""


async def test_client_that_vanishes_without_fin_or_rst_is_ended_by_idle_timeout(relay_factory):
    reason = netns_unusable()
    if reason is not None:
        pytest.skip(reason)
    tag = str(os.getpid())[-7:]
    namespace, host_link, ns_link = f"srfaults{tag}", f"srfh{tag}", f"srfn{tag}"
    prefix = free_test_subnet()
    host_address, client_address = f"{prefix}.1", f"{prefix}.2"
    vanished = trio.Event()
    upstream_end: dict[str, object] = {}
    burst = 256 << 10
    client: subprocess.Popen[str] | None = None

    async def upstream(stream: trio.SocketStream) -> None:
        greeting = b""
        while len(greeting) < 5:
            greeting += await stream.receive_some(5 - len(greeting))
        await stream.send_all(greeting)
        await vanished.wait()
        # Bytes for a client that is gone: the relay's socket to it fills up unacked, and
        # the rest stays in the relay's pipe. Nothing moves after that.
        try:
            await stream.send_all(b"z" * burst)
        except trio.BrokenResourceError:
            upstream_end["how"] = "reset"
        else:
            upstream_end["how"] = await first_end(stream)
        upstream_end["at"] = time.monotonic()
        await stream.aclose()

    try:
        run_ip("netns", "add", namespace)
        run_ip("link", "add", host_link, "type", "veth", "peer", "name", ns_link)
        run_ip("link", "set", ns_link, "netns", namespace)
        run_ip("addr", "add", f"{host_address}/30", "dev", host_link)
        run_ip("link", "set", host_link, "up")
        run_ip("-n", namespace, "addr", "add", f"{client_address}/30", "dev", ns_link)
        run_ip("-n", namespace, "link", "set", ns_link, "up")
        run_ip("-n", namespace, "link", "set", "lo", "up")

        async with trio.open_nursery() as nursery:
            upstream_port = await start_server(nursery, upstream)
            listen_port = free_port(host_address)
            config = relay_config(listen_port, upstream_port, extra="    idle_timeout: 1s\n")
            config = config.replace(
                f"listen: 127.0.0.1:{listen_port}", f"listen: {host_address}:{listen_port}"
            )
            relay = await relay_factory.astart(config)
            command = ["ip", "netns", "exec", namespace, sys.executable, "-c", VANISHING_CLIENT]
            client = subprocess.Popen(
                [*command, host_address, str(listen_port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout is not None
            with trio.fail_after(15):
                line = await trio.to_thread.run_sync(client.stdout.readline, abandon_on_cancel=True)
            assert line.strip() == "hello", f"the namespaced client said {line!r}"
            assert relay.metrics().get("splicerelay_connections_active") == 1

            # Vanish: cut the wire first, so that nothing the dying client's kernel sends
            # (FIN or RST) can reach the relay; then kill it and remove its namespace.
            run_ip("link", "set", host_link, "down")
            client.kill()
            client.wait(timeout=10)
            run_ip("netns", "del", namespace)
            vanished_at = time.monotonic()
            vanished.set()

            with trio.fail_after(10):
                while "at" not in upstream_end:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        if client is not None:
            if client.poll() is None:
                client.kill()
                client.wait(timeout=10)
            if client.stdout is not None:
                client.stdout.close()
        run_ip("link", "del", host_link, check=False)
        run_ip("netns", "del", namespace, check=False)

    took = float(upstream_end["at"]) - vanished_at  # type: ignore[arg-type]
    # Closed by the 1 s idle timeout (swept at most 0.1 s late).
    assert 0.9 < took < 3.0, f"the session ended {took:.2f}s after the client vanished"
    # A FIN, or a RST when the relay is closed with some of the burst still unread in
    # its socket: either way the upstream is told at once.
    assert upstream_end["how"] in ("eof", "reset")
    await wait_for_outcomes(relay, {"idle_timeout": 1})
    metrics = relay.metrics()
    assert metrics.get("splicerelay_bytes_total", direction="client_to_upstream") == 5
    assert metrics.get("splicerelay_bytes_total", direction="upstream_to_client") <= 5 + burst


async def test_very_slow_reader_of_a_gib_backpressures_the_upstream(relay_factory):
    size = GiB
    read_rate = 64 * MiB  # bytes per second, far below what loopback carries
    upstream_sent = 0
    upstream_digest: dict[str, str] = {}
    samples: list[tuple[int, int, int]] = []  # (relay RSS, upstream sent, client received)

    async def upstream(stream: trio.SocketStream) -> None:
        # As fast as the relay lets it: only back-pressure slows it down.
        nonlocal upstream_sent
        rng = random.Random(50)
        block = rng.randbytes(4 * MiB)
        view = memoryview(block)
        digest = hashlib.sha256()
        while upstream_sent < size:
            length = min(size - upstream_sent, 256 << 10)
            start = rng.randrange(0, len(block) - length + 1)
            digest.update(view[start : start + length])
            await stream.send_all(view[start : start + length])
            upstream_sent += length
        upstream_digest["sent"] = digest.hexdigest()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        baseline_rss = relay.rss()
        received = 0
        digest = hashlib.sha256()

        async def sample() -> None:
            while True:
                samples.append((relay.rss(), upstream_sent, received))
                await trio.sleep(0.05)

        with trio.fail_after(60):
            stream = await connect(listen_port)
            nursery.start_soon(sample)
            started = trio.current_time()
            while data := await stream.receive_some(32 << 10):
                digest.update(data)
                received += len(data)
                # Paced: never ahead of `read_rate` since the start.
                ahead = received / read_rate - (trio.current_time() - started)
                if ahead > 0:
                    await trio.sleep(ahead)
            await stream.aclose()
        nursery.cancel_scope.cancel()

    assert received == size
    assert digest.hexdigest() == upstream_digest["sent"]
    assert len(samples) > 100
    growth = max(rss for rss, _, _ in samples) - baseline_rss
    assert growth < 20 * MiB, f"relay RSS grew by {growth / MiB:.1f} MiB"
    # The upstream is held back by the reader: what it has sent is never more than the
    # reader took plus what the kernel buffers along the way hold.
    in_flight = max(sent - got for _, sent, got in samples)
    print(f"at most {in_flight / MiB:.1f} MiB in flight; RSS grew {growth / MiB:.1f} MiB")
    assert in_flight < 96 * MiB, f"{in_flight / MiB:.0f} MiB were in flight at once"
    midpoint = next(sent for _, sent, got in samples if got >= size // 2)
    print(f"upstream had sent {midpoint / MiB:.1f} MiB when the reader had half")
    assert midpoint < size // 2 + 96 * MiB, f"upstream had sent {midpoint / MiB:.0f} MiB"
    await wait_for_outcomes(relay, {"completed": 1})
    assert relay.metrics().get("splicerelay_bytes_total", direction="upstream_to_client") == size


# ----- 3. upstream faults -------------------------------------------------------------


async def test_refused_upstream_closes_the_client_at_once(relay_factory):
    listen_port = free_port()
    dead_port = refused_port()
    relay = await relay_factory.astart(relay_config(listen_port, dead_port))
    with trio.fail_after(5):
        stream = await connect(listen_port)
        started = time.monotonic()
        leftover = await receive_all(stream)
        took = time.monotonic() - started
        await stream.aclose()
    assert leftover.count == 0
    assert took < 1.0, f"the client was closed {took:.2f}s after connecting"
    await wait_for_outcomes(relay, {"connect_failed": 1})
    errors = relay.metrics().get(
        "splicerelay_upstream_connect_errors_total", upstream=f"127.0.0.1:{dead_port}"
    )
    assert errors == 1
    assert relay.metrics().get("splicerelay_upstream_connect_errors_total", reason="refused") == 1


async def test_blackholed_upstream_times_out_and_closes_the_client(relay_factory):
    hole, fillers = blackholed_listener()
    try:
        hole_port = hole.getsockname()[1]
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(listen_port, hole_port, extra="    connect_timeout: 300ms\n")
        )
        with trio.fail_after(5):
            stream = await connect(listen_port)
            started = time.monotonic()
            leftover = await receive_all(stream)
            took = time.monotonic() - started
            await stream.aclose()
        await wait_for_outcomes(relay, {"connect_failed": 1})
    finally:
        close_blackhole(hole, fillers)
    assert leftover.count == 0
    assert 0.25 < took < 1.5, f"the client was closed {took:.2f}s after connecting"
    errors = relay.metrics().get(
        "splicerelay_upstream_connect_errors_total", upstream=f"127.0.0.1:{hole_port}"
    )
    assert errors == 1
    assert relay.metrics().get("splicerelay_upstream_connect_errors_total", reason="timeout") == 1


def upstream_resetting_mid_upload(reset_at: list[float]) -> Handler:
    """An upstream that takes 4 MiB of the upload, then resets; notes when."""

    async def upstream(stream: trio.SocketStream) -> None:
        received = 0
        while received < 4 * MiB:
            data = await stream.receive_some(1 << 16)
            assert data
            received += len(data)
        reset(stream)
        reset_at.append(time.monotonic())

    return upstream


async def client_uploads_until_the_end(listen_port: int) -> EndSeen:
    stream = await connect(listen_port)
    # Far more than the upstream takes before its reset.
    return await send_and_watch_end(stream, random.Random(2).randbytes(256 << 10), limit=5)


async def test_upstream_reset_mid_upload_closes_the_client_promptly(relay_factory):
    reset_at: list[float] = []
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream_resetting_mid_upload(reset_at))
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        with trio.fail_after(20):
            end = await client_uploads_until_the_end(listen_port)
        nursery.cancel_scope.cancel()

    took = end.first_at - reset_at[0]
    assert took < 2.0, f"the client saw the end {took:.2f}s after the upstream's reset"
    assert end.first in ("reset", "eof")
    assert "reset" in dict(end.signs), f"the reset was not passed on: {end.signs}"
    await wait_for_outcomes(relay, {"upstream_reset": 1})


async def test_upstream_reset_never_reaches_the_client_as_a_clean_eof(relay_factory):
    reset_at: list[float] = []
    seen: list[EndSeen] = []
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream_resetting_mid_upload(reset_at))
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        with trio.fail_after(60):
            for _ in range(RESET_TRIALS):
                seen.append(await client_uploads_until_the_end(listen_port))
                if seen[-1].first != "reset":
                    break
        nursery.cancel_scope.cancel()

    await wait_for_outcomes(relay, {"upstream_reset": len(seen)})
    firsts = [end.first for end in seen]
    assert firsts == ["reset"] * RESET_TRIALS, (
        f"trial {len(seen)}: the client saw {seen[-1].signs} (a FIN before the RST)"
    )


async def test_upstream_that_never_reads_backpressures_then_idles_out(relay_factory):
    accepted = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        # Accepts, then never reads a byte.
        accepted.set()
        try:
            await trio.sleep_forever()
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(listen_port, upstream_port, extra="    idle_timeout: 1s\n")
        )
        baseline_rss = relay.rss()
        # (time, relay RSS, bytes the client got out, bytes the relay delivered upstream)
        samples: list[tuple[float, int, int, float]] = []
        sent = 0

        def sample_once() -> None:
            delivered = relay.metrics().get(
                "splicerelay_bytes_total", direction="client_to_upstream"
            )
            samples.append((time.monotonic(), relay.rss(), sent, delivered))

        async def sample() -> None:
            while True:
                await trio.to_thread.run_sync(sample_once)
                await trio.sleep(0.05)

        chunk = random.Random(3).randbytes(16 << 10)
        with trio.fail_after(20):
            stream = await connect(listen_port)
            await accepted.wait()
            nursery.start_soon(sample)
            writing_since = time.monotonic()
            try:
                while True:
                    await stream.send_all(chunk)
                    sent += len(chunk)
            except trio.BrokenResourceError:
                # Closed by the relay with our bytes unread in its socket: a reset.
                ended_at = time.monotonic()
            await stream.aclose()
        nursery.cancel_scope.cancel()

    for row in samples:
        print(f"{row[0] - samples[0][0]:.3f} rss={row[1]} sent={row[2]} delivered={row[3]:.0f}")
    # The client kept writing for over a second, and yet (loopback carries GB/s) only
    # what the buffers on the way hold got out: its writes were blocked...
    assert ended_at - writing_since > 1.0
    assert sent < 64 * MiB, f"the client got {sent / MiB:.0f} MiB out before being blocked"
    # ...the relay delivered nothing more, and closed 1 s (the idle timeout) after its last
    # delivered byte (seen at most one 50 ms sample late; swept at most 0.1 s late).
    final = samples[-1][3]
    last_delivery = next(row[0] for row in samples if row[3] == final)
    idle_for = ended_at - last_delivery
    assert 0.8 < idle_for < 2.0, f"the relay closed {idle_for:.2f}s after its last delivery"
    growth = max(row[1] for row in samples) - baseline_rss
    assert growth < 20 * MiB, f"relay RSS grew by {growth / MiB:.1f} MiB"
    await wait_for_outcomes(relay, {"idle_timeout": 1})


async def test_upstream_half_close_mid_upload_still_receives_the_whole_upload(relay_factory):
    upload_size, reply_size = 16 * MiB, 1000
    upload = random.Random(4).randbytes(upload_size)
    upstream_got: dict[str, Transfer] = {}

    async def upstream(stream: trio.SocketStream) -> None:
        # A short reply and an early end of its own writing, then it listens to the end.
        await send_payload(stream, seed=5, total=reply_size)
        await stream.send_eof()
        upstream_got["upload"] = await receive_all(stream)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        reply: dict[str, Transfer] = {}
        reply_done = trio.Event()
        with trio.fail_after(20):
            stream = await connect(listen_port)

            async def read_reply() -> None:
                reply["reply"] = await receive_all(stream)
                reply_done.set()

            async def write_upload() -> None:
                rng = random.Random(6)
                view = memoryview(upload)
                # Half of the upload, then the reply's end, then the rest: the upstream's
                # half-close lands while the client is still uploading.
                for start, end in ((0, upload_size // 2), (upload_size // 2, upload_size)):
                    if start:
                        await reply_done.wait()
                    offset = start
                    while offset < end:
                        step = min(end - offset, rng.randint(1, 256 << 10))
                        await stream.send_all(view[offset : offset + step])
                        offset += step
                await stream.send_eof()

            async with trio.open_nursery() as client:
                client.start_soon(read_reply)
                client.start_soon(write_upload)
            while "upload" not in upstream_got:
                await trio.sleep(0.01)
            await stream.aclose()
        nursery.cancel_scope.cancel()

    assert reply["reply"] == expected_transfer(5, reply_size)
    assert upstream_got["upload"] == Transfer(upload_size, hashlib.sha256(upload).hexdigest())
    await wait_for_outcomes(relay, {"completed": 1})
    metrics = relay.metrics()
    assert metrics.get("splicerelay_bytes_total", direction="client_to_upstream") == upload_size
    assert metrics.get("splicerelay_bytes_total", direction="upstream_to_client") == reply_size
