"""Routes, listeners and the accept loop; connection limits, idle sweeps and drain.

The server turns a validated Config into running routes. Everything that may block
(name resolution, binding) happens in `prepare_routes`, before the first connection is
accepted, so the event loop never calls getaddrinfo per connection.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from .addresses import Address, TcpAddress, UnixAddress
from .balancer import SmoothRoundRobin
from .config import Config, Route
from .session import ConnectError, Outcome, Session, UpstreamTarget, connect, prepare_accepted
from .splice import PipePool, close_socket
from .stats import RelayStats, RouteStats

log = logging.getLogger("splicerelay")
access_log = logging.getLogger("splicerelay.access")

# accept() errors that mean "out of a resource for now": back off and retry instead of
# dying, as trio's serve_listeners does. Connections wait in the kernel backlog meanwhile.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors that concern only the one connection being accepted.
ACCEPT_CONNECTION_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
ACCEPT_BACKOFF_SECONDS = 0.1
LISTEN_BACKLOG = 4096

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AccessLogger = Callable[["RouteRuntime", Session, Outcome], None]


class StartupError(Exception):
    """A route cannot start (name does not resolve, port in use, ...)."""


def resolve(
    address: TcpAddress, passive: bool = False
) -> tuple[socket.AddressFamily, tuple[str, int] | tuple[str, int, int, int]]:
    """Blocking getaddrinfo for one address: call it off the event loop or before it."""
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=flags)
    except (socket.gaierror, UnicodeError) as error:
        raise StartupError(f"cannot resolve {address}: {error}") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, sockaddr  # type: ignore[return-value]


def resolve_upstream(address: Address) -> UpstreamTarget:
    if isinstance(address, UnixAddress):
        return UpstreamTarget(str(address), socket.AF_UNIX, address.path)
    family, sockaddr = resolve(address)
    return UpstreamTarget(str(address), family, sockaddr)


def open_listener(address: Address) -> socket.socket:
    """Bind and listen on `address`; the socket is non-blocking."""
    if isinstance(address, UnixAddress):
        remove_stale_unix_socket(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] | tuple[str, int, int, int] = address.path
    else:
        family, sockaddr = resolve(address, passive=True)
        sock = socket.socket(family, socket.SOCK_STREAM)
        target = sockaddr
        # Why: without SO_REUSEADDR a restart fails while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Why: let [::]:P and 0.0.0.0:P be two routes, as the config says, instead
            # of the v6 socket silently taking the v4 traffic too.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind(target)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise StartupError(f"cannot listen on {address}: {error.strerror}") from None
    return sock


def remove_stale_unix_socket(path: str) -> None:
    """Remove a unix socket file left by an earlier run; refuse to remove anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"cannot listen on unix:{path}: a file that is not a socket is there")
    os.unlink(path)


