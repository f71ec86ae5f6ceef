"""The zero-copy data path, end to end on real loopback sockets through the real relay.

Every test runs `splicerelay run -c` as a subprocess between trio peers in the test
process; the relay fixture then checks that the relay is back to its fd baseline and
exits 0 on SIGTERM.
"""

from __future__ import annotations

import time

import trio

from tests.support.harness import free_port, poll_until, refused_port, relay_config
from tests.support.peers import (
    Transfer,
    connect,
    expected_transfer,
    receive_all,
    reset,
    send_payload,
    start_server,
)

MiB = 1 << 20


async def test_256_mib_each_way_at_once_arrives_intact_and_all_spliced(relay_factory):
    size = 256 * MiB
    upstream_saw: dict[str, Transfer] = {}
    client_saw: dict[str, Transfer] = {}
    upstream_done = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        async def send() -> None:
            upstream_saw["sent"] = await send_payload(stream, seed=2, total=size)
            await stream.send_eof()

        async def receive() -> None:
            upstream_saw["received"] = await receive_all(stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
        await stream.aclose()
        upstream_done.set()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        stream = await connect(listen_port)

        async def send() -> None:
            client_saw["sent"] = await send_payload(stream, seed=1, total=size)
            await stream.send_eof()

        async def receive() -> None:
            client_saw["received"] = await receive_all(stream)

        async with trio.open_nursery() as transfer:
            transfer.start_soon(send)
            transfer.start_soon(receive)
        await stream.aclose()
        # The client's side ending says nothing of the other direction: wait for it too.
        with trio.fail_after(30):
            await upstream_done.wait()
        nursery.cancel_scope.cancel()

    assert client_saw["sent"] == expected_transfer(1, size)
    assert upstream_saw["received"] == client_saw["sent"]
    assert upstream_saw["sent"] == expected_transfer(2, size)
    assert client_saw["received"] == upstream_saw["sent"]

    def counted() -> bool:
        return relay.metrics().get("splicerelay_connections_total", outcome="completed") == 1

    await trio.to_thread.run_sync(poll_until, counted, 10, "the connection to be counted")
    metrics = relay.metrics()
    for direction in ("client_to_upstream", "upstream_to_client"):
        assert metrics.get("splicerelay_bytes_total", direction=direction, path="splice") == size
        assert metrics.get("splicerelay_bytes_total", direction=direction, path="copy") == 0


async def test_half_close_from_client_still_gets_whole_reply(relay_factory):
    request_size, reply_size = 3 * MiB + 7, 5 * MiB + 3
    seen: dict[str, Transfer] = {}

    async def upstream(stream: trio.SocketStream) -> None:
        # The reply starts only after the request's EOF arrived through the relay.
        seen["request"] = await receive_all(stream)
        await send_payload(stream, seed=11, total=reply_size)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        await relay_factory.astart(relay_config(listen_port, upstream_port))
        stream = await connect(listen_port)
        await send_payload(stream, seed=10, total=request_size)
        await stream.send_eof()
        reply = await receive_all(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()

    assert seen["request"] == expected_transfer(10, request_size)
    assert reply == expected_transfer(11, reply_size)


async def test_half_close_from_upstream_still_gets_whole_reply(relay_factory):
    greeting_size, reply_size = 2 * MiB + 1, 4 * MiB + 9
    seen: dict[str, Transfer] = {}

    async def upstream(stream: trio.SocketStream) -> None:
        # The upstream speaks first and shuts its write side; it must still hear back.
        await send_payload(stream, seed=20, total=greeting_size)
        await stream.send_eof()
        seen["reply"] = await receive_all(stream)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        await relay_factory.astart(relay_config(listen_port, upstream_port))
        stream = await connect(listen_port)
        greeting = await receive_all(stream)
        await send_payload(stream, seed=21, total=reply_size)
        await stream.send_eof()
        with trio.fail_after(10):
            while "reply" not in seen:
                await trio.sleep(0.01)
        await stream.aclose()
        nursery.cancel_scope.cancel()

    assert greeting == expected_transfer(20, greeting_size)
    assert seen["reply"] == expected_transfer(21, reply_size)


async def test_bytes_written_just_before_close_arrive_whole_both_ways(relay_factory):
    size = 1 * MiB + 12345
    received: dict[str, Transfer] = {}
    done = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        role = await stream.receive_some(1)
        if role == b"w":  # the client writes then closes: read everything
            received["upstream"] = await receive_all(stream)
            done.set()
            await stream.aclose()
        else:  # the upstream writes then closes at once, without waiting for anything
            await send_payload(stream, seed=31, total=size)
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        await relay_factory.astart(relay_config(listen_port, upstream_port))

        stream = await connect(listen_port)
        await stream.send_all(b"w")
        await send_payload(stream, seed=30, total=size)
        await stream.aclose()  # a full close straight after the last write
        with trio.fail_after(10):
            await done.wait()

        stream = await connect(listen_port)
        await stream.send_all(b"r")
        received["client"] = await receive_all(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()

    assert received["upstream"] == expected_transfer(30, size)
    assert received["client"] == expected_transfer(31, size)


async def test_refused_upstream_closes_client_promptly_and_is_counted(relay_factory):
    listen_port = free_port()
    dead_port = refused_port()
    relay = await relay_factory.astart(relay_config(listen_port, dead_port))
    stream = await connect(listen_port)
    started = time.monotonic()
    with trio.fail_after(3):
        leftover = await receive_all(stream)
    elapsed = time.monotonic() - started
    await stream.aclose()
    assert leftover.count == 0
    assert elapsed < 1.0

    def counted() -> bool:
        return relay.metrics().get("splicerelay_connections_total", outcome="connect_failed") == 1

    await trio.to_thread.run_sync(poll_until, counted, 5, "the refused connect to be counted")
    metrics = relay.metrics()
    assert (
        metrics.get(
            "splicerelay_upstream_connect_errors_total",
            upstream=f"127.0.0.1:{dead_port}",
            reason="refused",
        )
        == 1
    )
    assert metrics.get("splicerelay_connections_total", outcome="completed") == 0


async def test_refused_upstream_is_skipped_for_the_next_one(relay_factory):
    connections = 6
    served = 0

    async def upstream(stream: trio.SocketStream) -> None:
        nonlocal served
        served += 1
        data = await receive_all(stream)
        await stream.send_all(f"{data.count}".encode())
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        live_port = await start_server(nursery, upstream)
        dead_port = refused_port()
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, dead_port, live_port))
        for index in range(connections):
            stream = await connect(listen_port)
            await stream.send_all(b"x" * (index + 1))
            await stream.send_eof()
            reply = await receive_all(stream, chunk=64)
            await stream.aclose()
            assert reply.count == len(str(index + 1))
        nursery.cancel_scope.cancel()

    assert served == connections
    metrics = relay.metrics()
    assert metrics.get("splicerelay_connections_total", outcome="completed") == connections
    assert metrics.get("splicerelay_connections_total", outcome="connect_failed") == 0
    # Round-robin picks the dead upstream for half of the connections; each of those
    # fails over to the live one.
    assert (
        metrics.get(
            "splicerelay_upstream_connect_errors_total",
            upstream=f"127.0.0.1:{dead_port}",
            reason="refused",
        )
        == connections / 2
    )


async def test_client_reset_ends_both_sides_and_is_counted(relay_factory):
    upstream_result: dict[str, object] = {}
    accepted = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        accepted.set()
        try:
            upstream_result["transfer"] = await receive_all(stream)
        except trio.BrokenResourceError as error:
            upstream_result["error"] = error
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        stream = await connect(listen_port)
        await stream.send_all(b"partial request")
        with trio.fail_after(5):
            await accepted.wait()
        reset(stream)
        with trio.fail_after(5):
            while not upstream_result:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    # The reset is passed on: the upstream sees a reset, not a clean end of stream.
    assert "error" in upstream_result

    def counted() -> bool:
        return relay.metrics().get("splicerelay_connections_total", outcome="client_reset") == 1

    await trio.to_thread.run_sync(poll_until, counted, 5, "the reset to be counted")


async def test_upstream_reset_ends_both_sides_and_is_counted(relay_factory):
    async def upstream(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        reset(stream)

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        stream = await connect(listen_port)
        await stream.send_all(b"hello")
        outcome: object
        with trio.fail_after(5):
            try:
                outcome = await receive_all(stream)
            except trio.BrokenResourceError as error:
                outcome = error
        await stream.aclose()
        nursery.cancel_scope.cancel()

    assert isinstance(outcome, trio.BrokenResourceError)

    def counted() -> bool:
        return relay.metrics().get("splicerelay_connections_total", outcome="upstream_reset") == 1

    await trio.to_thread.run_sync(poll_until, counted, 5, "the reset to be counted")


async def test_slow_reader_keeps_relay_rss_bounded(relay_factory):
    size = 1024 * MiB
    rss_samples: list[int] = []

    async def upstream(stream: trio.SocketStream) -> None:
        # A fast writer: as fast as the relay lets it.
        await send_payload(stream, seed=40, total=size)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))
        baseline_rss = relay.rss()
        stream = await connect(listen_port)

        async def sample_rss() -> None:
            while True:
                rss_samples.append(relay.rss())
                await trio.sleep(0.05)

        nursery.start_soon(sample_rss)
        received = 0
        reads = 0
        while True:
            data = await stream.receive_some(128 << 10)
            if not data:
                break
            received += len(data)
            reads += 1
            if reads % 4 == 0:
                await trio.sleep(0.002)  # the slow reader: far slower than loopback
        await stream.aclose()
        nursery.cancel_scope.cancel()

    assert received == size
    growth = max(rss_samples) - baseline_rss
    assert len(rss_samples) > 10
    assert growth < 20 * MiB, f"relay RSS grew by {growth / MiB:.1f} MiB"


