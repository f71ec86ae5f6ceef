"""The shared epoll data path, seen from outside: the ways one level-triggered reactor for
every connection can go wrong.

Established connections have no task of their own: their sockets sit in one epoll set
with an interest mask derived from the state of the two flows, upstream connects wait in
the same set, and one handler's close can hand its fd number to the next socket within a
single dispatch round. These tests run the real relay as a subprocess between trio peers
on loopback and look for what such a design gets wrong: busy loops on half-closed or
back-pressured sockets (measured as the relay's CPU time from /proc), bytes or FINs that
arrive before a socket is registered and are never picked up, connect failover, resets
noticed late, and stale events delivered to a reused fd number under churn.

Each test is bounded in time, asserts the exact outcomes counted on /metrics, and ends
with every fd the relay took for it given back (the relay fixture checks that again and
that the relay exits 0 on SIGTERM).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import ConnectError, UpstreamTarget, start_connect
from tests.support.harness import Relay, RelayFactory, free_port, poll_until, refused_port
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
KiB = 1 << 10

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# An idle relay wakes a few times a second for its timers; a busy loop burns a whole
# core (or its fair share of a loaded one). A tenth of the window separates them widely.
IDLE_CPU_SHARE = 0.1
IDLE_WINDOW = 1.5

OUTCOMES = "splicerelay_connections_total"
CONNECT_ERRORS = "splicerelay_upstream_connect_errors_total"
TCP_CLOSE = 7  # include/net/tcp_states.h


# ----- helpers ------------------------------------------------------------------------


def relay_config(*routes: str) -> str:
    return (
        "metrics:\n"
        "  listen: 127.0.0.1:{metrics_port}\n"
        "log: {level: info, format: json, access_log: true}\n"
        "shutdown_timeout: 5s\n"
        "routes:\n" + "".join(routes)
    )


def route(name: str, listen_port: int, upstreams: list[tuple[int, int]], extra: str = "") -> str:
    """One route; `upstreams` are (port, weight) pairs on 127.0.0.1."""
    listed = "".join(
        f"      - address: 127.0.0.1:{port}\n        weight: {weight}\n"
        for port, weight in upstreams
    )
    return f"  - name: {name}\n    listen: 127.0.0.1:{listen_port}\n    upstreams:\n{listed}{extra}"


async def relay_in_front_of(
    nursery: trio.Nursery,
    relay_factory: RelayFactory,
    name: str,
    upstream: Handler,
    extra: str = "",
) -> tuple[Relay, int]:
    """A trio upstream served by `upstream`, and a relay with one route to it: the
    relay and the port it listens on."""
    upstream_port = await start_server(nursery, upstream)
    listen_port = free_port()
    relay = await relay_factory.astart(
        relay_config(route(name, listen_port, [(upstream_port, 1)], extra=extra))
    )
    return relay, listen_port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as file:
        # Split after the command name, which may itself hold spaces or parentheses:
        # the state (field 3 in proc(5)) comes first, utime is field 14, stime field 15.
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def assert_relay_idles(relay: Relay, state: str, window: float = IDLE_WINDOW) -> float:
    """Measure the relay's CPU over `window` seconds in which no peer does anything."""
    before = cpu_seconds(relay.pid)
    await trio.sleep(window)  # a measuring window, not a wait for a state
    used = cpu_seconds(relay.pid) - before
    limit = IDLE_CPU_SHARE * window
    assert used < limit, (
        f"the relay used {used:.2f}s of CPU in {window}s {state} (limit {limit:.2f}s): a busy loop"
    )
    return used


def outcomes(relay: Relay, route_name: str | None = None) -> dict[str, int]:
    """Every outcome the relay has counted (on one route, or all), zero counts left out."""
    counted: dict[str, int] = {}
    for (name, labels), value in relay.metrics().samples.items():
        label_map = dict(labels)
        if name != OUTCOMES or not value:
            continue
        if route_name is not None and label_map.get("route") != route_name:
            continue
        outcome = label_map["outcome"]
        counted[outcome] = counted.get(outcome, 0) + int(value)
    return counted


async def wait_for_outcomes(
    relay: Relay, expected: dict[str, int], route_name: str | None = None, timeout: float = 10
) -> None:
    """Wait until the relay has counted exactly `expected`, and nothing else."""
    seen: dict[str, int] = {}

    def counted() -> bool:
        seen.clear()
        seen.update(outcomes(relay, route_name))
        return seen == expected

    try:
        await trio.to_thread.run_sync(poll_until, counted, timeout, f"outcomes {expected}")
    except AssertionError:
        raise AssertionError(f"expected outcomes {expected}, the relay counted {seen}") from None


