"""Soak: mixed traffic through the real relay for a long time; RSS and fds must stay flat.

Not collected by a plain `pytest` run (the file is not named test_*.py) and marked slow.
Run it explicitly:

    pytest tests/e2e/soak.py -m slow -s

SOAK_SECONDS sets the duration (default 600). Bulk transfers (sha256-checked both ways),
short request/response connections and connection churn (clean closes and resets) run
side by side on loopback. The relay's RSS and fd count are sampled every 5 s and the
series is printed. Asserted: every transfer and reply intact; RSS at the end at most
10 MiB above RSS after the first minute (the midpoint for a run shorter than two
minutes); and, once the traffic stops, fds back to the startup baseline.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import trio

from tests.support.harness import Relay, free_port, relay_config
from tests.support.peers import Transfer, connect, receive_all, send_payload, start_server

MiB = 1 << 20
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SAMPLE_INTERVAL = 5.0
MAX_RSS_GROWTH = 10 * MiB
OPERATION_TIMEOUT = 60.0

BULK, REQUEST, CHURN = b"B", b"R", b"C"
BULK_TAG = struct.Struct("!II")
REQUEST_SIZE = 200
REQUESTS_PER_CONNECTION = 50


@dataclass
class Sample:
    seconds: float
    rss: int
    fds: int
    active: int


async def read_exactly(stream: trio.SocketStream, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class MixedUpstream:
    """One upstream for all three kinds of traffic; the first byte says which."""

    def __init__(self) -> None:
        self.bulk_received: dict[int, Transfer] = {}
        self.bulk_replied: dict[int, Transfer] = {}

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            kind = await read_exactly(stream, 1)
            if kind == BULK:
                await self.bulk(stream)
            elif kind == REQUEST:
                await self.requests(stream)
            # CHURN, or nothing at all: close.
        except trio.BrokenResourceError:
            pass  # churn with RST

    async def bulk(self, stream: trio.SocketStream) -> None:
        tag = await read_exactly(stream, BULK_TAG.size)
        assert tag is not None
        seed, size = BULK_TAG.unpack(tag)

        async def reply() -> None:
            self.bulk_replied[seed] = await send_payload(stream, seed + 1, size)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reply)
            self.bulk_received[seed] = await receive_all(stream)

    async def requests(self, stream: trio.SocketStream) -> None:
        for _ in range(REQUESTS_PER_CONNECTION):
            request = await read_exactly(stream, REQUEST_SIZE)
            if request is None:
                return
            await stream.send_all(request[::-1])


async def bulk_transfer(port: int, seed: int, size: int) -> tuple[Transfer, Transfer]:
    """`size` bytes each way at once; returns what was sent and what came back."""
    async with await connect(port) as stream:
        sent: list[Transfer] = []

        async def send() -> None:
            await stream.send_all(BULK + BULK_TAG.pack(seed, size))
            sent.append(await send_payload(stream, seed, size))
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            received = await receive_all(stream)
        return sent[0], received


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 300)
async def test_soak_mixed_traffic_keeps_rss_and_fds_flat(relay_factory):
    upstream = MixedUpstream()
    counts: Counter[str] = Counter()
    # seed -> (what the client sent, what came back to it); compared by sha256 with
    # what the upstream received and sent, instead of regenerating every payload.
    bulk_sent: dict[int, tuple[Transfer, Transfer]] = {}
    samples: list[Sample] = []
    started = time.monotonic()
    deadline = started + SOAK_SECONDS

    async def bulk_worker(worker: int) -> None:
        for round_ in range(1_000_000):
            if time.monotonic() >= deadline:
                return
            seed = 2 * (worker * 1_000_000 + round_)
            size = (1 + round_ % 8) * MiB + round_
            with trio.fail_after(OPERATION_TIMEOUT):
                sent, received = await bulk_transfer(listen_port, seed, size)
            assert sent.count == size
            bulk_sent[seed] = (sent, received)
            counts["bulk"] += 1

    async def request_worker(worker: int) -> None:
        for round_ in range(1_000_000):
            if time.monotonic() >= deadline:
                return
            with trio.fail_after(OPERATION_TIMEOUT):
                async with await connect(listen_port) as stream:
                    await stream.send_all(REQUEST)
                    for index in range(REQUESTS_PER_CONNECTION):
                        request = bytes((worker + round_ + index + n) % 256 for n in range(200))
                        await stream.send_all(request)
                        reply = await read_exactly(stream, REQUEST_SIZE)
                        if reply != request[::-1]:
                            counts["bad reply"] += 1
                        counts["request"] += 1
            counts["request connection"] += 1

    async def churn_worker(worker: int) -> None:
        for round_ in range(10_000_000):
            if time.monotonic() >= deadline:
                return
            with trio.fail_after(OPERATION_TIMEOUT):
                sock = trio.socket.socket()
                try:
                    await sock.connect(("127.0.0.1", listen_port))
                    if round_ % 2:
                        # Why SO_LINGER 0: close() then sends RST instead of FIN.
                        linger = struct.pack("ii", 1, 0)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    else:
                        await sock.send(CHURN)
                finally:
                    sock.close()
            counts["churn"] += 1
            await trio.sleep(0.005)

    def sample(relay: Relay) -> Sample:
        active = int(relay.metrics().get("splicerelay_connections_active"))
        return Sample(time.monotonic() - started, relay.rss(), relay.fds(), active)

    async def sampler(relay: Relay) -> None:
        for _ in range(int(SOAK_SECONDS / SAMPLE_INTERVAL) + 2):
            samples.append(await trio.to_thread.run_sync(sample, relay))
            if time.monotonic() >= deadline:
                return
            await trio.sleep(SAMPLE_INTERVAL)

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream.handle)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        started = time.monotonic()
        deadline = started + SOAK_SECONDS
        with trio.fail_after(SOAK_SECONDS + 2 * OPERATION_TIMEOUT):
            async with trio.open_nursery() as work:
                work.start_soon(sampler, relay)
                for worker in range(2):
                    work.start_soon(bulk_worker, worker)
                for worker in range(4):
                    work.start_soon(request_worker, worker)
                for worker in range(2):
                    work.start_soon(churn_worker, worker)
        # Settled: no connection active and no fd above baseline but the pool's pipes.
        await trio.to_thread.run_sync(relay.wait_settled, 30)
        final = await trio.to_thread.run_sync(sample, relay)
        held = await trio.to_thread.run_sync(relay.fds_held_for_connections)
        nursery.cancel_scope.cancel()

    print(f"\nsoak {SOAK_SECONDS:.0f}s: {dict(counts)}")
    print("   t(s)   RSS(KiB)   fds  active")
    for point in [*samples, final]:
        print(f"{point.seconds:7.1f} {point.rss // 1024:10d} {point.fds:5d} {point.active:7d}")

    damaged = [
        seed
        for seed, (sent, received) in bulk_sent.items()
        if received != upstream.bulk_replied.get(seed) or upstream.bulk_received.get(seed) != sent
    ]
    assert not damaged, f"damaged bulk transfers: {damaged[:10]}"
    assert counts["bad reply"] == 0
    assert counts["bulk"] > 0 and counts["request"] > 0 and counts["churn"] > 0

    reference_time = 60.0 if SOAK_SECONDS >= 120 else SOAK_SECONDS / 2
    reference = min(samples, key=lambda point: abs(point.seconds - reference_time))
    growth = final.rss - reference.rss
    assert growth < MAX_RSS_GROWTH, (
        f"RSS grew {growth / MiB:.1f} MiB from {reference.seconds:.0f}s to the end"
    )
    assert held <= 0, f"{held} fds above baseline after the traffic stopped"
    assert "Traceback" not in relay.stderr()
