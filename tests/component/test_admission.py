"""Admission, in process: accept() failures, connection limits and fd headroom.

The relay runs in the test's trio run on real loopback sockets, with trio's MockClock
(autojump): time moves only when every task waits, so a back-off shows up as an exact
jump of the clock and a busy loop as a pile of accept() calls at one instant. accept()
failures come from a scripted listener; the fd count from a fixed function.
"""

from __future__ import annotations

import errno
import logging

import pytest
import trio
import trio.testing

from splicerelay.relay.admission import (
    ACCEPT_BACKOFF_SECONDS,
    ACCEPT_CONNECTION_ERRORS,
    ACCEPT_RESOURCE_ERRORS,
    FD_RESERVE,
)
from tests.support.fakes import (
    Backend,
    ScriptedListeners,
    build_relay,
    ending_of,
    has_nothing_to_read,
    one_route,
    open_client,
    port_of,
    receive,
    round_trip,
    route_config,
    route_stats,
    serving,
)

RESOURCE_ERRORS = sorted(ACCEPT_RESOURCE_ERRORS)
CONNECTION_ERRORS = sorted(ACCEPT_CONNECTION_ERRORS)


def names(codes: list[int]) -> list[str]:
    return [errno.errorcode[code] for code in codes]


@pytest.mark.parametrize("code", RESOURCE_ERRORS, ids=names(RESOURCE_ERRORS))
async def test_accept_backs_off_on_resource_errors_then_serves(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, code: int
):
    """Out of a resource: wait ACCEPT_BACKOFF_SECONDS per failure, not a busy loop; a
    connection aborted in the queue is skipped at once; the waiting client is served."""
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(route_config(one_route(backend.port)))
        script = ScriptedListeners(code, code, code, errno.ECONNABORTED)
        relay.admission.listener_for = script
        # Connected before the relay serves: the client waits in the kernel's backlog.
        client = await open_client(port_of(relay))
        with caplog.at_level(logging.INFO, logger="splicerelay"):
            async with serving(relay):
                assert await round_trip(client, b"hello") == b"hello"
                await client.aclose()
                await outcomes.wait_for(1)
        nursery.cancel_scope.cancel()
    calls = script.made[0].calls
    start = calls[0][0]
    name = errno.errorcode[code]
    assert [what for _, what in calls[:5]] == [name, name, name, "ECONNABORTED", "accepted"]
    offsets = [time - start for time, _ in calls[:5]]
    backoff = ACCEPT_BACKOFF_SECONDS
    assert offsets == pytest.approx([0, backoff, 2 * backoff, 3 * backoff, 3 * backoff])
    assert len(calls) <= 6, calls  # then one look at an empty queue, and a wait
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("accept failed, backing off") == 1  # once per storm
    assert "accept resumed" in messages
    assert route_stats(relay).outcomes["completed"] == 1


@pytest.mark.parametrize("code", CONNECTION_ERRORS, ids=names(CONNECTION_ERRORS))
async def test_accept_skips_a_failed_connection_without_waiting(
    autojump_clock: trio.testing.MockClock, code: int
):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, _outcomes = build_relay(route_config(one_route(backend.port)))
        script = ScriptedListeners(code, code)
        relay.admission.listener_for = script
        client = await open_client(port_of(relay))
        async with serving(relay):
            assert await round_trip(client, b"hello") == b"hello"
            await client.aclose()
        nursery.cancel_scope.cancel()
    calls = script.made[0].calls
    name = errno.errorcode[code]
    assert [what for _, what in calls[:3]] == [name, name, "accepted"]
    assert calls[2][0] == calls[0][0], "no back-off for one connection's failure"


async def test_an_unexpected_accept_error_ends_serving_with_that_error(
    autojump_clock: trio.testing.MockClock,
):
    """EBADF is not a passing condition: retrying would spin. serve() ends, promptly,
    with the error and the route it happened on, instead of hanging."""
    relay, _outcomes = build_relay(route_config(one_route(9)))
    script = ScriptedListeners(errno.EBADF)
    relay.admission.listener_for = script

    def is_ebadf(error: OSError) -> bool:
        return error.errno == errno.EBADF and "accepting on route web" in error.__notes__

    with (
        trio.fail_after(5),
        pytest.RaisesGroup(pytest.RaisesExc(OSError, check=is_ebadf), flatten_subgroups=True),
    ):
        await relay.serve()
    assert len(script.made[0].calls) == 1
    assert not relay.serving