async def settle(relay: Relay) -> None:
    """Every connection's fds given back, and no handler failed along the way."""
    await trio.to_thread.run_sync(relay.wait_settled)
    log = relay.stderr()
    assert "unexpectedly" not in log and "Traceback" not in log, log[-4000:]


def tcp_state(sock: socket.socket | trio.socket.SocketType) -> int:
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0])


async def how_it_ended(stream: trio.SocketStream) -> str:
    """Read and discard to the end; "eof" for a clean end, "reset" for a reset."""
    try:
        while await stream.receive_some(64 * KiB):
            pass
    except trio.BrokenResourceError:
        return "reset"
    # A reset is reported to one call only; the TCP state still tells it from a FIN.
    return "reset" if tcp_state(stream.socket) == TCP_CLOSE else "eof"


async def receive_exactly(stream: trio.SocketStream, count: int) -> bytes:
    """Read exactly `count` bytes; fail on an early end."""
    parts = []
    left = count
    while left:
        data = await stream.receive_some(min(left, 256 * KiB))
        assert data, f"the stream ended {left} bytes short of {count}"
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


async def receive_transfer(stream: trio.SocketStream, count: int) -> Transfer:
    """Read exactly `count` bytes (without waiting for an EOF); their count and sha256."""
    digest = hashlib.sha256()
    left = count
    while left:
        data = await stream.receive_some(min(left, 256 * KiB))
        assert data, f"the stream ended {left} bytes short of {count}"
        digest.update(data)
        left -= len(data)
    return Transfer(count, digest.hexdigest())


async def read_to_end(stream: trio.SocketStream) -> bytes:
    parts = []
    while data := await stream.receive_some(64 * KiB):
        parts.append(data)
    return b"".join(parts)


async def wait_for_key(results: Mapping[str, object], key: str) -> None:
    """Wait (within the caller's deadline) until a peer task has recorded `key`."""
    while key not in results:
        await trio.sleep(0.01)


def byte_totals(relay: Relay) -> tuple[int, int]:
    metrics = relay.metrics()
    return (
        int(metrics.get("splicerelay_bytes_total", direction="client_to_upstream")),
        int(metrics.get("splicerelay_bytes_total", direction="upstream_to_client")),
    )


# ----- 1. no busy loop on half-closed connections -------------------------------------


async def test_half_closed_connections_leave_the_relay_idle(relay_factory):
    a_request, a_reply = 64 * KiB + 3, 32 * KiB + 1
    b_greeting, b_request = 48 * KiB + 5, 16 * KiB + 7
    got: dict[str, object] = {}
    a_read_to_eof = trio.Event()
    finish_a = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        tag = await receive_exactly(stream, 1)
        if tag == b"A":
            # The client sends and half-closes; this end reads it all, then stays silent
            # with its own write side open.
            got["A request"] = await receive_all(stream)
            a_read_to_eof.set()
            await finish_a.wait()
            await send_payload(stream, seed=12, total=a_reply)
        else:
            # This end speaks and half-closes; then it listens to a silent client.
            await send_payload(stream, seed=13, total=b_greeting)
            await stream.send_eof()
            got["B request"] = await receive_all(stream)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        relay, listen_port = await relay_in_front_of(nursery, relay_factory, "idle", upstream)
        with trio.fail_after(30):
            a = await connect(listen_port)
            await a.send_all(b"A")
            await send_payload(a, seed=11, total=a_request)
            await a.send_eof()
            # The upstream has the client's FIN: the relay passed it on and its client
            # socket (with the FIN pending, reported by epoll as RDHUP) waits on nothing.
            await a_read_to_eof.wait()
            await assert_relay_idles(relay, "with a connection whose client half-closed")

            b = await connect(listen_port)
            await b.send_all(b"B")
            greeting = await receive_all(b)
            # Now the upstream side of B is the half-closed one, and A is still open.
            await assert_relay_idles(relay, "with one connection half-closed each way")

            finish_a.set()
            reply = await receive_all(a)
            await a.aclose()
            await send_payload(b, seed=14, total=b_request)
            await b.send_eof()
            await wait_for_key(got, "B request")
            await b.aclose()
        nursery.cancel_scope.cancel()

    assert got["A request"] == expected_transfer(11, a_request)
    assert reply == expected_transfer(12, a_reply)
    assert greeting == expected_transfer(13, b_greeting)
    assert got["B request"] == expected_transfer(14, b_request)
    await wait_for_outcomes(relay, {"completed": 2})
    assert byte_totals(relay) == (1 + a_request + 1 + b_request, a_reply + b_greeting)
    await settle(relay)


# ----- 2. no busy loop under back-pressure ---------------------------------------------


