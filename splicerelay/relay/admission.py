"""Admission: taking clients off each route's listener within the relay's limits.

Three limits hold clients back in the kernel's backlog rather than accepting them only
to drop them: a route's max_connections, the global max_connections of all routes, and
fd headroom (room for the upstream socket and pipes of each new connection). accept()
errors that mean "out of a resource for now" pause accepting instead of ending it, as
trio's serve_listeners does.

The listener is a small interface (`Listener`), so that tests can script accept()
failures; time is trio's clock and the fd count an injectable function.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable, Sized
from typing import Protocol

import trio

from splicerelay.datapath.flow import PipePool
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import accept_client
from splicerelay.datapath.stats import RelayStats, RouteStats
from splicerelay.relay.reactor_accept import ACCEPT_BATCH, ReactorAccept
from splicerelay.relay.routes import RouteRuntime

log = logging.getLogger("splicerelay")

# accept() errors that mean "out of a resource for now": back off and retry instead of
# dying, as trio's serve_listeners does. Connections wait in the kernel backlog meanwhile.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors that concern only the one connection being accepted.
ACCEPT_CONNECTION_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
ACCEPT_BACKOFF_SECONDS = 0.1

# fds kept free for pipes, health checks, scrapes and reloads when accepting.
FD_RESERVE = 32
FD_WAIT_SECONDS = 0.05
FD_WARNING_INTERVAL = 10.0  # seconds between "pausing accepts" warnings


def open_file_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def count_open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16


class Listener(Protocol):
    """What the accept loop needs of a listening socket."""

    @property
    def family(self) -> int: ...

    def accept(self) -> tuple[_socket.socket, object]:
        """A client and its address; BlockingIOError when none is waiting, else OSError."""
        ...

    async def wait_readable(self) -> None:
        """Return once a client may be waiting."""
        ...


class SocketListener:
    """A listening socket as a `Listener`."""

    __slots__ = ("_sock", "family")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.family = int(sock.family)  # a property that converts to an enum: ask once

    def accept(self) -> tuple[_socket.socket, object]:
        return accept_client(self._sock, self.family)

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self._sock)


Accepted = Callable[[RouteRuntime, _socket.socket, object, int, trio.Semaphore | None], None]


class Admission:
    """The accept loops of all routes, and the limits they share.

    `accepted(runtime, client, peer, family, global_slot)` takes each new client; it
    holds one of `runtime.slots` and, with a global limit, `global_slot`, and gives both
    back when the connection ends. `open_sessions` (its length) and the pipes counted in
    `stats` feed the fd estimate; `count_fds` counts this process's fds once, at start.
    """

    def __init__(
        self,
        stats: RelayStats,
        pool: PipePool,
        open_sessions: Sized,
        accepted: Accepted,
        global_limit: int | None,
        *,
        fd_limit: int | None = None,
        count_fds: Callable[[], int] = count_open_fds,
        reactor: Reactor | None = None,
    ) -> None:
        self.stats = stats
        self.pool = pool
        self.open_sessions = open_sessions
        self.accepted = accepted
        self.global_slots = self._semaphore(global_limit)
        self.fd_limit = open_file_limit() if fd_limit is None else fd_limit
        self.base_fds = count_fds()
        self.fd_pauses = 0
        # Makes the Listener each accept loop uses of a route's socket (tests script one).
        self.listener_for: Callable[[socket.socket], Listener] = SocketListener
        self._resource_warning_logged = False
        self._fd_warned_at = -FD_WARNING_INTERVAL
        # With a reactor, a real listener is accepted from inside the reactor's round
        # while no limit is in the way (reactor_accept.py); the task takes the rest.
        self.reactor = reactor
        self._in_reactor: dict[RouteRuntime, ReactorAccept] = {}

    @staticmethod
    def _semaphore(limit: int | None) -> trio.Semaphore | None:
        return trio.Semaphore(limit) if limit else None

    def set_global_limit(self, limit: int | None) -> None:
        """A reload changed the global limit: new connections count against a new one.

        Sessions release the semaphore they took, so swapping it is safe.
        """
        self.global_slots = self._semaphore(limit)

    def stop_accepting(self, runtime: RouteRuntime) -> None:
        """Take `runtime`'s listener out of the reactor now (it is about to be closed;
        its accept task, cancelled, ends at its next checkpoint)."""
        fast = self._in_reactor.pop(runtime, None)
        if fast is not None:
            fast.detach()

    def _fast_path(self, runtime: RouteRuntime, listener: Listener) -> ReactorAccept | None:
        if self.reactor is None or type(listener) is not SocketListener:
            return None  # a scripted listener (tests) has no fd: the task does it all
        fast = ReactorAccept(
            self, runtime, runtime.listener, listener.family, self.reactor, FD_RESERVE
        )
        self._in_reactor[runtime] = fast
        return fast

    async def accept_loop(self, runtime: RouteRuntime) -> None:
        listener = self.listener_for(runtime.listener)
        fast = self._fast_path(runtime, listener)
        try:
            await self._accept_in_task(runtime, listener, fast)
        finally:
            if fast is not None:
                fast.detach()
                if self._in_reactor.get(runtime) is fast:
                    del self._in_reactor[runtime]

    async def _wait_for_clients(
        self, runtime: RouteRuntime, listener: Listener, fast: ReactorAccept | None
    ) -> None:
        """The backlog is empty: wait until it is not, or with `fast`, let the reactor
        accept until a limit or an error needs this task again."""
        if fast is None:
            await listener.wait_readable()
            return
        error = await fast.serve_in_reactor()
        if error is not None:
            await self._accept_failed(error, runtime)

    async def _accept_in_task(
        self, runtime: RouteRuntime, listener: Listener, fast: ReactorAccept | None
    ) -> None:
        accept = listener.accept
        family = listener.family
        slots = runtime.slots
        accepted = 0
        while True:
            # Why take a slot before accept(): at max_connections we stop taking
            # connections off the kernel's queue, so new clients wait in the backlog (as
            # with HAProxy) instead of being accepted and dropped.
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                await self._acquire_timed(slots, runtime.stats, is_global=False)
            failure: OSError | None = None
            try:
                if self.fds_in_use() + FD_RESERVE > self.fd_limit:
                    await self._wait_for_fd_headroom()
                if self.global_slots is None:
                    # The common case, without a coroutine per accept: try, and wait
                    # for the listener only when its queue is empty.
                    global_slot = None
                    try:
                        client, peer = accept()
                    except OSError as error:  # BlockingIOError too: nobody waiting
                        failure = error
                else:
                    client, peer, global_slot = await self._accept_with_global_slot(
                        runtime, listener
                    )
            except BaseException:
                slots.release()
                raise
            if failure is not None:
                slots.release()  # no client taken: give its slot back
                if not isinstance(failure, BlockingIOError):
                    await self._accept_failed(failure, runtime)
                await self._wait_for_clients(runtime, listener, fast)
                continue
            if self._resource_warning_logged:
                self._resource_warning_logged = False
                log.info("accept resumed")
            self.accepted(runtime, client, peer, family, global_slot)
            accepted += 1
            if accepted % ACCEPT_BATCH == 0:
                await trio.lowlevel.checkpoint()  # let the reactor run during a storm

    def fds_in_use(self) -> int:
        """An estimate of this process's open fds, without a syscall per accept."""
        pipes = self.stats.pipes
        return self.base_fds + 2 * len(self.open_sessions) + 2 * (pipes.created - pipes.closed)

    async def _wait_for_fd_headroom(self) -> None:
        """Accept only while a new connection can get its upstream socket and pipes.

        Why: accepting up to EMFILE would leave the sessions just accepted without an
        fd for their upstream, so clients would be taken off the backlog only to be
        reset. Below the limit minus a reserve, clients wait in the backlog instead,
        as at max_connections, and running transfers keep the fds they need.
        """
        if self.fds_in_use() + FD_RESERVE <= self.fd_limit:
            return
        self.pool.close()  # idle pipes are the cheapest fds to give back
        now = trio.current_time()
        self.fd_pauses += 1
        if now - self._fd_warned_at >= FD_WARNING_INTERVAL:
            # Why rate-limited: under a storm accepting pauses and resumes many times
            # a second; one line per burst says as much as a thousand.
            self._fd_warned_at = now
            log.warning(
                "near the open-file limit: pausing accepts",
                extra={
                    "fields": {
                        "limit": self.fd_limit,
                        "in_use": self.fds_in_use(),
                        "pauses": self.fd_pauses,
                    }
                },
            )
        # Resume with room to spare, so that accepting does not flap at the edge.
        while self.fds_in_use() + 2 * FD_RESERVE > self.fd_limit:
            await trio.sleep(FD_WAIT_SECONDS)

    async def _accept_with_global_slot(
        self, runtime: RouteRuntime, listener: Listener
    ) -> tuple[_socket.socket, object, trio.Semaphore]:
        """Accept one client, holding a global slot for it.

        Why the global slot is taken only once a client is waiting: a route with no
        clients must not sit on a global slot that another route's client could use.
        """
        global_slots = self.global_slots
        assert global_slots is not None
        while True:
            try:
                global_slots.acquire_nowait()
            except trio.WouldBlock:
                await listener.wait_readable()
                await self._acquire_timed(global_slots, runtime.stats, is_global=True)
            try:
                accepted = await self._accept_one(listener, runtime)
            except BaseException:
                global_slots.release()
                raise
            if accepted is not None:
                return accepted[0], accepted[1], global_slots
            global_slots.release()
            await listener.wait_readable()

    async def _acquire_timed(
        self, slots: trio.Semaphore, stats: RouteStats, is_global: bool
    ) -> None:
        """Take a slot; time spent waiting for it is time at the limit."""
        try:
            slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        started = trio.current_time()
        try:
            await slots.acquire()
        finally:
            waited = trio.current_time() - started
            if is_global:
                self.stats.global_limited_seconds += waited
            else:
                stats.limited_seconds += waited

    async def _accept_one(
        self, listener: Listener, runtime: RouteRuntime
    ) -> tuple[_socket.socket, object] | None:
        """One accept(): a client, or None when there is none to take right now."""
        try:
            client, peer = listener.accept()
        except BlockingIOError:
            return None
        except OSError as error:
            await self._accept_failed(error, runtime)
            return None
        if self._resource_warning_logged:
            self._resource_warning_logged = False
            log.info("accept resumed")
        return client, peer

    async def _accept_failed(self, error: OSError, runtime: RouteRuntime) -> None:
        """After a failed accept(): back off, skip the one connection, or raise."""
        if error.errno in ACCEPT_RESOURCE_ERRORS:
            if not self._resource_warning_logged:
                # Why once: an fd storm would otherwise log thousands of lines.
                self._resource_warning_logged = True
                log.warning(
                    "accept failed, backing off", extra={"fields": {"error": error.strerror}}
                )
            await trio.sleep(ACCEPT_BACKOFF_SECONDS)
            return
        if error.errno in ACCEPT_CONNECTION_ERRORS:
            return
        # Anything else is not a passing condition (EBADF, EINVAL: the listener itself
        # is broken): retrying would spin, so the route's accept loop ends with it.
        error.add_note(f"accepting on route {runtime.route.name}")
        raise error