async def test_route_max_connections_keeps_clients_in_the_backlog(
    autojump_clock: trio.testing.MockClock,
):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(
            route_config(one_route(backend.port, "    max_connections: 2\n"))
        )
        async with serving(relay):
            port = port_of(relay)
            first, second = await open_client(port), await open_client(port)
            assert await round_trip(first, b"1") == b"1"
            assert await round_trip(second, b"2") == b"2"
            third = await open_client(port)  # the kernel completes its handshake
            await third.send_all(b"3")
            await trio.sleep(5)  # five seconds at the limit
            await trio.testing.wait_all_tasks_blocked()
            assert relay.active_sessions == 2
            assert backend.accepted == 2
            assert has_nothing_to_read(third)
            await first.aclose()  # its slot goes to the client in the backlog
            assert (await receive(third)) == b"3"
            stats = route_stats(relay)
            assert stats.limited_seconds >= 5
            await outcomes.wait_for(1)
            for client in (second, third):
                await client.aclose()
            await outcomes.wait_for(3)
        nursery.cancel_scope.cancel()
    assert stats.outcomes["completed"] == 3
    assert stats.active == 0


async def test_global_max_connections_counts_every_route(
    autojump_clock: trio.testing.MockClock,
):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        config = route_config(
            one_route(backend.port, name="a"),
            one_route(backend.port, name="b"),
            top="max_connections: 2\n",
        )
        relay, outcomes = build_relay(config)
        async with serving(relay):
            on_a = await open_client(port_of(relay, "a"))
            on_b = await open_client(port_of(relay, "b"))
            assert await round_trip(on_a, b"a") == b"a"
            assert await round_trip(on_b, b"b") == b"b"
            waiting = await open_client(port_of(relay, "a"))
            await waiting.send_all(b"w")
            await trio.sleep(3)
            await trio.testing.wait_all_tasks_blocked()
            assert relay.active_sessions == 2
            assert has_nothing_to_read(waiting)
            await on_b.aclose()  # a slot on route b frees one for route a
            assert (await receive(waiting)) == b"w"
            assert relay.stats.global_limited_seconds >= 3
            assert route_stats(relay, "a").limited_seconds == 0  # not the route's limit
            for client in (on_a, waiting):
                await client.aclose()
            await outcomes.wait_for(3)
        nursery.cancel_scope.cancel()
    assert [route_stats(relay, r).outcomes["completed"] for r in "ab"] == [2, 1]


async def test_per_source_limit_turns_away_the_extra_connection_of_one_address(
    autojump_clock: trio.testing.MockClock,
):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(
            route_config(one_route(backend.port, "    max_connections_per_source: 1\n"))
        )
        async with serving(relay):
            port = port_of(relay)
            held = await open_client(port, source="127.0.0.1")
            assert await round_trip(held, b"x") == b"x"
            extra = await open_client(port, source="127.0.0.1")
            assert await ending_of(extra) == "eof"
            [turned_away] = await outcomes.wait_for(1)
            assert turned_away.outcome == "source_limit"
            other = await open_client(port, source="127.0.0.2")
            assert await round_trip(other, b"y") == b"y"
            await held.aclose()
            await outcomes.wait_for(2)
            again = await open_client(port, source="127.0.0.1")  # its count was given back
            assert await round_trip(again, b"z") == b"z"
            for client in (extra, other, again):
                await client.aclose()
            await outcomes.wait_for(4)
        nursery.cancel_scope.cancel()
    stats = route_stats(relay)
    assert stats.outcomes["source_limit"] == 1
    assert stats.outcomes["completed"] == 3
    assert backend.accepted == 3


async def test_accepting_pauses_near_the_fd_limit_and_resumes_with_room(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
):
    """Each connection counts two fds (and pipes theirs): with fds for about
    FD_RESERVE/2 + slack connections above the reserve, the next client waits in the
    backlog, until connections end and leave 2 * FD_RESERVE free again."""
    base, slack = 1000, 4
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(
            route_config(one_route(backend.port)),
            fd_limit=base + 2 * FD_RESERVE + 2 * slack,
            count_fds=lambda: base,
        )
        with caplog.at_level(logging.WARNING, logger="splicerelay"):
            async with serving(relay):
                port = port_of(relay)
                held: list[trio.SocketStream] = []
                for _ in range(2 * FD_RESERVE):
                    client = await open_client(port)
                    await trio.testing.wait_all_tasks_blocked()
                    if backend.accepted == len(held):
                        break  # not accepted: the one that waits
                    held.append(client)
                late = client
                assert FD_RESERVE // 2 <= len(held) <= FD_RESERVE // 2 + slack + 1
                assert relay.admission.fd_pauses == 1
                await late.send_all(b"late")
                await trio.sleep(1)  # still paused a second later
                await trio.testing.wait_all_tasks_blocked()
                assert relay.active_sessions == len(held)
                assert has_nothing_to_read(late)
                for client in held:
                    await client.aclose()
                assert (await receive(late)) == b"late"
                await late.aclose()
                await outcomes.wait_for(len(held) + 1)
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings.count("near the open-file limit: pausing accepts") == 1
    assert route_stats(relay).outcomes["completed"] == len(held) + 1