async def test_back_pressure_both_ways_leaves_the_relay_idle_and_small(relay_factory):
    size = 32 * MiB
    release = trio.Event()
    got: dict[str, object] = {}

    async def upstream(stream: trio.SocketStream) -> None:
        tag = await receive_exactly(stream, 1)
        if tag == b"U":
            # Accepts and does not read: the client's upload piles up behind it.
            await release.wait()
            got["upload"] = await receive_all(stream)
        else:
            # Sends far more than the buffers on the way hold to a client that does
            # not read.
            got["download sent"] = await send_payload(stream, seed=22, total=size)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        relay, listen_port = await relay_in_front_of(nursery, relay_factory, "pressure", upstream)
        baseline_rss = relay.rss()

        async def uploader() -> None:
            stream = await connect(listen_port)
            await stream.send_all(b"U")
            got["upload sent"] = await send_payload(stream, seed=21, total=size)
            await stream.send_eof()
            got["upload reply"] = await receive_all(stream)
            await stream.aclose()

        async def downloader() -> None:
            stream = await connect(listen_port)
            await stream.send_all(b"D")
            await release.wait()
            got["download"] = await receive_all(stream)
            await stream.aclose()

        previous: list[tuple[int, int]] = []

        def stalled() -> bool:
            # Both directions have moved some bytes, and none over the last two looks.
            totals = byte_totals(relay)
            previous.append(totals)
            return min(totals) > 0 and previous[-3:] == [totals] * 3

        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                clients.start_soon(uploader)
                clients.start_soon(downloader)
                await trio.to_thread.run_sync(
                    poll_until, stalled, 20, "both directions to stall", 0.3
                )
                held_back = previous[-1]
                # The relay holds bytes it cannot deliver on both connections, and more
                # wait in its sockets: readable sockets it must not be woken for.
                await assert_relay_idles(relay, "with both directions back-pressured")
                growth = relay.rss() - baseline_rss
                still = await trio.to_thread.run_sync(byte_totals, relay)
                release.set()
            await wait_for_key(got, "upload")
        nursery.cancel_scope.cancel()

    assert held_back[0] < size and held_back[1] < size, f"nothing held back: {held_back}"
    assert still == held_back, f"bytes moved while nobody read: {held_back} -> {still}"
    assert growth < 20 * MiB, f"relay RSS grew by {growth / MiB:.1f} MiB"
    assert got["upload"] == got["upload sent"] == expected_transfer(21, size)
    assert got["download"] == got["download sent"] == expected_transfer(22, size)
    assert got["upload reply"] == Transfer(0, hashlib.sha256().hexdigest())
    await wait_for_outcomes(relay, {"completed": 2})
    assert byte_totals(relay) == (1 + size + 1, size)
    assert relay.metrics().get("splicerelay_bytes_total", path="copy") == 0
    await settle(relay)


# ----- 3. the upstream speaks first ----------------------------------------------------

# (mode, banner size): a short banner with the upstream's write side left open, one
# followed at once by the upstream's FIN, and one larger than the relay's pipe.
BANNER_MODES = (("open", 21), ("eof", 100), ("large", 3 * MiB + 5))
BANNER_ROUNDS = 4


async def test_a_banner_from_the_upstream_reaches_a_silent_client(relay_factory):
    plans = [mode for _ in range(BANNER_ROUNDS) for mode in BANNER_MODES]
    accepted = 0
    requests: dict[int, Transfer] = {}

    async def upstream(stream: trio.SocketStream) -> None:
        # Clients come one at a time, so the n-th connection here is the n-th client's.
        nonlocal accepted
        index = accepted
        accepted += 1
        mode, size = plans[index]
        await send_payload(stream, seed=300 + index, total=size)
        if mode == "eof":
            await stream.send_eof()
        requests[index] = await receive_all(stream)
        if mode != "eof":
            await stream.send_all(b"bye")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        relay, listen_port = await relay_in_front_of(nursery, relay_factory, "banner", upstream)
        for index, (mode, size) in enumerate(plans):
            stream = await connect(listen_port)
            with trio.fail_after(10):
                # Not a byte from the client yet: only the upstream can start.
                banner = await receive_transfer(stream, size)
                assert banner == expected_transfer(300 + index, size), f"{mode} banner {index}"
                if mode == "eof":
                    assert await stream.receive_some(1) == b"", "no EOF after the banner"
                await send_payload(stream, seed=400 + index, total=1000 + index)
                await stream.send_eof()
                rest = await read_to_end(stream)
                await stream.aclose()
                assert rest == (b"" if mode == "eof" else b"bye")
                while index not in requests:
                    await trio.sleep(0.01)
                assert requests[index] == expected_transfer(400 + index, 1000 + index)
        nursery.cancel_scope.cancel()

    await wait_for_outcomes(relay, {"completed": len(plans)})
    await settle(relay)


# ----- 4. bytes and FIN that arrive before the upstream connect completes --------------

