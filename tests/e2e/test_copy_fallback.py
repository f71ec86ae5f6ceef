"""The user-space copy fallback, when the kernel refuses splice(2)."""

from __future__ import annotations

import sys

import pytest
import trio

from tests.support import without_splice
from tests.support.harness import free_port, poll_until, relay_config
from tests.support.peers import (
    Transfer,
    connect,
    expected_transfer,
    receive_all,
    send_payload,
    start_server,
)

MiB = 1 << 20


async def exchange(relay_factory, size: int, **start_options: object):  # type: ignore[no-untyped-def]
    got: dict[str, Transfer] = {}
    upstream_done = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await send_payload(stream, seed=51, total=size)
                await stream.send_eof()

            nursery.start_soon(send)
            got["upstream"] = await receive_all(stream)
        await stream.aclose()
        upstream_done.set()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(listen_port, upstream_port), **start_options
        )
        stream = await connect(listen_port)
        async with trio.open_nursery() as pair:

            async def send() -> None:
                await send_payload(stream, seed=50, total=size)
                await stream.send_eof()

            pair.start_soon(send)
            got["client"] = await receive_all(stream)
        await stream.aclose()
        # The client's side ending says nothing of the other direction: wait for it too.
        with trio.fail_after(10):
            await upstream_done.wait()
        nursery.cancel_scope.cancel()

    assert got["upstream"] == expected_transfer(50, size)
    assert got["client"] == expected_transfer(51, size)

    def counted() -> bool:
        return relay.metrics().get("splicerelay_connections_total", outcome="completed") == 1

    await trio.to_thread.run_sync(poll_until, counted, 5, "the connection to be counted")
    return relay


@pytest.mark.skipif(not without_splice.supported(), reason="no seccomp filter for this machine")
async def test_kernel_refusing_splice_falls_back_to_copy_and_counts_it(relay_factory):
    size = 8 * MiB + 5
    relay = await exchange(
        relay_factory, size, prefix=[sys.executable, "-m", "tests.support.without_splice"]
    )
    metrics = relay.metrics()
    for direction in ("client_to_upstream", "upstream_to_client"):
        assert metrics.get("splicerelay_bytes_total", direction=direction, path="copy") == size
        assert metrics.get("splicerelay_bytes_total", direction=direction, path="splice") == 0


async def test_forced_copy_moves_bytes_in_user_space_and_counts_them(relay_factory):
    size = 4 * MiB + 1
    relay = await exchange(relay_factory, size, env={"SPLICERELAY_FORCE_COPY": "1"})
    metrics = relay.metrics()
    for direction in ("client_to_upstream", "upstream_to_client"):
        assert metrics.get("splicerelay_bytes_total", direction=direction, path="copy") == size
        assert metrics.get("splicerelay_bytes_total", direction=direction, path="splice") == 0
    assert '"data_path": "copy"' in relay.stderr()
