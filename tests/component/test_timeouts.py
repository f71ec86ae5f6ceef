"""The relay's timers, in process under trio's MockClock: connect timeout, idle timeout,
max duration and the PROXY-header timeout.

The clock autojumps, so an hour-long timeout takes no real time and the moment a
connection ends is exact on trio's clock. Sockets are real, on loopback; an upstream that
never answers is a listener whose accept queue is full (the kernel drops the SYNs).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.support.fakes import (
    Backend,
    Finished,
    build_relay,
    ending_of,
    one_route,
    open_client,
    open_fds,
    port_of,
    round_trip,
    route_config,
    route_stats,
    serving,
)
from tests.support.peers import blackholed_listener, close_blackhole


def elapsed(finished: Finished) -> float:
    return finished.time - finished.started


async def test_connect_timeout_fails_the_connection_and_closes_its_sockets(
    autojump_clock: trio.testing.MockClock,
):
    listener, fillers = blackholed_listener()
    try:
        port = listener.getsockname()[1]
        relay, outcomes = build_relay(route_config(one_route(port, "    connect_timeout: 2s\n")))
        async with serving(relay):
            before = open_fds()
            client = await open_client(port_of(relay))
            [finished] = await outcomes.wait_for(1)
            assert await ending_of(client) == "eof"
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert open_fds() == before  # client and upstream attempt both closed
    finally:
        close_blackhole(listener, fillers)
    assert finished.outcome == "connect_failed"
    # The connect timer looks every connect_timeout / 20.
    assert 2.0 <= elapsed(finished) <= 2.0 + 2.0 / 20 + 1e-9
    stats = route_stats(relay)
    assert stats.outcomes["connect_failed"] == 1
    assert stats.connect_errors[(f"127.0.0.1:{port}", "timeout")] == 1
    assert stats.active == 0


async def test_idle_timeout_ends_a_quiet_connection_with_a_clean_close(
    autojump_clock: trio.testing.MockClock,
):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(
            route_config(one_route(backend.port, "    idle_timeout: 10s\n"))
        )
        async with serving(relay):
            before = open_fds()
            client = await open_client(port_of(relay))
            assert await round_trip(client, b"ping") == b"ping"
            [finished] = await outcomes.wait_for(1)
            # Nothing was in flight: both sides get a FIN, not a reset.
            assert await ending_of(client) == "eof"
            await client.aclose()
            await backend.wait_until(lambda: len(backend.endings) == 1)
            relay.pool.close()  # pooled empty pipes are not the connection's
            assert open_fds() == before
        nursery.cancel_scope.cancel()
    assert finished.outcome == "idle_timeout"
    # The sweep runs every idle_timeout / 10 (at most 1 s).
    assert 10.0 <= elapsed(finished) <= 11.0 + 1e-9
    assert backend.endings == ["eof"]
    assert route_stats(relay).outcomes == {"idle_timeout": 1}


async def test_traffic_postpones_the_idle_timeout(autojump_clock: trio.testing.MockClock):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(
            route_config(one_route(backend.port, "    idle_timeout: 10s\n"))
        )
        async with serving(relay):
            client = await open_client(port_of(relay))
            for _ in range(3):
                assert await round_trip(client, b"ping") == b"ping"
                await trio.sleep(8)
            [finished] = await outcomes.wait_for(1)
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert finished.outcome == "idle_timeout"
    # The last byte moved at 16 s; the timeout runs from the first sweep after it.
    assert 26.0 <= elapsed(finished) <= 27.0 + 1e-9


async def test_max_duration_ends_a_busy_connection(autojump_clock: trio.testing.MockClock):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(
            route_config(one_route(backend.port, "    max_duration: 5s\n    idle_timeout: 1h\n"))
        )
        async with serving(relay):
            client = await open_client(port_of(relay))

            async def chatter() -> None:
                while True:  # busy all along: never idle
                    assert await round_trip(client, b"ping") == b"ping"
                    await trio.sleep(0.3)

            async with trio.open_nursery() as chatting:
                chatting.start_soon(chatter)
                [finished] = await outcomes.wait_for(1)
                chatting.cancel_scope.cancel()
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert finished.outcome == "max_duration"
    # The sweep runs every max_duration / 10 when that is the shortest.
    assert 5.0 <= elapsed(finished) <= 5.5 + 1e-9
    stats = route_stats(relay)
    assert stats.outcomes == {"max_duration": 1}
    assert stats.client_to_upstream.splice + stats.client_to_upstream.copy >= 4 * 16


@pytest.mark.parametrize(
    "sent",
    [b"", b"PROXY TCP4 192.0.2.1 ", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11"],
    ids=["nothing", "half-v1", "half-v2"],
)
async def test_proxy_header_timeout_turns_the_client_away(
    autojump_clock: trio.testing.MockClock, sent: bytes
):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        extra = "    accept_proxy_protocol: true\n    proxy_protocol_timeout: 3s\n"
        relay, outcomes = build_relay(route_config(one_route(backend.port, extra)))
        async with serving(relay):
            before = open_fds()
            client = await open_client(port_of(relay))
            if sent:
                await client.send_all(sent)
            [finished] = await outcomes.wait_for(1)
            assert await ending_of(client) == "eof"
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert open_fds() == before
        nursery.cancel_scope.cancel()
    assert finished.outcome == "bad_proxy_header"
    assert elapsed(finished) == pytest.approx(3.0)
    assert backend.accepted == 0  # never connected upstream
    stats = route_stats(relay)
    assert stats.outcomes == {"bad_proxy_header": 1}
    assert stats.active == 0