REQUEST_SIZE = 48 * KiB  # fits in a fresh socket's receive buffer: sent without help
REPLY_SIZE = 200 * KiB
EARLY_DIRECT = 20
EARLY_DELAYED = 4


def request_for(index: int) -> bytes:
    return struct.pack("!I", index) + random.Random(index).randbytes(REQUEST_SIZE)


def reply_for(index: int) -> bytes:
    return random.Random(10_000 + index).randbytes(REPLY_SIZE)


async def test_request_and_fin_sent_before_the_upstream_connects_arrive_whole(relay_factory):
    hole, fillers = blackholed_listener()
    try:
        await early_request_and_fin(relay_factory, hole.getsockname()[1])
    finally:
        close_blackhole(hole, fillers)


async def early_request_and_fin(relay_factory: RelayFactory, hole_port: int) -> None:
    upstream_got: dict[int, bool] = {}

    async def upstream(stream: trio.SocketStream) -> None:
        request = await read_to_end(stream)
        (index,) = struct.unpack("!I", request[:4])
        upstream_got[index] = request == request_for(index)
        await stream.send_all(reply_for(index))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        direct_port, delayed_port = free_port(), free_port()
        relay = await relay_factory.astart(
            relay_config(
                route("direct", direct_port, [(upstream_port, 1)]),
                # The blackholed upstream comes first for every connection: the relay
                # waits 300 ms for it while the client's request and FIN sit in the
                # relay's socket, then fails over to the live one.
                route(
                    "delayed",
                    delayed_port,
                    [(hole_port, 100), (upstream_port, 1)],
                    extra="    connect_timeout: 300ms\n",
                ),
            )
        )
        replies: dict[int, tuple[bytes, float]] = {}

        async def client(index: int, port: int) -> None:
            # Why the clock starts before connecting: the check below is a lower bound,
            # so the start must come before the relay's connect timer can start. Taken
            # after connect() returns, a busy test process could take it late.
            started = time.monotonic()
            stream = await connect(port)
            # The whole request and the FIN straight after connecting, before the relay
            # can have an upstream for them.
            await stream.send_all(request_for(index))
            await stream.send_eof()
            reply = await read_to_end(stream)
            replies[index] = (reply, time.monotonic() - started)
            await stream.aclose()

        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for index in range(EARLY_DIRECT):
                    clients.start_soon(client, index, direct_port)
                for index in range(EARLY_DIRECT, EARLY_DIRECT + EARLY_DELAYED):
                    clients.start_soon(client, index, delayed_port)
            while len(upstream_got) < EARLY_DIRECT + EARLY_DELAYED:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    assert all(upstream_got.values()), f"requests broken: {upstream_got}"
    for index, (reply, took) in sorted(replies.items()):
        assert reply == reply_for(index), f"client {index} got {len(reply)} bytes back"
        if index >= EARLY_DIRECT:
            assert took >= 0.25, f"delayed client {index} was served after only {took:.2f}s"
    await wait_for_outcomes(relay, {"completed": EARLY_DIRECT}, route_name="direct")
    await wait_for_outcomes(relay, {"completed": EARLY_DELAYED}, route_name="delayed")
    metrics = relay.metrics()
    assert metrics.get(CONNECT_ERRORS, upstream=f"127.0.0.1:{hole_port}", reason="timeout") == (
        EARLY_DELAYED
    )
    assert metrics.get(CONNECT_ERRORS, default=0, route="direct") == 0
    await settle(relay)


# ----- 5. connect failover through the reactor -----------------------------------------

FAILOVER_REFUSED = 4
FAILOVER_BLACKHOLED = 2


