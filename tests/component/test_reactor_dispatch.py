"""The shared epoll reactor: registrations, dispatch, contained failures and wake-ups.

Handlers are recorders over real fds (socketpairs, pipes) in the reactor's real epoll
set. Some tests run the reactor's task; others turn it by hand, one dispatch round over
a ready list the test writes itself, to stage what a busy round can hold (an fd closed
and its number reused by an earlier handler in the same round). Timers run on trio's
MockClock, so the retry delay costs no real time.
"""

from __future__ import annotations

import logging
import os
import select
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.testing

from splicerelay.datapath.reactor import RETRY_SECONDS, Reactor
from tests.support.scripted import (
    Recorder,
    close_idle_reactor,
    fd_is_open,
    readable,
    ready_now,
    registered,
    turn,
    unix_pair,
)

IN, OUT = select.EPOLLIN, select.EPOLLOUT


@pytest.fixture
async def reactor() -> AsyncIterator[Reactor]:
    reactor = Reactor()
    yield reactor
    close_idle_reactor(reactor)


class Sockets:
    """Makes unix socketpairs and closes every one after the test, failed or not (an
    unclosed socket would fail some later test with a ResourceWarning)."""

    def __init__(self) -> None:
        self.made: list[socket.socket] = []

    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = unix_pair()
        self.made += (a, b)
        return a, b

    def close(self) -> None:
        for sock in self.made:
            sock.close()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    made = Sockets()
    yield made
    made.close()


@pytest.fixture
def pair(sockets: Sockets) -> tuple[socket.socket, socket.socket]:
    return sockets.pair()


# ----- registrations ------------------------------------------------------------------


async def test_a_registered_fd_is_dispatched_with_its_events(
    reactor: Reactor, pair: tuple[socket.socket, socket.socket]
):
    a, b = pair
    handler = Recorder()
    reactor.set_interest(b.fileno(), 0, IN, handler)
    assert registered(reactor) == {b.fileno(): handler}
    assert turn(reactor) == 0  # nothing to read yet
    a.send(b"x")
    turn(reactor)
    assert handler.ready == [(b.fileno(), IN)]


async def test_changing_the_interest_changes_what_is_reported(
    reactor: Reactor, pair: tuple[socket.socket, socket.socket]
):
    a, b = pair
    handler = Recorder()
    reactor.set_interest(b.fileno(), 0, IN, handler)
    assert b.fileno() not in ready_now(reactor)  # writable, but not asked about
    reactor.set_interest(b.fileno(), IN, OUT, handler)
    assert ready_now(reactor) == {b.fileno(): OUT}
    reactor.set_interest(b.fileno(), OUT, IN | OUT, handler)
    a.send(b"x")
    assert ready_now(reactor) == {b.fileno(): IN | OUT}
    reactor.set_interest(b.fileno(), IN | OUT, IN | OUT, handler)  # unchanged: no call
    assert registered(reactor) == {b.fileno(): handler}


async def test_an_fd_with_no_interest_leaves_the_set_and_is_not_dispatched(
    reactor: Reactor, pair: tuple[socket.socket, socket.socket]
):
    a, b = pair
    handler = Recorder()
    reactor.set_interest(b.fileno(), 0, IN, handler)
    reactor.set_interest(b.fileno(), IN, 0, handler)
    assert registered(reactor) == {}
    # Left the epoll set for real: HUP would otherwise be reported whatever the mask.
    a.close()
    assert readable(b)
    assert turn(reactor) == 0 and handler.ready == []
    with pytest.raises(FileNotFoundError):
        reactor._epoll.unregister(b.fileno())


async def test_hand_over_and_forget_change_who_is_called(
    reactor: Reactor, pair: tuple[socket.socket, socket.socket]
):
    a, b = pair
    first, second = Recorder("connector"), Recorder("session")
    reactor.set_interest(b.fileno(), 0, IN, first)
    reactor.hand_over(b.fileno(), second)
    a.send(b"x")
    turn(reactor)
    assert first.ready == [] and second.ready == [(b.fileno(), IN)]
    reactor.forget_fd(b.fileno())  # about to be closed: no more dispatching
    turn(reactor)
    assert second.ready == [(b.fileno(), IN)]


