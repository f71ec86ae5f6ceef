"""The connector: non-blocking connects on the shared reactor, failing over in order.

Upstreams are real loopback ports: one that refuses is bound and never listens (kept
bound for the test, so nobody else takes it), one that never answers is a listener with
a full accept queue (the kernel drops the SYNs). Over loopback the kernel finishes a
handshake, or its refusal, inside connect() itself; the one staged thing is a connect
that is still in progress when connect() returns, as one to a remote host would be: the
socket, its handshake and its SO_ERROR are the kernel's own, only the "not finished
yet" is staged, so that the reactor path (EPOLLOUT, then SO_ERROR) is taken for real.
"""

from __future__ import annotations

import _socket
import errno
import logging
import select
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio
import trio.testing

from splicerelay.bench.procs import free_port
from splicerelay.config.addresses import UnixAddress
from splicerelay.config.model import Upstream
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import UpstreamTarget
from splicerelay.datapath.stats import UpstreamStats
from splicerelay.protocol.balancer import HealthState
from splicerelay.relay import connector as connector_module
from splicerelay.relay.connector import CONNECT_INTEREST, Connector
from splicerelay.relay.upstreams import UpstreamRuntime
from tests.support.fakes import build_relay, ending_of, open_client, port_of, serving
from tests.support.fakes import route_config as relay_config
from tests.support.peers import blackholed_listener
from tests.support.scripted import (
    bound_port,
    close_idle_reactor,
    listening_port,
    refusing_port,
    registered,
    turn,
    upstream_at,
    wait_readable,
)

TIMEOUT = 2.0


class Attempts:
    """A connector over some upstreams, and what it reported."""

    def __init__(
        self,
        reactor: Reactor,
        upstreams: Sequence[UpstreamRuntime],
        order: Sequence[int] | None = None,
        passive_health: bool = False,
    ) -> None:
        self.upstreams = upstreams
        self.errors: Counter[tuple[str, str]] = Counter()
        self.reports: list[tuple[_socket.socket | None, UpstreamRuntime | None]] = []
        self.connector = Connector(
            upstreams,
            list(range(len(upstreams))) if order is None else order,
            TIMEOUT,
            passive_health,
            self.errors,
            reactor,
            "web",
            self.done,
        )

    def done(self, sock: _socket.socket | None, upstream: UpstreamRuntime | None) -> None:
        self.reports.append((sock, upstream))

    def close(self) -> None:
        for sock, _ in self.reports:
            if sock is not None:
                sock.close()
        self.connector.abort()


@pytest.fixture
async def reactor() -> AsyncIterator[Reactor]:
    reactor = Reactor()
    yield reactor
    close_idle_reactor(reactor)


@pytest.fixture
def ports() -> Iterator[ExitStack]:
    """Sockets holding ports for the test, closed after it."""
    with ExitStack() as stack:
        yield stack


def refusing(ports) -> socket.socket:
    return ports.enter_context(refusing_port())


def listening(ports) -> socket.socket:
    return ports.enter_context(listening_port())


def label(sock: socket.socket) -> str:
    return f"127.0.0.1:{bound_port(sock)}"