async def echo_to_eof(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(64 * KiB):
        await stream.send_all(data)
    await stream.aclose()


async def test_failover_past_a_refusing_and_a_blackholed_upstream(relay_factory):
    hole, fillers = blackholed_listener()
    try:
        hole_port = hole.getsockname()[1]
        dead_port = refused_port()
        async with trio.open_nursery() as nursery:
            live_port = await start_server(nursery, echo_to_eof)
            refusing_port, blackholed_port = free_port(), free_port()
            # Weights 100:1 put the dead upstream first for each of these connections.
            relay = await relay_factory.astart(
                relay_config(
                    route("refusing", refusing_port, [(dead_port, 100), (live_port, 1)]),
                    route(
                        "blackholed",
                        blackholed_port,
                        [(hole_port, 100), (live_port, 1)],
                        extra="    connect_timeout: 500ms\n",
                    ),
                )
            )
            timings: dict[str, list[float]] = {"refusing": [], "blackholed": []}

            async def round_trip(name: str, port: int, index: int) -> None:
                payload = f"ping {name} {index}".encode()
                started = time.monotonic()
                stream = await connect(port)
                await stream.send_all(payload)
                await stream.send_eof()
                reply = await read_to_end(stream)
                timings[name].append(time.monotonic() - started)
                await stream.aclose()
                assert reply == payload

            with trio.fail_after(20):
                for index in range(FAILOVER_REFUSED):
                    await round_trip("refusing", refusing_port, index)
                async with trio.open_nursery() as clients:
                    for index in range(FAILOVER_BLACKHOLED):
                        clients.start_soon(round_trip, "blackholed", blackholed_port, index)
            nursery.cancel_scope.cancel()
        await wait_for_outcomes(relay, {"completed": FAILOVER_REFUSED}, route_name="refusing")
        await wait_for_outcomes(relay, {"completed": FAILOVER_BLACKHOLED}, route_name="blackholed")
    finally:
        close_blackhole(hole, fillers)

    for took in timings["refusing"]:
        assert took < 1.0, f"failover past a refused connect took {took:.2f}s"
    for took in timings["blackholed"]:
        # The 500 ms connect timeout (checked on a 25 ms timer), then the live upstream.
        assert 0.45 < took < 1.5, f"failover past a blackholed upstream took {took:.2f}s"
    metrics = relay.metrics()
    dead, holed = f"127.0.0.1:{dead_port}", f"127.0.0.1:{hole_port}"
    assert metrics.get(CONNECT_ERRORS, upstream=dead, reason="refused") == FAILOVER_REFUSED
    assert metrics.get(CONNECT_ERRORS, upstream=dead) == FAILOVER_REFUSED
    assert metrics.get(CONNECT_ERRORS, upstream=holed, reason="timeout") == FAILOVER_BLACKHOLED
    assert metrics.get(CONNECT_ERRORS, upstream=holed) == FAILOVER_BLACKHOLED
    assert metrics.get(CONNECT_ERRORS, default=0, upstream=f"127.0.0.1:{live_port}") == 0
    await settle(relay)


# ----- 6. churn with fd reuse ---------------------------------------------------------

CHURN_CONNECTIONS = 2000
CHURN_CONCURRENCY = 64
CHURN_DEADLINE = 10.0  # for one short connection; a correct relay needs well under 1 s
RESET_EVERY = 4  # every 4th short connection is reset by the upstream
LONG_WORKERS = 2
LONG_SIZE = 8 * MiB
LONG_MAX_ROUNDS = 20


@dataclass
class ChurnTally:
    short_ok: int = 0
    resets: int = 0
    long_ok: int = 0
    connections: int = 0


async def test_churn_with_refusals_and_resets_keeps_long_transfers_intact(relay_factory):
    """Short connections churn fds: half of them try a refusing upstream first and fail
    over within a dispatch round (closing one socket, opening the next, which takes the
    lowest free fd number, often one just closed), a quarter are reset by the upstream
    while their client is still sending (so both of their sockets are ready in the same
    round). A socket that fails over to the blackholed upstream stays mid-handshake: an
    event meant for the fd number's previous owner, handed to it, would pass it off as
    connected and leave its client hanging. Long transfers run alongside and must come
    out intact."""
    hole, fillers = blackholed_listener()
    try:
        await churn(relay_factory, hole.getsockname()[1])
    finally:
        close_blackhole(hole, fillers)


async def churn(relay_factory: RelayFactory, hole_port: int) -> None:
    tally = ChurnTally()
    churn_done = trio.Event()
    broken: list[str] = []
    chunk = random.Random(60).randbytes(16 * KiB)

    async def upstream(stream: trio.SocketStream) -> None:
        tag = await receive_exactly(stream, 1)
        if tag == b"R":
            # Some of what the client keeps sending, then a reset with more unread.
            with contextlib.suppress(trio.BrokenResourceError):
                await receive_exactly(stream, 32 * KiB)
            reset(stream)
            return
        if tag == b"S":
            await echo_to_eof(stream)
            return
        (seed,) = struct.unpack("!I", await receive_exactly(stream, 4))
        result: dict[str, Transfer] = {}

        async def send() -> None:
            await send_payload(stream, seed=seed + 1, total=LONG_SIZE)
            await stream.send_eof()

        async def receive() -> None:
            result["got"] = await receive_all(stream)

        async with trio.open_nursery() as both:
            both.start_soon(send)
            both.start_soon(receive)
        if result["got"] != expected_transfer(seed, LONG_SIZE):
            broken.append(f"long upload {seed}: {result['got']}")
        await stream.aclose()

    async def reset_by_upstream(stream: trio.SocketStream) -> str:
        async def send() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await stream.send_all(chunk)

        async with trio.open_nursery() as pair:
            pair.start_soon(send)
            how = await how_it_ended(stream)
            pair.cancel_scope.cancel()
        return how

    async with trio.open_nursery() as nursery:
        live_port = await start_server(nursery, upstream)
        dead_port = refused_port()
        listen_port = free_port()
        # Smooth round-robin over weights 2:1:1 picks dead, hole, live, dead, ...; each
        # pick is followed by the others in list order. So half of the connections go
        # dead -> hole -> live, a quarter hole -> live, a quarter straight to live.
        relay = await relay_factory.astart(
            relay_config(
                route(
                    "churn",
                    listen_port,
                    [(dead_port, 2), (hole_port, 1), (live_port, 1)],
                    extra="    connect_timeout: 100ms\n",
                )
            )
        )

        async def short(index: int) -> None:
            tally.connections += 1
            stream = await connect(listen_port)
            payload = random.Random(index).randbytes(1 + index % 4096)
            if index % RESET_EVERY == RESET_EVERY - 1:
                await stream.send_all(b"R")
                how = await reset_by_upstream(stream)
                await stream.aclose()
                if how != "reset":
                    broken.append(f"short {index}: the upstream's reset arrived as {how}")
                tally.resets += 1
                return
            await stream.send_all(b"S" + payload)
            await stream.send_eof()
            reply = await read_to_end(stream)
            await stream.aclose()
            if reply != payload:
                broken.append(f"short {index}: {len(payload)} sent, {len(reply)} back")
            tally.short_ok += 1

        async def long_worker(worker: int) -> None:
            # Runs for as long as the churn does (and at least once).
            for round_ in range(LONG_MAX_ROUNDS):
                if round_ and churn_done.is_set():
                    return
                seed = 1_000_000 + worker * 1000 + round_ * 2
                tally.connections += 1
                stream = await connect(listen_port)
                await stream.send_all(b"L" + struct.pack("!I", seed))
                result: dict[str, Transfer] = {}

                async def send(stream: trio.SocketStream = stream, seed: int = seed) -> None:
                    await send_payload(stream, seed=seed, total=LONG_SIZE)
                    await stream.send_eof()

                async def receive(
                    stream: trio.SocketStream = stream, result: dict[str, Transfer] = result
                ) -> None:
                    result["got"] = await receive_all(stream)

                async with trio.open_nursery() as both:
                    both.start_soon(send)
                    both.start_soon(receive)
                await stream.aclose()
                if result["got"] != expected_transfer(seed + 1, LONG_SIZE):
                    broken.append(f"long download {seed}: {result['got']}")
                tally.long_ok += 1

        next_index = 0

        async def churner() -> None:
            nonlocal next_index
            while next_index < CHURN_CONNECTIONS:
                index = next_index
                next_index += 1
                try:
                    with trio.fail_after(CHURN_DEADLINE):
                        await short(index)
                except trio.TooSlowError:
                    raise AssertionError(
                        f"short connection {index} got no answer in {CHURN_DEADLINE}s"
                    ) from None

        started = time.monotonic()
        with trio.fail_after(90):
            async with trio.open_nursery() as load:
                for worker in range(LONG_WORKERS):
                    load.start_soon(long_worker, worker)
                async with trio.open_nursery() as churners:
                    for _ in range(CHURN_CONCURRENCY):
                        churners.start_soon(churner)
                churn_done.set()
        elapsed = time.monotonic() - started
        nursery.cancel_scope.cancel()

    print(f"{CHURN_CONNECTIONS} short and {tally.long_ok} long connections in {elapsed:.1f}s")
    assert not broken, f"{len(broken)} broken, first: {broken[:5]}"
    resets = CHURN_CONNECTIONS // RESET_EVERY
    assert tally.resets == resets and tally.short_ok == CHURN_CONNECTIONS - resets
    assert tally.long_ok >= LONG_WORKERS
    await wait_for_outcomes(
        relay, {"completed": tally.short_ok + tally.long_ok, "upstream_reset": resets}
    )
    metrics = relay.metrics()
    total = tally.connections
    dead, holed = f"127.0.0.1:{dead_port}", f"127.0.0.1:{hole_port}"
    # Every connection whose pick was the dead upstream was refused there and timed out
    # at the hole; those whose pick was the hole timed out there.
    refused = metrics.get(CONNECT_ERRORS, default=0, upstream=dead, reason="refused")
    timeouts = metrics.get(CONNECT_ERRORS, default=0, upstream=holed, reason="timeout")
    assert abs(refused - total / 2) <= 1, f"{refused} refused of {total}"
    assert abs(timeouts - total * 3 / 4) <= 1, f"{timeouts} timed out of {total}"
    assert metrics.get(CONNECT_ERRORS) == refused + timeouts
    await settle(relay)


# ----- 7. a reset while the relay is not watching the client ---------------------------


async def wait_for_reset(sock: trio.socket.SocketType, timeout: float) -> bool:
    """Has a reset reached `sock` within `timeout` seconds? (Without sending anything.)"""
    with trio.move_on_after(timeout):
        while tcp_state(sock) != TCP_CLOSE:
            await trio.sleep(0.01)
        return True
    return False


async def test_client_reset_while_waiting_on_the_upstream_is_noticed_when_it_sends(
    relay_factory,
):
    request_size, reply_size = 10 * KiB, 64 * KiB
    got: dict[str, object] = {}
    request_in = trio.Event()
    send_now = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        got["request"] = await receive_all(stream)
        request_in.set()
        await send_now.wait()
        # BrokenResourceError: the relay noticed the client's reset early, also right.
        with contextlib.suppress(trio.BrokenResourceError):
            await send_payload(stream, seed=71, total=reply_size)
        # Nothing more is sent from here, so a reset that arrives now is the relay's
        # own, passed on; a graceful close would leave this end in CLOSE_WAIT.
        got["reset"] = await wait_for_reset(stream.socket, 5)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        relay, listen_port = await relay_in_front_of(nursery, relay_factory, "late", upstream)
        with trio.fail_after(20):
            stream = await connect(listen_port)
            await send_payload(stream, seed=70, total=request_size)
            await stream.send_eof()
            # The request and its FIN are through: client -> upstream is done, and the
            # relay now waits only on the upstream.
            await request_in.wait()
            reset(stream)
            # The reset client socket reports HUP and ERR for as long as it stays open;
            # a relay that kept it in the epoll set would spin on it.
            await assert_relay_idles(relay, "with a reset client nobody reads", window=1.0)
            send_now.set()
            await wait_for_key(got, "reset")
        nursery.cancel_scope.cancel()

    assert got["request"] == expected_transfer(70, request_size)
    assert got["reset"], "the upstream was closed without a reset (or not at all)"
    await wait_for_outcomes(relay, {"client_reset": 1})
    assert byte_totals(relay)[0] == request_size
    await settle(relay)


async def test_client_reset_behind_a_stalled_upload_is_passed_on_as_a_reset(relay_factory):
    size = 16 * MiB
    got: dict[str, tuple[str, int]] = {}
    start_reading = trio.Event()
    accepted = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        accepted.set()
        await start_reading.wait()
        received = 0
        try:
            while data := await stream.receive_some(256 * KiB):
                received += len(data)
            how = "reset" if tcp_state(stream.socket) == TCP_CLOSE else "eof"
        except trio.BrokenResourceError:
            how = "reset"
        got["end"] = (how, received)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        relay, listen_port = await relay_in_front_of(nursery, relay_factory, "stalled", upstream)
        previous: list[int] = []

        def stalled() -> bool:
            delivered = byte_totals(relay)[0]
            previous.append(delivered)
            return delivered > 0 and previous[-3:] == [delivered] * 3

        with trio.fail_after(30):
            stream = await connect(listen_port)
            await accepted.wait()
            # More than the relay can get out to an upstream that does not read: its
            # pipe and the upstream socket fill, and the client socket drops out of the
            # epoll set while the rest waits in it.
            async with trio.open_nursery() as upload:
                upload.start_soon(send_payload, stream, 72, size)
                await trio.to_thread.run_sync(poll_until, stalled, 20, "the upload to stall", 0.3)
                upload.cancel_scope.cancel()
            reset(stream)
            await assert_relay_idles(relay, "with a reset client behind a full upstream", 1.0)
            start_reading.set()
            await wait_for_key(got, "end")
        nursery.cancel_scope.cancel()

    how, received = got["end"]
    assert how == "reset", f"the upstream saw a clean EOF after {received} bytes"
    await wait_for_outcomes(relay, {"client_reset": 1})
    await settle(relay)


# ----- 8. urgent data ------------------------------------------------------------------


async def test_urgent_data_neither_stalls_the_stream_nor_spins_the_relay(relay_factory):
    """splice(2) from TCP stops at an urgent (MSG_OOB) mark and says EAGAIN while the
    socket still polls readable: the relay must step over the mark (dropping the urgent
    byte, as a recv-based proxy does) rather than stall the stream and spin on it."""
    got: dict[str, bytes] = {}

    async def upstream(stream: trio.SocketStream) -> None:
        got["upstream"] = await read_to_end(stream)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        relay, listen_port = await relay_in_front_of(nursery, relay_factory, "urgent", upstream)
        with trio.fail_after(15):
            client = trio.socket.socket()
            await client.connect(("127.0.0.1", listen_port))
            await client.send(b"abc")
            await trio.sleep(0.2)
            await client.send(b"!", socket.MSG_OOB)
            await trio.sleep(0.1)
            await client.send(b"def")
            await assert_relay_idles(relay, "after urgent data")
            client.shutdown(socket.SHUT_WR)
            await wait_for_key(got, "upstream")
            client.close()
        nursery.cancel_scope.cancel()

    assert got["upstream"] == b"abcdef"
    await wait_for_outcomes(relay, {"completed": 1})
    await settle(relay)


# ----- 9. a cut that drops bytes is a reset ---------------------------------------------


async def test_idle_cut_with_bytes_still_on_their_way_resets_the_reader(relay_factory):
    """The upstream sends 8 MiB to a client that stops reading; idle_timeout cuts the
    connection while most of it is still in the relay or the upstream's socket. The
    client must see a reset: a FIN would make the truncated stream look complete."""
    size = 8 * MiB

    async def upstream(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await send_payload(stream, seed=900, total=size)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        relay, listen_port = await relay_in_front_of(
            nursery, relay_factory, "cut", upstream, extra="    idle_timeout: 1s\n"
        )
        with trio.fail_after(20):
            stream = await connect(listen_port)
            await wait_for_outcomes(relay, {"idle_timeout": 1})
            ending = await how_it_ended(stream)
            await stream.aclose()
        nursery.cancel_scope.cancel()

    assert ending == "reset"
    await settle(relay)


# ----- the reactor itself, in this process --------------------------------------------


class RecordingHandler:
    """A reactor handler that notes what it was called for."""

    def __init__(self) -> None:
        self.retried = trio.Event()
        self.ready: list[int] = []
        self.failures: list[BaseException] = []

    def on_ready(self, fd: int, events: int) -> None:
        self.ready.append(fd)

    def retry(self) -> None:
        self.retried.set()

    def fail(self, error: BaseException) -> None:
        self.failures.append(error)


async def test_a_retry_asked_for_from_another_task_wakes_an_idle_reactor():
    """A session adopted outside the reactor's task (its upstream connected inside
    connect()) may find no fd for a pipe and ask to be retried. The reactor is then
    waiting on epoll with no timeout and nothing registered: it must still retry."""
    reactor = Reactor()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run)
        await trio.sleep(0.2)  # the reactor's task now waits, without a timer
        handler = RecordingHandler()
        reactor.retry_later(handler)  # from this task, not the reactor's
        with trio.fail_after(2):
            await handler.retried.wait()
        nursery.cancel_scope.cancel()


async def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


class BrokenHandler(RecordingHandler):
    """Raises from on_ready, and again from fail(); then leaves the set."""

    def __init__(self, reactor: Reactor) -> None:
        super().__init__()
        self.reactor = reactor

    def on_ready(self, fd: int, events: int) -> None:
        super().on_ready(fd, events)
        if len(self.ready) == 1:
            raise RuntimeError("a bug in a handler")
        self.reactor.set_interest(fd, select.EPOLLIN, 0, self)

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        raise RuntimeError("a bug in its fail() too")


async def test_a_handler_that_fails_while_failing_does_not_stop_the_reactor():
    reactor = Reactor()
    broken_pair = socket.socketpair()
    good_pair = socket.socketpair()
    try:
        broken = BrokenHandler(reactor)
        good = RecordingHandler()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            reactor.set_interest(broken_pair[0].fileno(), 0, select.EPOLLIN, broken)
            reactor.set_interest(good_pair[0].fileno(), 0, select.EPOLLIN, good)
            broken_pair[1].send(b"x")
            await wait_for(lambda: len(broken.failures) == 1)
            good_pair[1].send(b"y")
            # The reactor still serves the other handler after both exceptions.
            await wait_for(lambda: bool(good.ready))
            assert good.ready[0] == good_pair[0].fileno()
            assert len(broken.ready) == 2  # reported again, and left the set then
            nursery.cancel_scope.cancel()
    finally:
        for sock in (*broken_pair, *good_pair):
            sock.close()


def test_a_loopback_connect_is_known_to_be_done_when_connect_returns():
    """Over loopback the kernel runs the handshake inside connect(): start_connect says
    so (no EPOLLOUT round needed), and a refusal is reported at once, as a refusal."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        target = UpstreamTarget("here", socket.AF_INET, listener.getsockname())
        sock, in_progress = start_connect(target)
        try:
            assert not in_progress
            accepted, _ = listener.accept()
            accepted.sendall(b"hello")
            assert sock.recv(5) == b"hello"
            accepted.close()
        finally:
            sock.close()
    refused = UpstreamTarget("nobody", socket.AF_INET, ("127.0.0.1", refused_port()))
    try:
        start_connect(refused)
    except ConnectError as error:
        assert error.reason == "refused"
    else:
        raise AssertionError("a connect to a port nobody listens on did not fail")
