"""A relayed connection (Session) under scripted readiness: both flows, how it ends.

The session is adopted by a real Reactor whose task never runs: the test either calls
`on_ready` itself with the events it chooses, in the order it chooses, or turns the
reactor by hand (one dispatch round over what the real epoll set reports right now).
The sockets are real: loopback TCP where resets matter, unix socketpairs where a full
destination must stay exactly full (see test_flow_scripted.Line). `on_finish` closes the
session the way the session table does, so the peers see what a real client and
upstream would: a FIN after a clean end, a reset after a failure.
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import socket
from collections.abc import AsyncIterator

import pytest
import trio

from splicerelay.datapath.flow import DONE, WANT_PIPE, WANT_READ, WANT_WRITE, PipePool
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import Session
from splicerelay.datapath.stats import PipeStats, RouteStats
from splicerelay.protocol.outcome import Outcome
from tests.support.scripted import (
    Recorder,
    at_eof,
    close_idle_reactor,
    fd_is_open,
    open_fd_count,
    outcome_seen_by,
    read_to_eof,
    readable,
    ready_now,
    receive_available,
    registered,
    reset,
    send_until_full,
    shrink_send_buffer,
    tcp_pair,
    turn,
    unix_pair,
    wait_readable,
    wait_reset_seen,
)

PIPE_SIZE = 64 << 10
IN = select.EPOLLIN
RDHUP = select.EPOLLRDHUP
OUT = select.EPOLLOUT
BROKEN = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
READ_INTEREST = select.EPOLLIN | select.EPOLLRDHUP


class Rig:
    """client_app <-> [client | Session | upstream] <-> upstream_app.

    `tight`: unix socketpairs, with small send buffers on the relay's two sockets, so
    either destination fills after a few KiB and stays full until its reader reads.
    """

    def __init__(self, *, tight: bool = False, pool: PipePool | None = None) -> None:
        if tight:
            self.client_app, self.client = unix_pair()
            self.upstream, self.upstream_app = unix_pair()
            shrink_send_buffer(self.client)
            shrink_send_buffer(self.upstream)
        else:
            self.client_app, self.client = tcp_pair()
            self.upstream, self.upstream_app = tcp_pair()
        self.client_fd, self.upstream_fd = self.client.fileno(), self.upstream.fileno()
        self.reactor = Reactor()
        self.pipes = PipeStats()
        self.pool = pool if pool is not None else PipePool(self.pipes)
        self.stats = RouteStats("web")
        self.session = Session(self.client, "127.0.0.1:40000")
        self.outcomes: list[Outcome] = []
        self.reactor_ran = False  # then run() has closed the reactor's fds itself

    def finish(self, session: Session, outcome: Outcome) -> None:
        """What the session table does: count, then close the two sockets."""
        self.outcomes.append(outcome)
        session.close(outcome)

    def adopt(self, upstream_interest: int = 0) -> None:
        self.session.adopt(
            self.upstream,
            self.reactor,
            self.pool,
            PIPE_SIZE,
            self.stats,
            True,
            self.finish,
            upstream_interest=upstream_interest,
        )

    def client_ready(self, events: int) -> None:
        self.session.on_ready(self.client_fd, events)

    def upstream_ready(self, events: int) -> None:
        self.session.on_ready(self.upstream_fd, events)

    @property
    def outbound_state(self) -> int:
        assert self.session.outbound is not None
        return self.session.outbound.state

    @property
    def inbound_state(self) -> int:
        assert self.session.inbound is not None
        return self.session.inbound.state

    def close(self) -> None:
        if not self.outcomes and self.session.adopted:
            self.session.stop(Outcome.SHUTDOWN)
        for sock in (self.client_app, self.upstream_app):
            if sock.fileno() >= 0:
                trio.lowlevel.notify_closing(sock)  # the test's own task may have waited
            sock.close()
        self.client.close()
        self.upstream.close()
        self.pool.close()
        if not self.reactor_ran:
            close_idle_reactor(self.reactor)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()
    yield rig
    rig.close()


@pytest.fixture
async def tight() -> AsyncIterator[Rig]:
    rig = Rig(tight=True)
    yield rig
    rig.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- adopting ----------------------------------------------------------------------


async def test_what_the_client_sent_while_connecting_is_relayed_in_the_next_round(rig: Rig):
    rig.client_app.send(b"early request")
    wait_readable(rig.client)
    rig.adopt()
    # Adopting only registers: no syscall on the client yet (trying at once cost more
    # than the round it saves, see Session.adopt). The level-triggered set reports the
    # bytes that were there before the registration.
    assert rig.client.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"early request"
    assert registered(rig.reactor) == {rig.client_fd: rig.session, rig.upstream_fd: rig.session}
    assert rig.session.client_interest == rig.session.upstream_interest == READ_INTEREST
    assert ready_now(rig.reactor)[rig.client_fd] & IN
    turn(rig.reactor)
    wait_readable(rig.upstream_app)
    assert receive_available(rig.upstream_app) == b"early request"
    assert rig.outcomes == []


async def test_adopting_takes_over_the_connectors_registration(rig: Rig):
    connector = Recorder("connector")
    rig.reactor.set_interest(rig.upstream_fd, 0, OUT, connector)
    rig.adopt(upstream_interest=OUT)
    assert registered(rig.reactor)[rig.upstream_fd] is rig.session
    # The registration changed from "writable" to "readable": a connected, writable,
    # silent upstream is no longer reported.
    assert rig.upstream_fd not in ready_now(rig.reactor)
    rig.upstream_app.send(b"banner")
    wait_readable(rig.upstream)
    assert ready_now(rig.reactor)[rig.upstream_fd] & IN
    turn(rig.reactor)
    wait_readable(rig.client_app)
    assert receive_available(rig.client_app) == b"banner"
    assert connector.ready == []


# ----- both directions ----------------------------------------------------------------


async def test_each_direction_is_relayed_and_counted_on_its_own(rig: Rig):
    rig.adopt()
    for _ in range(3):
        rig.client_app.send(b"PING\r\n")
        wait_readable(rig.client)
        turn(rig.reactor)
        wait_readable(rig.upstream_app)
        assert receive_available(rig.upstream_app) == b"PING\r\n"
        rig.upstream_app.send(b"+PONG reply\r\n")
        wait_readable(rig.upstream)
        turn(rig.reactor)
        wait_readable(rig.client_app)
        assert receive_available(rig.client_app) == b"+PONG reply\r\n"
    assert (rig.stats.client_to_upstream.splice, rig.stats.upstream_to_client.splice) == (18, 39)
    assert (rig.session.bytes_in, rig.session.bytes_out) == (18, 39)
    assert rig.stats.client_to_upstream.copy == rig.stats.upstream_to_client.copy == 0
    assert rig.pipes.created == 1 and rig.pipes.in_use == 0  # idle between exchanges


async def test_client_half_closes_first_and_the_upstream_still_answers(rig: Rig):
    rig.adopt()
    rig.client_app.send(b"request")
    rig.client_app.shutdown(socket.SHUT_WR)
    wait_readable(rig.client)
    rig.client_ready(IN | RDHUP)  # the FIN waits behind the data
    assert rig.outbound_state == DONE and rig.inbound_state == WANT_READ
    assert read_to_eof(rig.upstream_app) == b"request"  # the FIN was passed on
    assert rig.outcomes == []  # one direction is not the pair
    # Nobody reads the half-closed client any more; it leaves the epoll set.
    assert rig.client_fd not in registered(rig.reactor)
    rig.upstream_app.send(b"response")
    wait_readable(rig.upstream)
    rig.upstream_ready(IN)
    wait_readable(rig.client_app)
    assert receive_available(rig.client_app) == b"response"
    rig.upstream_app.shutdown(socket.SHUT_WR)
    wait_readable(rig.upstream)
    rig.upstream_ready(IN | RDHUP)
    assert rig.outcomes == [Outcome.COMPLETED]
    assert at_eof(rig.client_app)  # a FIN, not a reset
    assert outcome_seen_by(rig.client_app) == "fin"


async def test_upstream_half_closes_first_and_the_client_still_sends(rig: Rig):
    rig.adopt()
    rig.upstream_app.send(b"server first")
    rig.upstream_app.shutdown(socket.SHUT_WR)
    wait_readable(rig.upstream)
    rig.upstream_ready(IN | RDHUP)
    assert rig.inbound_state == DONE and rig.outbound_state == WANT_READ
    assert read_to_eof(rig.client_app) == b"server first"
    assert rig.outcomes == []
    assert rig.upstream_fd not in registered(rig.reactor)
    rig.client_app.send(b"still talking")
    wait_readable(rig.client)
    rig.client_ready(IN)
    wait_readable(rig.upstream_app)
    assert receive_available(rig.upstream_app) == b"still talking"
    rig.client_app.shutdown(socket.SHUT_WR)
    wait_readable(rig.client)
    rig.client_ready(IN | RDHUP)
    assert rig.outcomes == [Outcome.COMPLETED]
    assert outcome_seen_by(rig.upstream_app) == "fin"


async def test_a_full_destination_switches_the_interest_from_reading_to_writing(tight: Rig):
    tight.adopt()
    data = os.urandom(1 << 20)
    sent = send_until_full(tight.client_app, data)
    tight.client_ready(IN)
    assert tight.outbound_state == WANT_WRITE
    # Waiting for the upstream to drain: not reading the client (which is still
    # readable), and watching the upstream for writability as well as for its replies.
    assert tight.client_fd not in registered(tight.reactor)
    assert tight.session.upstream_interest == READ_INTEREST | OUT
    assert tight.client_fd not in ready_now(tight.reactor)
    assert readable(tight.client)
    got = bytearray()
    for _ in range(20_000):
        sent += send_until_full(tight.client_app, data[sent:])
        got += receive_available(tight.upstream_app)
        if len(got) == len(data):
            break
        turn(tight.reactor)
    assert digest(bytes(got)) == digest(data)
    assert tight.outbound_state == WANT_READ
    assert tight.session.client_interest == READ_INTEREST  # reading the client again
    assert tight.session.upstream_interest == READ_INTEREST
    assert tight.stats.client_to_upstream.splice == len(data)


async def test_eof_with_bytes_in_the_pipe_delivers_them_all_before_the_fin(tight: Rig):
    """The HAProxy truncation bug: the FIN must follow the last byte, not overtake it."""
    tight.adopt()
    data = os.urandom(768 << 10)
    outbound = tight.session.outbound
    assert outbound is not None
    sent = 0
    got = bytearray()
    fin_behind_held_bytes = False
    for _ in range(20_000):
        if sent < len(data):
            sent += send_until_full(tight.client_app, data[sent:])
            if sent == len(data):
                tight.client_app.shutdown(socket.SHUT_WR)
        # Reading the upstream end only now and then keeps bytes held in the pipe when
        # the client's FIN arrives.
        if tight.outbound_state == WANT_WRITE:
            got += receive_available(tight.upstream_app, limit=16 << 10)
        fin_behind_held_bytes |= sent == len(data) and outbound.held > 0
        turn(tight.reactor)
        if tight.outbound_state == DONE:
            break
    assert fin_behind_held_bytes  # the case this test is about did happen
    assert tight.outbound_state == DONE
    got += read_to_eof(tight.upstream_app)
    assert len(got) == len(data)
    assert digest(bytes(got)) == digest(data)


async def test_a_request_and_its_fin_arriving_together_reach_the_upstream_whole(tight: Rig):
    """The FIN is known (EPOLLRDHUP) from the first look, while the destination fills:
    the bytes held in the pipe still go first."""
    tight.adopt()
    data = os.urandom(150 << 10)
    assert send_until_full(tight.client_app, data) == len(data)
    tight.client_app.shutdown(socket.SHUT_WR)
    tight.client_ready(IN | RDHUP)
    outbound = tight.session.outbound
    assert outbound is not None
    assert tight.outbound_state == WANT_WRITE and outbound.held > 0
    assert not at_eof(tight.upstream_app)
    got = bytearray()
    for _ in range(20_000):
        got += receive_available(tight.upstream_app, limit=16 << 10)
        turn(tight.reactor)
        if tight.outbound_state == DONE:
            break
    got += read_to_eof(tight.upstream_app)
    assert digest(bytes(got)) == digest(data)
    assert tight.outcomes == []  # the upstream may still answer


# ----- resets -------------------------------------------------------------------------


async def test_a_client_reset_ends_the_pair_as_client_reset_and_resets_the_upstream(rig: Rig):
    rig.adopt()
    reset(rig.client_app)
    wait_reset_seen(rig.client)
    rig.client_ready(BROKEN)
    assert rig.outcomes == [Outcome.CLIENT_RESET]
    assert registered(rig.reactor) == {}  # both fds forgotten before they were closed
    assert not fd_is_open(rig.client_fd) and not fd_is_open(rig.upstream_fd)
    assert outcome_seen_by(rig.upstream_app) == "reset"  # passed on, not turned into a FIN
    rig.client_app = socket.socket()


async def test_an_upstream_reset_ends_the_pair_as_upstream_reset_and_resets_the_client(rig: Rig):
    rig.adopt()
    reset(rig.upstream_app)
    wait_reset_seen(rig.upstream)
    rig.upstream_ready(BROKEN)
    assert rig.outcomes == [Outcome.UPSTREAM_RESET]
    assert registered(rig.reactor) == {}
    assert outcome_seen_by(rig.client_app) == "reset"
    rig.upstream_app = socket.socket()


async def test_a_client_reset_found_while_writing_to_it_is_a_client_reset(rig: Rig):
    rig.adopt()
    reset(rig.client_app)
    wait_reset_seen(rig.client)
    rig.upstream_app.send(b"reply to nobody")
    wait_readable(rig.upstream)
    rig.upstream_ready(IN)  # the inbound flow reads fine and fails on the client
    assert rig.outcomes == [Outcome.CLIENT_RESET]
    assert outcome_seen_by(rig.upstream_app) == "reset"
    rig.client_app = socket.socket()


async def test_an_upstream_reset_found_while_writing_to_it_is_an_upstream_reset(rig: Rig):
    rig.adopt()
    reset(rig.upstream_app)
    wait_reset_seen(rig.upstream)
    rig.client_app.send(b"request to nobody")
    wait_readable(rig.client)
    rig.client_ready(IN)
    assert rig.outcomes == [Outcome.UPSTREAM_RESET]
    assert outcome_seen_by(rig.client_app) == "reset"
    rig.upstream_app = socket.socket()


async def test_a_reset_after_a_half_close_is_noticed_when_the_upstream_answers(rig: Rig):
    rig.adopt()
    rig.client_app.send(b"request")
    rig.client_app.shutdown(socket.SHUT_WR)
    wait_readable(rig.client)
    turn(rig.reactor)
    assert rig.outbound_state == DONE  # the request and its FIN passed on
    assert read_to_eof(rig.upstream_app) == b"request"
    # The client gives up before the (slow) upstream answers: a reset.
    reset(rig.client_app)
    wait_reset_seen(rig.client)
    # Its fd left the epoll set when its direction ended, so nothing is reported: a
    # reset socket reports HUP and ERR on every round, and nobody would read it.
    assert ready_now(rig.reactor) == {}
    turn(rig.reactor)
    assert rig.outcomes == []
    # The answer finds the client gone: that is when the reset is known and passed on.
    rig.upstream_app.send(b"late answer")
    wait_readable(rig.upstream)
    turn(rig.reactor)
    assert rig.outcomes == [Outcome.CLIENT_RESET]
    assert outcome_seen_by(rig.upstream_app) == "reset"
    rig.client_app = socket.socket()


async def test_a_bug_in_the_relay_resets_both_sides(rig: Rig):
    rig.adopt()
    rig.session.fail(RuntimeError("a bug"))  # what the reactor calls when on_ready raised
    assert rig.outcomes == [Outcome.INTERNAL_ERROR]
    assert outcome_seen_by(rig.client_app) == "reset"
    assert outcome_seen_by(rig.upstream_app) == "reset"


# ----- being cut from outside ---------------------------------------------------------


async def test_cut_with_bytes_unread_resets_the_side_that_misses_them(rig: Rig):
    rig.adopt()
    rig.client_app.send(b"never relayed")
    wait_readable(rig.client)  # arrived, and no readiness delivered for it
    rig.session.stop(Outcome.IDLE_TIMEOUT)
    assert rig.outcomes == [Outcome.IDLE_TIMEOUT]
    assert registered(rig.reactor) == {}
    assert rig.session.cut_upstream and not rig.session.cut_client
    # A FIN would tell the upstream the request was complete: it gets a reset.
    assert outcome_seen_by(rig.upstream_app) == "reset"


async def test_cut_with_nothing_in_flight_closes_both_sides_cleanly(rig: Rig):
    rig.adopt()
    rig.client_app.send(b"relayed")
    wait_readable(rig.client)
    rig.client_ready(IN)
    wait_readable(rig.upstream_app)
    assert receive_available(rig.upstream_app) == b"relayed"
    rig.session.stop(Outcome.SHUTDOWN)
    assert rig.outcomes == [Outcome.SHUTDOWN]
    assert not rig.session.cut_upstream and not rig.session.cut_client
    assert outcome_seen_by(rig.upstream_app) == "fin"
    assert outcome_seen_by(rig.client_app) == "fin"


# ----- fds and endings ----------------------------------------------------------------


async def test_a_session_closes_each_fd_once_and_ends_once():
    baseline = open_fd_count()
    rig = Rig()
    try:
        rig.adopt()
        rig.client_app.send(b"x")
        wait_readable(rig.client)
        rig.client_ready(IN)
        rig.client_app.shutdown(socket.SHUT_WR)
        rig.upstream_app.shutdown(socket.SHUT_WR)
        wait_readable(rig.client)
        wait_readable(rig.upstream)
        rig.client_ready(IN | RDHUP)
        rig.upstream_ready(IN | RDHUP)
        assert rig.outcomes == [Outcome.COMPLETED]
        assert not fd_is_open(rig.client_fd) and not fd_is_open(rig.upstream_fd)
        assert registered(rig.reactor) == {}  # forgotten before they were closed
        # New files take the freed numbers; nothing that comes later may close them.
        reused = [os.pipe() for _ in range(2)]
        rig.session.stop(Outcome.SHUTDOWN)
        rig.session.fail(RuntimeError("late"))
        rig.session.close(Outcome.COMPLETED)
        assert rig.outcomes == [Outcome.COMPLETED]  # on_finish ran exactly once
        assert all(fd_is_open(fd) for pair in reused for fd in pair)
        for pair in reused:
            for fd in pair:
                os.close(fd)
    finally:
        rig.close()
    assert open_fd_count() == baseline  # sockets, pipes, epoll and eventfd all gone


async def test_a_session_out_of_fds_for_a_pipe_asks_to_be_retried():
    class NoFdsPool(PipePool):
        out_of_fds = True

        def open(self, size: int):  # type: ignore[no-untyped-def]
            if self.out_of_fds:
                raise OSError(errno.EMFILE, "Too many open files")
            return super().open(size)

    stats = PipeStats()
    pool = NoFdsPool(stats)
    rig = Rig(pool=pool)
    try:
        rig.client_app.send(b"waits in the socket")
        wait_readable(rig.client)
        rig.adopt()
        turn(rig.reactor)  # the client is readable: its flow asks for a pipe
        assert rig.outbound_state == WANT_PIPE
        assert rig.session in rig.reactor._retry
        # Not reading the client while it cannot be relayed: level-triggered epoll would
        # report it on every round.
        assert rig.client_fd not in registered(rig.reactor)
        pool.out_of_fds = False
        rig.session.retry()
        wait_readable(rig.upstream_app)
        assert receive_available(rig.upstream_app) == b"waits in the socket"
        assert rig.outbound_state == WANT_READ
        assert rig.session.client_interest == READ_INTEREST
    finally:
        rig.close()


# ----- with the reactor's own task ----------------------------------------------------


async def send_all(sock: socket.socket, data: bytes) -> None:
    sent = 0
    while sent < len(data):
        await trio.lowlevel.wait_writable(sock)
        sent += send_until_full(sock, data[sent:])


async def receive_to_eof(sock: socket.socket) -> bytes:
    got = bytearray()
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            return bytes(got)
        got += chunk


async def test_a_running_reactor_relays_both_ways_and_completes(rig: Rig):
    request, response = os.urandom(400_000), os.urandom(600_000)
    rig.reactor_ran = True
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.reactor.run)
            rig.adopt()

            async def client() -> None:
                await send_all(rig.client_app, request)
                rig.client_app.shutdown(socket.SHUT_WR)

            nursery.start_soon(client)
            # The upstream reads the whole request (and its FIN) before it answers.
            assert digest(await receive_to_eof(rig.upstream_app)) == digest(request)
            nursery.start_soon(send_all, rig.upstream_app, response)
            assert rig.outcomes == []
            received = bytearray()
            while len(received) < len(response):
                await trio.lowlevel.wait_readable(rig.client_app)
                received += receive_available(rig.client_app)
            rig.upstream_app.shutdown(socket.SHUT_WR)
            assert await receive_to_eof(rig.client_app) == b""
            assert digest(bytes(received)) == digest(response)
            nursery.cancel_scope.cancel()
    assert rig.outcomes == [Outcome.COMPLETED]
    assert (rig.session.bytes_in, rig.session.bytes_out) == (len(request), len(response))
    # run() closed its epoll set and eventfd on its way out.
    assert not fd_is_open(rig.reactor._wakeup.fd)