def format_peer(family: int, peer: object) -> str:
    if family == socket.AF_UNIX:
        return "unix"
    assert isinstance(peer, tuple)
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def is_allowed(host: str, allow: Sequence[IPNetwork], deny: Sequence[IPNetwork]) -> bool:
    """Deny wins over allow; an empty allow list allows everyone not denied."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in deny):
        return False
    return not allow or any(address in network for network in allow)


@dataclass(eq=False)
class RouteRuntime:
    """A route while it runs: its listener, upstreams, balancer, limit and sessions."""

    route: Route
    listener: socket.socket
    targets: tuple[UpstreamTarget, ...]
    balancer: SmoothRoundRobin
    stats: RouteStats
    slots: trio.Semaphore
    sessions: set[Session] = field(default_factory=set)


def prepare_routes(config: Config, stats: RelayStats) -> list[RouteRuntime]:
    """Resolve every upstream and bind every listener, or raise StartupError."""
    runtimes: list[RouteRuntime] = []
    try:
        for route in config.routes:
            try:
                targets = tuple(resolve_upstream(upstream.address) for upstream in route.upstreams)
                listener = open_listener(route.listen)
            except StartupError as error:
                raise StartupError(f"route {route.name}: {error}") from None
            runtimes.append(
                RouteRuntime(
                    route=route,
                    listener=listener,
                    targets=targets,
                    balancer=SmoothRoundRobin([u.weight for u in route.upstreams]),
                    stats=stats.route(route.name),
                    slots=trio.Semaphore(route.max_connections),
                )
            )
    except BaseException:
        for runtime in runtimes:
            runtime.listener.close()
        raise
    return runtimes


class Relay:
    """Serves prepared routes until `begin_shutdown()`, then drains and returns."""

    def __init__(
        self,
        config: Config,
        runtimes: list[RouteRuntime],
        stats: RelayStats,
        *,
        use_splice: bool = True,
        access: AccessLogger | None = None,
    ) -> None:
        self.config = config
        self.runtimes = runtimes
        self.stats = stats
        self.use_splice = use_splice
        self.pool = PipePool(stats.pipes)
        self._access = access
        self._accepting = trio.CancelScope()
        self._active_sessions = 0
        self._all_done = trio.Event()
        self._session_nursery: trio.Nursery | None = None
        self._resource_warning_logged = False

    # ----- lifecycle -------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._session_nursery = nursery
                nursery.start_soon(self._sweep_idle)
                with self._accepting:
                    async with trio.open_nursery() as acceptors:
                        for runtime in self.runtimes:
                            acceptors.start_soon(self._accept_loop, runtime)
                        task_status.started()
                self._close_listeners()
                await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            self._close_listeners()
            self.pool.close()

    def begin_shutdown(self) -> None:
        """Stop accepting; running transfers get `shutdown_timeout` to finish."""
        self._accepting.cancel()

    def stop_all_sessions(self) -> None:
        """Cut every running session now (second signal, or drain timeout)."""
        for runtime in self.runtimes:
            for session in list(runtime.sessions):
                session.stop(Outcome.SHUTDOWN)

    async def _drain(self) -> None:
        if self._active_sessions:
            log.info(
                "draining",
                extra={
                    "fields": {
                        "connections": self._active_sessions,
                        "timeout_seconds": self.config.shutdown_timeout,
                    }
                },
            )
        with trio.move_on_after(self.config.shutdown_timeout):
            await self._wait_all_sessions_done()
        if self._active_sessions:
            log.warning(
                "shutdown timeout: closing remaining connections",
                extra={"fields": {"connections": self._active_sessions}},
            )
            self.stop_all_sessions()
            await self._wait_all_sessions_done()

    async def _wait_all_sessions_done(self) -> None:
        while self._active_sessions:
            self._all_done = trio.Event()
            await self._all_done.wait()

    def _close_listeners(self) -> None:
        for runtime in self.runtimes:
            close_socket(runtime.listener)
            if isinstance(runtime.route.listen, UnixAddress):
                with contextlib.suppress(OSError):
                    os.unlink(runtime.route.listen.path)

    # ----- accepting -------------------------------------------------------------

    async def _accept_loop(self, runtime: RouteRuntime) -> None:
        listener = runtime.listener
        slots = runtime.slots
        assert self._session_nursery is not None
        start_session = self._session_nursery.start_soon
        while True:
            # Why acquire before accept: at max_connections we stop taking connections
            # off the kernel's queue, so new clients wait in the backlog (as with
            # HAProxy) instead of being accepted and dropped.
            await slots.acquire()
            try:
                client, peer = await self._accept_one(listener)
            except BaseException:
                slots.release()
                raise
            start_session(self._handle, runtime, client, peer)

    async def _accept_one(self, listener: socket.socket) -> tuple[socket.socket, object]:
        while True:
            try:
                client, peer = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as error:
                if error.errno in ACCEPT_RESOURCE_ERRORS:
                    if not self._resource_warning_logged:
                        # Why once: an fd storm would otherwise log thousands of lines.
                        self._resource_warning_logged = True
                        log.warning(
                            "accept failed, backing off",
                            extra={"fields": {"error": error.strerror}},
                        )
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    continue
                if error.errno in ACCEPT_CONNECTION_ERRORS:
                    continue
                raise
            if self._resource_warning_logged:
                self._resource_warning_logged = False
                log.info("accept resumed")
            return client, peer

    # ----- one connection ---------------------------------------------------------

    async def _handle(self, runtime: RouteRuntime, client: socket.socket, peer: object) -> None:
        session = Session(client, format_peer(client.family, peer))
        runtime.sessions.add(session)
        runtime.stats.active += 1
        self._active_sessions += 1
        outcome: Outcome | None = None
        try:
            with session.cancel_scope:
                outcome = await self._run_session(runtime, session, peer)
            if outcome is None:
                outcome = session.closing_outcome or Outcome.SHUTDOWN
        except Exception:
            # A bug, not a peer's doing: log it loudly but keep serving everyone else.
            log.exception("session failed unexpectedly")
            outcome = Outcome.UPSTREAM_RESET
        finally:
            if outcome is None:
                outcome = Outcome.SHUTDOWN
            session.close(outcome)
            runtime.sessions.discard(session)
            runtime.stats.active -= 1
            runtime.stats.outcomes[outcome.value] += 1
            runtime.slots.release()
            self._active_sessions -= 1
            if not self._active_sessions:
                self._all_done.set()
            if self._access is not None:
                self._access(runtime, session, outcome)

    async def _run_session(self, runtime: RouteRuntime, session: Session, peer: object) -> Outcome:
        route = runtime.route
        prepare_accepted(session.client)
        if (
            (route.allow or route.deny)
            and isinstance(peer, tuple)
            and not is_allowed(peer[0], route.allow, route.deny)
        ):
            return Outcome.DENIED
        upstream = await self._connect_upstream(runtime, session)
        if upstream is None:
            return Outcome.CONNECT_FAILED
        return await session.relay(
            upstream, self.pool, route.pipe_size, runtime.stats, self.use_splice
        )

    async def _connect_upstream(
        self, runtime: RouteRuntime, session: Session
    ) -> socket.socket | None:
        """Try the balancer's pick, then fail over to each other upstream once."""
        timeout = runtime.route.connect_timeout
        for index in runtime.balancer.attempt_order():
            target = runtime.targets[index]
            try:
                upstream = await connect(target, timeout)
            except ConnectError as error:
                runtime.stats.connect_errors[(target.label, error.reason)] += 1
                log.debug(
                    "upstream connect failed",
                    extra={
                        "fields": {
                            "route": runtime.route.name,
                            "upstream": target.label,
                            "reason": error.reason,
                        }
                    },
                )
                continue
            session.upstream_label = target.label
            return upstream
        return None

    # ----- idle timeout ---------------------------------------------------------

    def _sweep_interval(self) -> float:
        shortest = min((runtime.route.idle_timeout for runtime in self.runtimes), default=1.0)
        return min(max(shortest / 10, 0.05), 1.0)

    async def _sweep_idle(self) -> None:
        """One coarse timer for all sessions instead of one timer per I/O call.

        A session is idle when its byte count has not moved since it was last seen to;
        the timeout therefore fires between idle_timeout and idle_timeout + interval.
        """
        interval = self._sweep_interval()
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for runtime in self.runtimes:
                timeout = runtime.route.idle_timeout
                for session in list(runtime.sessions):
                    if session.activity != session.seen_activity:
                        session.seen_activity = session.activity
                        session.idle_since = now
                    elif now - session.idle_since >= timeout:
                        session.stop(Outcome.IDLE_TIMEOUT)


def session_record(runtime: RouteRuntime, session: Session, outcome: Outcome) -> dict[str, object]:
    """The access-log fields of one finished connection."""
    return {
        "route": runtime.route.name,
        "client": session.client_address,
        "upstream": session.upstream_label or None,
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
        "duration_seconds": round(time.monotonic() - session.started, 6),
        "outcome": outcome.value,
    }
