"""Accepting inside the reactor's round: the fast path of a route's accept loop.

A trio task that waits on a listener costs a task wake-up per batch of accepts, and
trio re-arms its one-shot epoll registration on every wait: about 25 Python calls and
an epoll_ctl for each, which under a storm of short connections is a batch of one or
two. Here the listener sits in the reactor's own level-triggered epoll set instead, and
a ready listener is accepted from in the same round that relays the established
connections: no task switch and no re-arm.

Only the common case runs here: a free route slot, fd headroom, a free global slot, and
accept() giving a client or EAGAIN. Anything else (a limit reached, an accept() error)
hands the listener back to the route's accept task, the slow path in admission.py,
which waits for the limit or backs off, and gives the listener back to the reactor
once it has emptied the backlog again. Both paths never accept at once: the listener
leaves the epoll set before the task is woken.
"""

from __future__ import annotations

import select
import socket
from typing import TYPE_CHECKING

import trio

from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import accept_client
from splicerelay.relay.routes import RouteRuntime

if TYPE_CHECKING:
    from splicerelay.relay.admission import Admission

ACCEPT_BATCH = 16  # accepts per round and listener; level-triggered epoll says the rest

_LISTEN = select.EPOLLIN


class ReactorAccept:
    """A route's listener while the reactor accepts on it.

    `serve_in_reactor()` is the accept task's wait: it puts the listener in the reactor's
    set and returns when the reactor hands it back, with the accept() error that made it
    do so, if any. `detach()` takes it out of the set at once (a reload about to close
    the listener; the task's own end).
    """

    __slots__ = (
        "_fd",
        "_handed_back",
        "_reactor",
        "_sock",
        "error",
        "family",
        "fd_reserve",
        "limits",
        "registered",
        "runtime",
    )

    def __init__(
        self,
        limits: Admission,
        runtime: RouteRuntime,
        sock: socket.socket,
        family: int,
        reactor: Reactor,
        fd_reserve: int,
    ) -> None:
        # (`limits` is the Admission whose limits and `accepted` this path shares.)
        self.limits = limits
        self.runtime = runtime
        self._sock = sock
        self._fd = sock.fileno()
        self.family = family
        self._reactor = reactor
        self.fd_reserve = fd_reserve
        self.registered = False
        self.error: OSError | None = None
        self._handed_back = trio.Event()

    async def serve_in_reactor(self) -> OSError | None:
        """Let the reactor accept until it needs the task; the error it met, if any."""
        self._handed_back = trio.Event()
        self.error = None
        self._reactor.set_interest(self._fd, 0, _LISTEN, self)
        self.registered = True
        try:
            await self._handed_back.wait()
        finally:
            self.detach()
        return self.error

    def detach(self) -> None:
        if self.registered:
            self.registered = False
            # (When everything is cancelled at once, the reactor's task may have ended
            # and closed its epoll set, with this fd in it, before this task's cleanup.)
            if not self._reactor.closed:
                self._reactor.set_interest(self._fd, _LISTEN, 0, self)

    def _hand_back(self, error: OSError | None = None) -> None:
        self.detach()
        self.error = error
        self._handed_back.set()

    def on_ready(self, fd: int, events: int) -> None:
        limits = self.limits
        runtime = self.runtime
        slots = runtime.slots
        sock = self._sock
        family = self.family
        for _ in range(ACCEPT_BATCH):
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                self._hand_back()  # at max_connections: the task waits for a slot
                return
            global_slots = limits.global_slots
            if limits.fds_in_use() + self.fd_reserve > limits.fd_limit:
                slots.release()
                self._hand_back()  # near the fd limit: the task waits for headroom
                return
            if global_slots is not None:
                try:
                    global_slots.acquire_nowait()
                except trio.WouldBlock:
                    slots.release()
                    self._hand_back()
                    return
            try:
                client, peer = accept_client(sock, family)
            except OSError as error:
                slots.release()
                if global_slots is not None:
                    global_slots.release()
                if not isinstance(error, BlockingIOError):
                    self._hand_back(error)  # the task backs off, skips or raises
                return  # (EAGAIN: the backlog is empty; epoll says when it is not)
            limits.accepted(runtime, client, peer, family, global_slots)

    def retry(self) -> None:
        """Never waits for a resource in the reactor: that is the task's part."""

    def fail(self, error: BaseException) -> None:
        """Setting up one connection raised (the reactor has logged it): keep accepting."""
