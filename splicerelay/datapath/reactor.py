"""One epoll for every connection, so that a connection costs no task.

Reading a PROXY header runs in a trio task; everything after it does not. Connecting to
an upstream runs here too: the connector registers its attempt's socket for writability
and is called back like any connection. Once connected, a connection's two sockets sit in
the single epoll set that one trio task waits on, and readiness is dispatched straight to
the connection's `on_ready`.
An idle connection then costs its sockets and a few small objects, not two coroutine
stacks and their cancel scopes; that is how HAProxy and Go's net poller keep idle
connections cheap, and it is what lets ten thousand of them fit in a few tens of MiB.

Why level-triggered and long-lived registrations: an fd stays registered with the same
interest while a connection's state does not change, so a request/response exchange
costs no epoll_ctl at all (trio re-arms a one-shot registration on every wait). A
handler that stops short of EAGAIN is simply reported again on the next round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from collections.abc import Callable
from typing import Protocol

import trio

log = logging.getLogger("splicerelay")

MAX_EVENTS = 256  # readiness events taken per round; the rest wait for the next one
RETRY_SECONDS = 0.05  # how often handlers that wait for a resource are retried


class Handler(Protocol):
    def on_ready(self, fd: int, events: int) -> None: ...

    def retry(self) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class _Wakeup:
    """The reactor's eventfd: readable when someone outside its task needs it awake."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def on_ready(self, fd: int, events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)  # reset it, or level-triggered epoll reports it again

    def retry(self) -> None:
        """Never waits for a resource."""

    def fail(self, error: BaseException) -> None:
        """Reading an eventfd cannot fail in a way worth more than the log line."""


class Reactor:
    """The epoll set, the handler of each registered fd, and the task that serves them."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        # Why a wake-up fd: a handler may ask to be retried from outside the reactor's
        # task (a session adopted by the accept loop when its upstream connected inside
        # connect()), while the task waits for epoll with no timeout.
        self._wakeup = _Wakeup(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self._epoll.register(self._wakeup.fd, select.EPOLLIN)
        self._waiting_without_timeout = False
        self._handlers: dict[int, Handler] = {self._wakeup.fd: self._wakeup}
        self._retry: set[Handler] = set()
        # fds registered during the round being dispatched (see run).
        self._added_this_round: set[int] = set()
        self._dispatching = False
        self._next_retry = 0.0
        # Called after every round of handlers: what a round's connections left to do
        # once, together (the access log writes the round's lines in one go).
        self.after_round: Callable[[], None] | None = None

    def set_interest(self, fd: int, current: int, wanted: int, handler: Handler) -> None:
        """Move `fd` from interest `current` to `wanted` (0 = not registered).

        Why an fd with no interest leaves the set: EPOLLHUP and EPOLLERR are reported
        whatever the mask says, so a half-closed socket that nobody wants to read would
        otherwise be reported on every round, spinning the loop.
        """
        if wanted == current:
            return
        if not wanted:
            self._epoll.unregister(fd)
            del self._handlers[fd]
        elif not current:
            self._epoll.register(fd, wanted)
            self._handlers[fd] = handler
            if self._dispatching:
                self._added_this_round.add(fd)
        else:
            self._epoll.modify(fd, wanted)

    @property
    def closed(self) -> bool:
        """Its task has ended: nothing is dispatched or registered any more."""
        return self._epoll.closed

    def hand_over(self, fd: int, handler: Handler) -> None:
        """A registered fd changes hands (connector -> session), interest unchanged."""
        self._handlers[fd] = handler

    def forget_fd(self, fd: int) -> None:
        """Stop dispatching `fd`, which its owner is about to close (see Session._end)."""
        del self._handlers[fd]

    def discard(self, fds: tuple[int, ...], handler: Handler) -> None:
        """Forget `fds` (about to be closed) and `handler`'s retry, where present.

        For the unexpected-error path only, where what is registered is not known.
        """
        for fd in fds:
            self._handlers.pop(fd, None)
        self._retry.discard(handler)

    def retry_later(self, handler: Handler) -> None:
        if not self._retry:
            self._next_retry = trio.current_time() + RETRY_SECONDS
        self._retry.add(handler)
        if self._waiting_without_timeout:
            # Wake the task so that it waits again, now with the retry timer.
            self._waiting_without_timeout = False
            os.eventfd_write(self._wakeup.fd, 1)

    def forget(self, handler: Handler) -> None:
        self._retry.discard(handler)

    async def run(self) -> None:
        epoll = self._epoll
        handlers = self._handlers
        wait_readable = trio.lowlevel.wait_readable
        try:
            while True:
                if self._retry:
                    with trio.move_on_after(RETRY_SECONDS):
                        await wait_readable(epoll)
                    if trio.current_time() >= self._next_retry:
                        self._run_retries()
                else:
                    self._waiting_without_timeout = True
                    try:
                        await wait_readable(epoll)
                    finally:
                        self._waiting_without_timeout = False
                self._dispatch(epoll.poll(0, MAX_EVENTS), handlers)
                if self.after_round is not None:
                    self.after_round()
        finally:
            trio.lowlevel.notify_closing(epoll)
            epoll.close()
            os.close(self._wakeup.fd)

    def _dispatch(self, ready: list[tuple[int, int]], handlers: dict[int, Handler]) -> None:
        """Call the handler of every ready fd."""
        added = self._added_this_round
        self._dispatching = True
        try:
            for fd, events in ready:
                if fd in added:
                    # Why: an earlier handler in this round closed this fd number and a
                    # new socket got it; the event was about the old one. Level-triggered
                    # epoll reports the new socket's own state next round.
                    continue
                handler = handlers.get(fd)
                if handler is None:
                    continue  # closed by an earlier handler in this round
                try:
                    handler.on_ready(fd, events)
                except Exception as error:
                    _fail(handler, error)
        finally:
            self._dispatching = False
            added.clear()

    def _run_retries(self) -> None:
        waiting = list(self._retry)
        self._retry.clear()
        for handler in waiting:
            try:
                handler.retry()
            except Exception as error:
                _fail(handler, error)


def _fail(handler: Handler, error: Exception) -> None:
    """A handler raised: a bug, not a peer's doing. End that connection, serve the rest."""
    log.exception("connection failed unexpectedly")
    try:
        handler.fail(error)
    except Exception:
        # Why swallow this too: an exception here would end the reactor's task and with
        # it every connection. The one connection may leak; the log says so.
        log.exception("ending a failed connection failed too")