# ----- one round ----------------------------------------------------------------------


async def test_an_event_for_an_fd_number_reused_within_the_round_is_not_delivered(
    reactor: Reactor, sockets: Sockets
):
    """An earlier handler closes an fd and a new socket gets its number in the same
    round: the event in hand was about the old socket, not the new one."""
    _a, b = sockets.pair()
    _c, d = sockets.pair()
    old, new = Recorder("old"), Recorder("new")
    reused: list[socket.socket] = []

    def close_and_reuse() -> None:
        reactor.forget_fd(d.fileno())
        number = d.fileno()
        d.close()
        fresh, peer = sockets.pair()
        reused.extend((fresh, peer))
        if fresh.fileno() != number:  # make the number be reused, as it would be
            os.dup2(fresh.fileno(), number)
            fresh.close()
            reused[0] = socket.socket(fileno=number)
            sockets.made.append(reused[0])
        reactor.set_interest(number, 0, IN, new)

    closer = Recorder("closer", then=close_and_reuse)
    reactor.set_interest(b.fileno(), 0, IN, closer)
    reactor.set_interest(d.fileno(), 0, IN, old)
    number = d.fileno()
    # The round as epoll returned it: both readable, the closer first.
    reactor._dispatch([(b.fileno(), IN), (number, IN)], reactor._handlers)
    assert len(closer.ready) == 1
    assert old.ready == [] and new.ready == []  # the stale event went to nobody
    # Next round, the new socket's own state is reported to its own handler.
    reused[1].send(b"for the new one")
    turn(reactor)
    assert new.ready == [(number, IN)]


async def test_a_handler_closed_earlier_in_the_round_is_skipped(reactor: Reactor, sockets: Sockets):
    _a, b = sockets.pair()
    _c, d = sockets.pair()
    gone = Recorder("gone")
    closer = Recorder("closer", then=lambda: reactor.forget_fd(d.fileno()))
    reactor.set_interest(b.fileno(), 0, IN, closer)
    reactor.set_interest(d.fileno(), 0, IN, gone)
    reactor._dispatch([(b.fileno(), IN), (d.fileno(), IN)], reactor._handlers)
    assert len(closer.ready) == 1 and gone.ready == []


# ----- failures are contained ---------------------------------------------------------


async def test_a_handler_that_raises_is_failed_logged_and_the_round_goes_on(
    reactor: Reactor, sockets: Sockets, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.ERROR, logger="splicerelay")
    _a, b = sockets.pair()
    _c, d = sockets.pair()
    buggy, fine = Recorder("buggy", raise_on_ready=True), Recorder("fine")
    reactor.set_interest(b.fileno(), 0, IN, buggy)
    reactor.set_interest(d.fileno(), 0, IN, fine)
    reactor._dispatch([(b.fileno(), IN), (d.fileno(), IN)], reactor._handlers)
    [error] = buggy.failures
    assert isinstance(error, RuntimeError) and "a bug in on_ready" in str(error)
    assert fine.ready == [(d.fileno(), IN)]  # served in the same round
    [record] = [r for r in caplog.records if r.message == "connection failed unexpectedly"]
    assert record.exc_info is not None and record.exc_info[1] is error  # with traceback


