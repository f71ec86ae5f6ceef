"""Setting up an admitted connection: the relay's own bugs against peers' failures.

A bug is injected into one step (monkeypatched to raise). The connection must end as
`internal_error`, never as a peer's outcome such as `upstream_reset`, with the traceback
in the log, both peers reset, no fd left behind, and the relay still serving the next
client. A genuine peer failure keeps its peer outcome, without a traceback.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from splicerelay.datapath import reactor as reactor_module
from splicerelay.datapath.session import Session
from splicerelay.relay import connection_setup
from tests.support.fakes import (
    Backend,
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


class InjectedBug(Exception):
    pass


def raise_injected(*args: object, **kwargs: object) -> None:
    raise InjectedBug("injected")


def tracebacks(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.getMessage() == message
        and record.exc_info is not None
        and isinstance(record.exc_info[1], InjectedBug)
    ]


async def serves_after(relay_port: int) -> bool:
    client = await open_client(relay_port)
    try:
        return await round_trip(client, b"still here") == b"still here"
    finally:
        await client.aclose()


async def test_a_bug_while_admitting_is_an_internal_error(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(route_config(one_route(backend.port)))
        monkeypatch.setattr(relay.setup, "_admit_and_connect", raise_injected)
        before = open_fds()
        # Connected before the relay serves, so that the reset comes after the handshake.
        client = await open_client(port_of(relay))
        async with serving(relay):
            [finished] = await outcomes.wait_for(1)
            assert await ending_of(client) == "reset"
            await client.aclose()
            assert open_fds() == before
            monkeypatch.undo()
            assert await serves_after(port_of(relay))
            await outcomes.wait_for(2)
        nursery.cancel_scope.cancel()
    assert finished.outcome == "internal_error"
    assert route_stats(relay).outcomes == {"internal_error": 1, "completed": 1}
    assert len(tracebacks(caplog, "session failed unexpectedly")) == 1


async def test_a_bug_while_reading_the_proxy_header_is_an_internal_error(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    async def broken_receive(*args: object) -> None:
        raise InjectedBug("injected")

    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        extra = "    accept_proxy_protocol: true\n"
        relay, outcomes = build_relay(route_config(one_route(backend.port, extra)))
        monkeypatch.setattr(connection_setup, "receive_proxy_header", broken_receive)
        async with serving(relay):
            before = open_fds()
            client = await open_client(port_of(relay))
            await client.send_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 80\r\n")
            [finished] = await outcomes.wait_for(1)
            assert await ending_of(client) == "reset"
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert open_fds() == before
        nursery.cancel_scope.cancel()
    assert finished.outcome == "internal_error"
    assert route_stats(relay).outcomes == {"internal_error": 1}
    assert len(tracebacks(caplog, "session failed unexpectedly")) == 1
    assert backend.accepted == 0


async def test_a_bug_after_connecting_is_an_internal_error_and_resets_both_peers(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(route_config(one_route(backend.port)))
        monkeypatch.setattr(relay.setup, "_relay", raise_injected)
        before = open_fds()
        client = await open_client(port_of(relay))
        async with serving(relay):
            [finished] = await outcomes.wait_for(1)
            assert await ending_of(client) == "reset"
            await client.aclose()
            await backend.wait_until(lambda: len(backend.endings) == 1)
            assert open_fds() == before
            monkeypatch.undo()
            assert await serves_after(port_of(relay))
            await outcomes.wait_for(2)
        nursery.cancel_scope.cancel()
    assert finished.outcome == "internal_error"
    assert backend.endings[0] == "reset"  # not a FIN that looks like a clean end
    stats = route_stats(relay)
    assert stats.outcomes == {"internal_error": 1, "completed": 1}
    assert stats.outcomes["upstream_reset"] == 0
    assert len(tracebacks(caplog, "session failed unexpectedly")) == 1
    assert all(upstream.active == 0 for upstream in stats.upstreams.values())


async def test_a_bug_in_the_data_path_is_an_internal_error(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    """The reactor's safety net: a session's handler raises mid-transfer."""
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(route_config(one_route(backend.port)))
        async with serving(relay):
            before = open_fds()
            client = await open_client(port_of(relay))
            assert await round_trip(client, b"fine so far") == b"fine so far"
            monkeypatch.setattr(Session, "on_ready", raise_injected)
            await client.send_all(b"and now")
            [finished] = await outcomes.wait_for(1)
            monkeypatch.undo()
            assert await ending_of(client) == "reset"
            await client.aclose()
            await backend.wait_until(lambda: len(backend.endings) == 1)
            relay.pool.close()
            assert open_fds() == before
            assert await serves_after(port_of(relay))
            await outcomes.wait_for(2)
        nursery.cancel_scope.cancel()
    assert finished.outcome == "internal_error"
    assert backend.endings[0] == "reset"
    assert route_stats(relay).outcomes == {"internal_error": 1, "completed": 1}
    assert len(tracebacks(caplog, "connection failed unexpectedly")) == 1


async def test_an_upstream_that_will_not_take_the_proxy_header_stays_upstream_reset(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    """The peer's doing, not a bug: a header the upstream's window cannot take at once
    (here one far larger than any socket buffer) ends the connection as upstream_reset,
    without a traceback."""

    def huge_header(*args: object) -> bytes:
        return b"\0" * (32 << 20)

    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        extra = "    proxy_protocol: v1\n"
        relay, outcomes = build_relay(route_config(one_route(backend.port, extra)))
        monkeypatch.setattr(connection_setup, "build_proxy_header", huge_header)
        client = await open_client(port_of(relay))
        async with serving(relay):
            [finished] = await outcomes.wait_for(1)
            assert await ending_of(client) == "reset"
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert finished.outcome == "upstream_reset"
    assert route_stats(relay).outcomes == {"upstream_reset": 1}
    assert not [record for record in caplog.records if record.exc_info is not None]


async def test_a_bug_while_connecting_is_an_internal_error_not_a_connect_failure(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
):
    """The reactor's safety net ends a connector whose callback raised (a bug of ours):
    the connection is not the upstreams' refusal, and no upstream is blamed for it."""
    listener, fillers = blackholed_listener()  # the attempt stays in the reactor
    try:
        port = listener.getsockname()[1]
        relay, outcomes = build_relay(route_config(one_route(port, "    connect_timeout: 60s\n")))
        async with serving(relay):
            before = open_fds()
            client = await open_client(port_of(relay))
            while not relay.table.connecting:
                await trio.sleep(0.001)
            [connector] = relay.table.connecting
            try:  # what the reactor does when a handler's on_ready raises
                raise_injected()
            except InjectedBug as bug:
                reactor_module._fail(connector, bug)
            [finished] = await outcomes.wait_for(1)
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert open_fds() == before
    finally:
        close_blackhole(listener, fillers)
    assert finished.outcome == "internal_error"
    stats = route_stats(relay)
    assert stats.outcomes == {"internal_error": 1}
    assert sum(stats.connect_errors.values()) == 0
    assert len(tracebacks(caplog, "connection failed unexpectedly")) == 1
