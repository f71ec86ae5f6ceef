"""Accepting inside the reactor's round (relay/reactor_accept.py), in process.

Real listeners and clients on loopback; accept() errors are injected into the fast
path's one call of accept_client, and time is trio's MockClock, so a back-off is an
exact jump of the clock.
"""

from __future__ import annotations

import errno
import socket

import pytest
import trio
import trio.testing

from splicerelay.config import parse_config
from splicerelay.datapath.session import accept_client
from splicerelay.relay import reactor_accept
from splicerelay.relay.admission import ACCEPT_BACKOFF_SECONDS
from tests.support.fakes import (
    Backend,
    build_relay,
    one_route,
    open_client,
    port_of,
    round_trip,
    route_config,
    route_stats,
    serving,
)


def listener_fd(relay: object, route: str = "web") -> int:
    runtime = next(r for r in relay.runtimes if r.route.name == route)  # type: ignore[attr-defined]
    return int(runtime.listener.fileno())


async def handed_to_the_reactor(relay: object, route: str = "web") -> None:
    """Wait until the route's accept task has put its listener in the reactor's set."""
    with trio.fail_after(5):
        while listener_fd(relay, route) not in relay.reactor._handlers:  # type: ignore[attr-defined]
            await trio.sleep(0.01)


async def test_clients_are_accepted_by_the_reactor_not_the_accept_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While no limit is near, the listener sits in the reactor's epoll set and every
    client is taken there: the accept task waits the whole time."""
    woken = []
    real_serve = reactor_accept.ReactorAccept.serve_in_reactor

    async def counted(self: reactor_accept.ReactorAccept) -> OSError | None:
        woken.append(trio.current_time())
        return await real_serve(self)

    monkeypatch.setattr(reactor_accept.ReactorAccept, "serve_in_reactor", counted)
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(route_config(one_route(backend.port)))
        async with serving(relay):
            await handed_to_the_reactor(relay)
            for n in range(20):
                client = await open_client(port_of(relay))
                assert await round_trip(client, b"hello %d" % n) == b"hello %d" % n
                await client.aclose()
            await outcomes.wait_for(20)
            fd = listener_fd(relay)
            assert fd in relay.reactor._handlers  # (the listener is in the reactor's set)
        nursery.cancel_scope.cancel()
    assert len(woken) == 1  # handed to the reactor once, never handed back
    assert route_stats(relay).outcomes["completed"] == 20


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ECONNABORTED])
async def test_an_accept_error_in_the_reactor_goes_to_the_task(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The reactor hands an accept() error to the task, which backs off (out of a
    resource) or skips it (one connection's error), then gives the listener back."""
    failures = [code]

    def failing_once(sock: socket.socket, family: int) -> tuple[object, object]:
        if failures:
            raise OSError(failures.pop(), "injected")
        return accept_client(sock, family)

    monkeypatch.setattr(reactor_accept, "accept_client", failing_once)
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(route_config(one_route(backend.port)))
        async with serving(relay):
            await handed_to_the_reactor(relay)
            started = trio.current_time()
            client = await open_client(port_of(relay))
            assert await round_trip(client, b"hello") == b"hello"
            waited = trio.current_time() - started
            await client.aclose()
            await outcomes.wait_for(1)
            assert listener_fd(relay) in relay.reactor._handlers  # back in the reactor
        nursery.cancel_scope.cancel()
    assert not failures
    if code == errno.EMFILE:
        assert waited == pytest.approx(ACCEPT_BACKOFF_SECONDS)
    else:
        assert waited < ACCEPT_BACKOFF_SECONDS


async def test_at_max_connections_the_task_holds_clients_in_the_backlog() -> None:
    """A route at its limit leaves the reactor's set: the next client waits in the
    backlog, unaccepted, until a connection ends; then the reactor takes over again."""
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(
            route_config(one_route(backend.port, extra="    max_connections: 1\n"))
        )
        async with serving(relay):
            first = await open_client(port_of(relay))
            assert await round_trip(first, b"one") == b"one"
            second = await open_client(port_of(relay))
            await trio.sleep(0.2)  # bounded look for something that must not happen
            assert len(relay.table) == 1
            assert listener_fd(relay) not in relay.reactor._handlers
            await first.aclose()
            assert await round_trip(second, b"two") == b"two"
            await second.aclose()
            await outcomes.wait_for(2)
            await handed_to_the_reactor(relay)
        nursery.cancel_scope.cancel()


async def test_a_reload_takes_a_removed_routes_listener_out_of_the_reactor_first() -> None:
    """Its fd leaves the epoll set before the listener closes: a new socket that gets
    the same number must not be dispatched to the old route's accept."""
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        kept = one_route(backend.port)
        relay, _outcomes = build_relay(route_config(kept, one_route(backend.port, name="other")))
        async with serving(relay):
            await handed_to_the_reactor(relay)
            await handed_to_the_reactor(relay, "other")
            old_fd = listener_fd(relay, "other")
            await relay.reload(parse_config(route_config(kept), "reload.yaml"))
            handler = relay.reactor._handlers.get(old_fd)
            assert (
                handler is None
                or getattr(handler, "runtime", None) is None
                or (
                    handler.runtime.route.name != "other"  # type: ignore[attr-defined]
                )
            )
            client = await open_client(port_of(relay))
            assert await round_trip(client, b"still") == b"still"
            await client.aclose()
        nursery.cancel_scope.cancel()