async def test_a_running_reactor_survives_a_handler_whose_fail_raises_too(
    sockets: Sockets, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.ERROR, logger="splicerelay")
    reactor = Reactor()
    a, b = sockets.pair()
    c, d = sockets.pair()
    served = trio.Event()
    # It reads what woke it before raising, or level-triggered epoll would report it
    # again on every round (its fail() raising means nobody unregisters it).
    buggy = Recorder("buggy", raise_on_ready=True, raise_on_fail=True, then=lambda: b.recv(100))
    fine = Recorder("fine", then=served.set)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            reactor.set_interest(b.fileno(), 0, IN, buggy)
            a.send(b"boom")
            await trio.testing.wait_all_tasks_blocked()
            assert len(buggy.ready) >= 1 and len(buggy.failures) >= 1
            # Still serving: a later connection is dispatched as usual.
            reactor.set_interest(b.fileno(), IN, 0, buggy)
            reactor.set_interest(d.fileno(), 0, IN, fine)
            c.send(b"later")
            await served.wait()
            nursery.cancel_scope.cancel()
    assert "ending a failed connection failed too" in caplog.messages


async def test_a_retry_that_raises_is_contained_like_a_readiness_handler(
    reactor: Reactor, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.ERROR, logger="splicerelay")
    buggy, fine = Recorder("buggy", raise_on_retry=True), Recorder("fine")
    reactor.retry_later(buggy)
    reactor.retry_later(fine)
    reactor._run_retries()
    assert buggy.retries == 1 and len(buggy.failures) == 1
    assert fine.retries == 1 and fine.failures == []
    assert "connection failed unexpectedly" in caplog.messages
    assert reactor._retry == set()


# ----- retries and the wake-up --------------------------------------------------------


async def test_a_retry_asked_from_another_task_wakes_a_reactor_waiting_without_timeout(
    autojump_clock: trio.testing.MockClock,
):
    reactor = Reactor()
    waiting = Recorder("waiting")
    with trio.fail_after(10):  # trio's clock: fails at once if the reactor sleeps on
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            await trio.testing.wait_all_tasks_blocked()
            # Nothing registered, nothing to retry: it waits on epoll with no timeout.
            assert reactor._waiting_without_timeout
            asked = trio.current_time()
            reactor.retry_later(waiting)  # from this task, not the reactor's
            while waiting.retries == 0:
                await trio.sleep(RETRY_SECONDS / 10)
            assert trio.current_time() - asked == pytest.approx(RETRY_SECONDS, abs=0.01)
            await trio.testing.wait_all_tasks_blocked()
            # The eventfd was read back: it no longer wakes the reactor round after round.
            assert not readable(reactor._wakeup.fd)
            assert waiting.retries == 1  # retried once, then no longer asked
            nursery.cancel_scope.cancel()


async def test_a_handler_forgotten_before_its_turn_is_not_retried(
    autojump_clock: trio.testing.MockClock,
):
    reactor = Reactor()
    kept, dropped, discarded = Recorder("kept"), Recorder("dropped"), Recorder("discarded")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            await trio.testing.wait_all_tasks_blocked()
            for handler in (kept, dropped, discarded):
                reactor.retry_later(handler)
            reactor.forget(dropped)
            reactor.discard((), discarded)
            while kept.retries == 0:
                await trio.sleep(RETRY_SECONDS / 10)
            nursery.cancel_scope.cancel()
    assert (kept.retries, dropped.retries, discarded.retries) == (1, 0, 0)


async def test_the_reactor_closes_its_epoll_and_eventfd_when_it_stops():
    reactor = Reactor()
    epoll_fd, wakeup_fd = reactor._epoll.fileno(), reactor._wakeup.fd
    assert fd_is_open(epoll_fd) and fd_is_open(wakeup_fd)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert not fd_is_open(epoll_fd) and not fd_is_open(wakeup_fd)


async def test_retry_timer_runs_on_trios_clock(autojump_clock: trio.testing.MockClock):
    reactor = Reactor()
    handler = Recorder()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            reactor.retry_later(handler)
            await trio.sleep(RETRY_SECONDS / 2)
            assert handler.retries == 0  # not before its time
            await trio.sleep(RETRY_SECONDS)
            assert handler.retries == 1
            assert trio.current_time() - start >= RETRY_SECONDS
            nursery.cancel_scope.cancel()