@pytest.fixture
def in_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connect is reported "still in progress", as to a remote host."""

    def start_connect(target: UpstreamTarget) -> tuple[_socket.socket, bool]:
        sock = _socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        status = sock.connect_ex(target.sockaddr)
        # The kernel has already settled it (loopback); SO_ERROR keeps the verdict.
        assert status == errno.EINPROGRESS, errno.errorcode.get(status, status)
        return sock, True

    monkeypatch.setattr(connector_module, "start_connect", start_connect)


# ----- failover -----------------------------------------------------------------------


async def test_a_refused_upstream_fails_over_to_the_next_in_order(
    reactor: Reactor, ports: ExitStack
):
    dead, alive = refusing(ports), listening(ports)
    attempts = Attempts(reactor, [upstream_at(bound_port(dead)), upstream_at(bound_port(alive))])
    try:
        attempts.connector.start(trio.current_time())
        [(sock, upstream)] = attempts.reports
        assert upstream is attempts.upstreams[1] and sock is not None
        assert sock.getpeername() == alive.getsockname()
        wait_readable(alive)
        alive.accept()[0].close()  # the handshake really completed
        assert attempts.errors == {(label(dead), "refused"): 1}
        assert attempts.upstreams[0].stats.connect_seconds.count == 0
        assert attempts.upstreams[1].stats.connect_seconds.count == 1
    finally:
        attempts.close()


async def test_every_upstream_refusing_fails_the_connect_with_each_refusal_counted(
    reactor: Reactor, ports: ExitStack
):
    dead = [refusing(ports) for _ in range(3)]
    upstreams = [upstream_at(bound_port(sock)) for sock in dead]
    attempts = Attempts(reactor, upstreams, order=[2, 0, 1], passive_health=True)
    attempts.connector.start(trio.current_time())
    assert attempts.reports == [(None, None)]
    assert not attempts.connector.broke  # the upstreams' doing: connect_failed
    # Each tried once, in the balancer's order.
    assert list(attempts.errors.items()) == [
        ((label(dead[2]), "refused"), 1),
        ((label(dead[0]), "refused"), 1),
        ((label(dead[1]), "refused"), 1),
    ]
    # Passive health (fall=1 here): each refusal takes its upstream out.
    assert [u.health.up for u in upstreams] == [False, False, False]
    assert [u.stats.up for u in upstreams] == [False, False, False]
    assert registered(reactor) == {}


async def test_a_loopback_connect_completes_inside_connect_without_the_reactor(
    reactor: Reactor, ports: ExitStack
):
    alive = listening(ports)
    attempts = Attempts(reactor, [upstream_at(bound_port(alive))], passive_health=True)
    try:
        attempts.connector.start(trio.current_time())
        [(sock, upstream)] = attempts.reports  # reported before start() returned
        assert sock is not None and upstream is attempts.upstreams[0]
        assert attempts.connector.interest == 0  # never registered: nothing to take over
        assert registered(reactor) == {}
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        histogram = upstream.stats.connect_seconds
        assert histogram.count == 1 and histogram.buckets[0] == 1  # no time passed
        assert attempts.errors == {}
    finally:
        attempts.close()


async def test_the_all_refused_connection_ends_as_connect_failed_in_the_relay(ports: ExitStack):
    dead = [refusing(ports) for _ in range(2)]
    upstreams = "".join(f"      - address: {label(sock)}\n" for sock in dead)
    relay, outcomes = build_relay(
        relay_config(
            f"  - name: web\n    listen: 127.0.0.1:{free_port()}\n    upstreams:\n{upstreams}"
        )
    )
    async with serving(relay):
        client = await open_client(port_of(relay))
        with trio.fail_after(5):
            [finished] = await outcomes.wait_for(1)
        assert await ending_of(client) == "eof"
        await client.aclose()
    assert finished.outcome == "connect_failed"
    stats = relay.stats.routes["web"]
    assert stats.outcomes == {"connect_failed": 1}
    assert stats.connect_errors == {(label(dead[0]), "refused"): 1, (label(dead[1]), "refused"): 1}


async def test_unix_upstreams_connect_inside_connect_and_fail_over_the_same_way(
    reactor: Reactor, ports: ExitStack, tmp_path: Path
):
    missing = str(tmp_path / "nobody.sock")
    listener = ports.enter_context(socket.socket(socket.AF_UNIX))
    listener.bind(str(tmp_path / "upstream.sock"))
    listener.listen(1)

    def unix_upstream(path: str) -> UpstreamRuntime:
        return UpstreamRuntime(
            Upstream(UnixAddress(path)),
            UpstreamTarget(f"unix:{path}", socket.AF_UNIX, path),
            HealthState(rise=1, fall=1),
            UpstreamStats(f"unix:{path}"),
        )

    upstreams = [unix_upstream(missing), unix_upstream(listener.getsockname())]
    attempts = Attempts(reactor, upstreams)
    try:
        attempts.connector.start(trio.current_time())
        [(sock, upstream)] = attempts.reports
        assert upstream is upstreams[1] and sock is not None
        assert attempts.errors == {(f"unix:{missing}", "refused"): 1}  # ENOENT
        assert attempts.connector.interest == 0 and registered(reactor) == {}
    finally:
        attempts.close()


# ----- attempts that wait in the reactor ----------------------------------------------


async def test_an_attempt_in_progress_waits_in_the_reactor_and_times_out_to_the_next(
    reactor: Reactor, ports: ExitStack
):
    listener, fillers = blackholed_listener()
    ports.enter_context(listener)
    for filler in fillers:
        ports.enter_context(filler)
    alive = listening(ports)
    attempts = Attempts(
        reactor, [upstream_at(bound_port(listener)), upstream_at(bound_port(alive))]
    )
    try:
        attempts.connector.start(100.0)
        assert attempts.reports == []
        attempt = attempts.connector.sock
        assert attempt is not None
        assert registered(reactor) == {attempt.fileno(): attempts.connector}
        assert attempts.connector.interest == CONNECT_INTEREST == select.EPOLLOUT
        assert attempts.connector.deadline == 100.0 + TIMEOUT
        attempts.connector.expire(100.0 + TIMEOUT - 0.001)  # not yet
        assert attempts.connector.sock is attempt and attempts.errors == {}
        attempts.connector.expire(100.0 + TIMEOUT)
        assert attempt.fileno() == -1  # the attempt is closed...
        assert attempts.errors == {(label(listener), "timeout"): 1}
        [(sock, upstream)] = attempts.reports  # ...and the next upstream took over
        assert upstream is attempts.upstreams[1] and sock is not None
        assert registered(reactor) == {}  # the old registration went with its socket
        attempts.connector.expire(1000.0)  # nothing in progress: nothing happens
        assert len(attempts.reports) == 1
    finally:
        attempts.close()


async def test_connects_settled_in_the_kernel_are_read_from_so_error_via_the_reactor(
    reactor: Reactor, ports: ExitStack, in_progress: None
):
    dead, alive = refusing(ports), listening(ports)
    attempts = Attempts(reactor, [upstream_at(bound_port(dead)), upstream_at(bound_port(alive))])
    try:
        attempts.connector.start(trio.current_time())
        first = attempts.connector.sock
        assert first is not None and attempts.reports == []
        assert registered(reactor) == {first.fileno(): attempts.connector}
        turn(reactor)  # EPOLLOUT|EPOLLERR: SO_ERROR says refused; on to the next
        assert attempts.errors == {(label(dead), "refused"): 1}
        assert first.fileno() == -1
        second = attempts.connector.sock
        assert second is not None and attempts.reports == []
        turn(reactor)  # EPOLLOUT: SO_ERROR is 0, connected
        [(sock, upstream)] = attempts.reports
        assert sock is second and upstream is attempts.upstreams[1]
        # Still registered for EPOLLOUT, under the connector: the session takes it over.
        assert attempts.connector.interest == CONNECT_INTEREST
        assert registered(reactor) == {second.fileno(): attempts.connector}
        assert attempts.upstreams[1].stats.connect_seconds.count == 1
        reactor.set_interest(second.fileno(), CONNECT_INTEREST, 0, attempts.connector)
    finally:
        attempts.close()


async def test_aborting_an_attempt_closes_it_and_reports_nothing(
    reactor: Reactor, ports: ExitStack
):
    listener, fillers = blackholed_listener()
    ports.enter_context(listener)
    for filler in fillers:
        ports.enter_context(filler)
    alive = listening(ports)
    attempts = Attempts(
        reactor, [upstream_at(bound_port(listener)), upstream_at(bound_port(alive))]
    )
    try:
        attempts.connector.start(0.0)
        attempt = attempts.connector.sock
        assert attempt is not None
        attempts.connector.abort()  # the session was stopped from outside
        assert attempt.fileno() == -1 and registered(reactor) == {}
        attempts.connector.expire(1000.0)  # and nothing comes after it
        assert attempts.reports == [] and attempts.errors == {}
    finally:
        attempts.close()


async def test_a_bug_while_reporting_is_contained_and_told_apart_from_refusals(
    reactor: Reactor, ports: ExitStack, in_progress: None, caplog: pytest.LogCaptureFixture
):
    alive = listening(ports)
    upstream = upstream_at(bound_port(alive))
    calls: list[object] = []

    def buggy_done(sock: _socket.socket | None, runtime: UpstreamRuntime | None) -> None:
        calls.append(sock)
        if sock is not None:
            sock.close()
            raise RuntimeError("a bug in the caller")

    connector = Connector([upstream], [0], TIMEOUT, False, Counter(), reactor, "web", buggy_done)
    connector.start(trio.current_time())
    fd = connector.sock.fileno() if connector.sock is not None else -1
    caplog.set_level(logging.ERROR, logger="splicerelay")
    turn(reactor)  # on_ready -> connected -> the callback raises
    assert connector.broke  # counted as internal_error, not connect_failed
    assert len(calls) == 1  # done is not called again by the safety net
    assert "connection failed unexpectedly" in caplog.messages
    reactor.forget_fd(fd)


async def test_a_passive_failure_streak_takes_an_upstream_out_only_at_fall(
    reactor: Reactor, ports: ExitStack
):
    dead = refusing(ports)
    upstream = upstream_at(bound_port(dead), fall=2)
    first = Attempts(reactor, [upstream], passive_health=True)
    first.connector.start(0.0)
    assert upstream.health.up  # one refusal is not a streak
    second = Attempts(reactor, [upstream], passive_health=True)
    second.connector.start(0.0)
    assert not upstream.health.up and not upstream.stats.up
    assert first.reports == second.reports == [(None, None)]


async def test_the_connect_timer_is_trios_clock(
    reactor: Reactor, ports: ExitStack, in_progress: None, autojump_clock: trio.testing.MockClock
):
    alive = listening(ports)
    attempts = Attempts(reactor, [upstream_at(bound_port(alive))])
    try:
        attempts.connector.start(trio.current_time())
        await trio.sleep(0.25)  # an autojumping clock: no real time passes
        turn(reactor)
        [(sock, _)] = attempts.reports
        histogram = attempts.upstreams[0].stats.connect_seconds
        assert histogram.count == 1 and histogram.sum == pytest.approx(0.25)
        assert sock is not None
        reactor.set_interest(sock.fileno(), CONNECT_INTEREST, 0, attempts.connector)
    finally:
        attempts.close()