async def test_thousand_concurrent_connections_each_move_one_mib(relay_factory):
    connections = 1000
    size = 1 * MiB
    all_connected = trio.Event()
    go = trio.Event()
    connected = 0
    results: list[tuple[Transfer, Transfer]] = []

    async def echo(stream: trio.SocketStream) -> None:
        while True:
            data = await stream.receive_some(64 << 10)
            if not data:
                break
            await stream.send_all(data)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(relay_config(listen_port, upstream_port))

        async def client(index: int) -> None:
            nonlocal connected
            stream = await connect(listen_port)
            connected += 1
            if connected == connections:
                all_connected.set()
            await go.wait()
            sent: list[Transfer] = []

            async def send() -> None:
                sent.append(await send_payload(stream, seed=1000 + index, total=size))
                await stream.send_eof()

            async with trio.open_nursery() as pair:
                pair.start_soon(send)
                received = await receive_all(stream)
            results.append((sent[0], received))
            await stream.aclose()

        def all_active() -> bool:
            return relay.metrics().get("splicerelay_connections_active") == connections

        with trio.fail_after(240):
            async with trio.open_nursery() as clients:
                for index in range(connections):
                    clients.start_soon(client, index)
                await all_connected.wait()
                # All 1,000 are open in the relay at once before any byte moves.
                await trio.to_thread.run_sync(poll_until, all_active, 30, "1000 active connections")
                go.set()
        nursery.cancel_scope.cancel()

    assert len(results) == connections
    for sent, received in results:
        assert sent.count == size
        assert received == sent
