"""Routes, listeners and the accept loop; connection limits, idle sweeps and drain.

The server turns a validated Config into running routes. Everything that may block
(name resolution, binding) happens in `prepare_routes`, before the first connection is
accepted, so the event loop never calls getaddrinfo per connection.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import os
import resource
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from splicerelay.config import Config, Route
from splicerelay.datapath.flow import PipePool, close_socket
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import Session, accept_client, prepare_accepted
from splicerelay.datapath.stats import RelayStats, RouteStats
from splicerelay.protocol.balancer import Strategy, make_strategy
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.connector import Connector
from splicerelay.relay.listeners import ListenError, ListenerSet
from splicerelay.relay.proxy_header import (
    ProxyHeaderRejected,
    build_proxy_header,
    receive_proxy_header,
)
from splicerelay.relay.upstreams import (
    ResolveError,
    UpstreamRuntime,
    make_upstreams,
    refresh_addresses,
    run_health_checks,
)

log = logging.getLogger("splicerelay")

# accept() errors that mean "out of a resource for now": back off and retry instead of
# dying, as trio's serve_listeners does. Connections wait in the kernel backlog meanwhile.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors that concern only the one connection being accepted.
ACCEPT_CONNECTION_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
ACCEPT_BACKOFF_SECONDS = 0.1
ACCEPT_BATCH = 16  # accepts in a row before the accept loop lets other tasks run

# fds kept free for pipes, health checks, scrapes and reloads when accepting.
FD_RESERVE = 32
FD_WAIT_SECONDS = 0.05
FD_WARNING_INTERVAL = 10.0  # seconds between "pausing accepts" warnings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def open_file_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def count_open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16


AccessLogger = Callable[["RouteRuntime", Session, Outcome], None]


class StartupError(Exception):
    """A route cannot start (name does not resolve, port in use, ...)."""


def format_endpoint(endpoint: tuple[str, int] | None) -> str:
    if endpoint is None:
        return "unix"
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint_of(family: int, address: object) -> tuple[str, int] | None:
    """(ip, port) of an inet socket address; None for unix sockets."""
    if family == socket.AF_UNIX or not isinstance(address, tuple):
        return None
    return (str(address[0]), int(address[1]))


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
    """A route while it runs: its listener, upstreams, strategy, limit and sessions."""

    route: Route
    listener: socket.socket
    upstreams: list[UpstreamRuntime]
    strategy: Strategy
    stats: RouteStats
    slots: trio.Semaphore
    # Open connections per client address, for max_connections_per_source.
    per_source: dict[str, int] = field(default_factory=dict)
    # Cancels this runtime's accept loop and upstream tasks (on reload or shutdown);
    # its sessions live on in the relay's session nursery.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def attempt_order(self, client_ip: str | None) -> list[int]:
        upstreams = self.upstreams
        order = self.strategy.attempt_order(
            client_ip,
            [upstream.health.up for upstream in upstreams],
            [upstream.stats.active for upstream in upstreams],
        )
        limit = self.route.max_connect_attempts
        return order[:limit] if limit else order


def prepare_routes(config: Config, stats: RelayStats, listeners: ListenerSet) -> list[RouteRuntime]:
    """Resolve every upstream and take every listener, or raise StartupError.

    Blocking (getaddrinfo, bind): run it before serving or in a worker thread. On
    failure, listeners that this call opened are closed again; kept ones stay.
    """
    runtimes: list[RouteRuntime] = []
    before = listeners.addresses()
    try:
        for route in config.routes:
            route_stats = stats.route(route.name)
            try:
                upstreams = make_upstreams(
                    route.upstreams, route.health_check, route_stats.upstream
                )
                listener = listeners.take(route.name, route.listen)
            except (ListenError, ResolveError) as error:
                raise StartupError(f"route {route.name}: {error}") from None
            if listener.family in (socket.AF_INET, socket.AF_INET6):
                # Why on the listener: Linux copies TCP_NODELAY to every socket accept()
                # returns, which saves a setsockopt per connection (see prepare_accepted).
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            runtimes.append(
                RouteRuntime(
                    route=route,
                    listener=listener,
                    upstreams=upstreams,
                    strategy=make_strategy(
                        route.balance,
                        [upstream.label for upstream in upstreams],
                        [upstream.config.weight for upstream in upstreams],
                    ),
                    stats=route_stats,
                    slots=trio.Semaphore(route.max_connections),
                )
            )
    except BaseException:
        listeners.close_except(before, lambda sock: sock.close())
        raise
    return runtimes


class Relay:
    """Serves routes until `begin_shutdown()`, then drains and returns.

    `reload()` swaps in the routes of a new config while running: new routes start,
    removed ones stop accepting, changed ones apply to new connections, and every
    established connection carries on untouched.
    """

    def __init__(
        self,
        config: Config,
        runtimes: list[RouteRuntime],
        stats: RelayStats,
        listeners: ListenerSet,
        *,
        use_splice: bool = True,
        access: AccessLogger | None = None,
    ) -> None:
        self.config = config
        self.runtimes = runtimes
        self.stats = stats
        self.listeners = listeners
        self.use_splice = use_splice
        self.pool = PipePool(stats.pipes)
        self.reactor = Reactor()
        self.serving = False
        self._access = access
        self._stop_requested = trio.Event()
        self._sessions: dict[Session, RouteRuntime] = {}
        self._connecting: set[Connector] = set()
        self._all_done = trio.Event()
        self._session_nursery: trio.Nursery | None = None
        self._route_nursery: trio.Nursery | None = None
        self._resource_warning_logged = False
        self._fd_warned_at = -FD_WARNING_INTERVAL
        self._fd_pauses = 0
        self._global_slots = self._global_limit(config)
        self._fd_limit = open_file_limit()
        self._base_fds = count_open_fds()

    @staticmethod
    def _global_limit(config: Config) -> trio.Semaphore | None:
        return trio.Semaphore(config.max_connections) if config.max_connections else None

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def is_ready(self) -> bool:
        """Listeners bound and every route has an upstream that is up (for /readyz)."""
        return self.serving and all(
            any(upstream.health.up for upstream in runtime.upstreams)
            for runtime in list(self.runtimes)
        )

    # ----- lifecycle -------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as sessions:
                self._session_nursery = sessions
                sessions.start_soon(self.reactor.run)
                sessions.start_soon(self._sweep_idle)
                sessions.start_soon(self._expire_connects)
                async with trio.open_nursery() as routes:
                    self._route_nursery = routes
                    for runtime in self.runtimes:
                        self._start_route(runtime)
                    self.serving = True
                    task_status.started()
                    await self._stop_requested.wait()
                    routes.cancel_scope.cancel()
                self.serving = False
                self.listeners.close_all(close_socket)
                await self._drain()
                sessions.cancel_scope.cancel()
        finally:
            self.serving = False
            self.listeners.close_all(close_socket)
            self.pool.close()

    def _start_route(self, runtime: RouteRuntime) -> None:
        assert self._route_nursery is not None
        self._route_nursery.start_soon(self._run_route, runtime)

    async def _run_route(self, runtime: RouteRuntime) -> None:
        route = runtime.route
        with runtime.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_loop, runtime)
                nursery.start_soon(refresh_addresses, runtime.upstreams, route.resolve_interval)
                if route.health_check is not None:
                    for upstream in runtime.upstreams:
                        nursery.start_soon(run_health_checks, upstream, route.health_check)

    async def reload(self, config: Config) -> None:
        """Apply `config` to new connections; raise StartupError and change nothing if
        a route cannot start (a new port in use, a name that does not resolve)."""
        if self._stop_requested.is_set():
            raise StartupError("the relay is shutting down")
        runtimes = await trio.to_thread.run_sync(prepare_routes, config, self.stats, self.listeners)
        if self._stop_requested.is_set():
            # Shutdown began while the new listeners were being bound: the routes can no
            # longer start; the listeners close with the rest at the end of the drain.
            raise StartupError("the relay is shutting down")
        old = self.runtimes
        previous = {runtime.route.name: runtime for runtime in old}
        for runtime in runtimes:
            if runtime.route.name in previous:
                # Connections from before the reload still count against their source.
                runtime.per_source = previous[runtime.route.name].per_source
        for runtime in old:
            runtime.scope.cancel()
        self.listeners.close_except({runtime.route.listen for runtime in runtimes}, close_socket)
        if config.max_connections != self.config.max_connections:
            # Sessions release the semaphore they took, so swapping it is safe.
            self._global_slots = self._global_limit(config)
        self._forget_removed_upstreams(runtimes)
        self.config = config
        self.runtimes = runtimes
        for runtime in runtimes:
            self._start_route(runtime)
        log.info(
            "config reloaded",
            extra={
                "fields": {
                    "routes": [r.route.name for r in runtimes],
                    "removed": sorted(
                        {r.route.name for r in old} - {r.route.name for r in runtimes}
                    ),
                }
            },
        )

    def _forget_removed_upstreams(self, runtimes: list[RouteRuntime]) -> None:
        """Drop the per-upstream series of upstreams no longer configured."""
        for runtime in runtimes:
            current = {upstream.label for upstream in runtime.upstreams}
            for label in list(runtime.stats.upstreams):
                if label not in current:
                    del runtime.stats.upstreams[label]

    def begin_shutdown(self) -> None:
        """Stop accepting; running transfers get `shutdown_timeout` to finish."""
        self._stop_requested.set()

    def stop_all_sessions(self) -> None:
        """Cut every running session now (second signal, or drain timeout)."""
        for session in list(self._sessions):
            session.stop(Outcome.SHUTDOWN)

    async def _drain(self) -> None:
        if self._sessions:
            log.info(
                "draining",
                extra={
                    "fields": {
                        "connections": len(self._sessions),
                        "timeout_seconds": self.config.shutdown_timeout,
                    }
                },
            )
        with trio.move_on_after(self.config.shutdown_timeout):
            await self._wait_all_sessions_done()
        if self._sessions:
            log.warning(
                "shutdown timeout: closing remaining connections",
                extra={"fields": {"connections": len(self._sessions)}},
            )
            self.stop_all_sessions()
            await self._wait_all_sessions_done()

    async def _wait_all_sessions_done(self) -> None:
        while self._sessions:
            self._all_done = trio.Event()
            await self._all_done.wait()

    # ----- accepting -------------------------------------------------------------

    async def _accept_loop(self, runtime: RouteRuntime) -> None:
        listener = runtime.listener
        family = listener.family  # a property that converts to an enum: ask once
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
            try:
                if self._fds_in_use() + FD_RESERVE > self._fd_limit:
                    await self._wait_for_fd_headroom()
                if self._global_slots is None:
                    # The common case, without a coroutine per accept: try, and wait
                    # for the listener only when its queue is empty.
                    try:
                        client, peer = accept_client(listener, family)
                    except BlockingIOError:
                        slots.release()
                        await trio.lowlevel.wait_readable(listener)
                        continue
                    except OSError:
                        client, peer, global_slot = await self._accept_with_global_slot(
                            runtime, listener, family
                        )
                    else:
                        global_slot = None
                        if self._resource_warning_logged:
                            self._resource_warning_logged = False
                            log.info("accept resumed")
                else:
                    client, peer, global_slot = await self._accept_with_global_slot(
                        runtime, listener, family
                    )
            except BaseException:
                slots.release()
                raise
            # Registered now, not when its task first runs: a burst of accepts must see
            # the sessions it has already taken (for the fd estimate and for drain).
            endpoint = endpoint_of(family, peer)
            session = Session(client, format_endpoint(endpoint))
            self._sessions[session] = runtime
            runtime.stats.active += 1
            session.owner = runtime
            session.global_slot = global_slot
            self._start_session(runtime, session, endpoint)
            accepted += 1
            if accepted % ACCEPT_BATCH == 0:
                await trio.lowlevel.checkpoint()  # let the reactor run during a storm

    def _fds_in_use(self) -> int:
        """An estimate of this process's open fds, without a syscall per accept."""
        pipes = self.stats.pipes
        return self._base_fds + 2 * len(self._sessions) + 2 * (pipes.created - pipes.closed)

    async def _wait_for_fd_headroom(self) -> None:
        """Accept only while a new connection can get its upstream socket and pipes.

        Why: accepting up to EMFILE would leave the sessions just accepted without an
        fd for their upstream, so clients would be taken off the backlog only to be
        reset. Below the limit minus a reserve, clients wait in the backlog instead,
        as at max_connections, and running transfers keep the fds they need.
        """
        if self._fds_in_use() + FD_RESERVE <= self._fd_limit:
            return
        self.pool.close()  # idle pipes are the cheapest fds to give back
        now = trio.current_time()
        self._fd_pauses += 1
        if now - self._fd_warned_at >= FD_WARNING_INTERVAL:
            # Why rate-limited: under a storm accepting pauses and resumes many times
            # a second; one line per burst says as much as a thousand.
            self._fd_warned_at = now
            log.warning(
                "near the open-file limit: pausing accepts",
                extra={
                    "fields": {
                        "limit": self._fd_limit,
                        "in_use": self._fds_in_use(),
                        "pauses": self._fd_pauses,
                    }
                },
            )
        # Resume with room to spare, so that accepting does not flap at the edge.
        while self._fds_in_use() + 2 * FD_RESERVE > self._fd_limit:
            await trio.sleep(FD_WAIT_SECONDS)

    async def _accept_with_global_slot(
        self, runtime: RouteRuntime, listener: socket.socket, family: int
    ) -> tuple[_socket.socket, object, trio.Semaphore | None]:
        """Accept one client, holding a global slot for it when there is a global limit.

        Why the global slot is taken only once a client is waiting: a route with no
        clients must not sit on a global slot that another route's client could use.
        """
        global_slots = self._global_slots
        while True:
            if global_slots is not None:
                try:
                    global_slots.acquire_nowait()
                except trio.WouldBlock:
                    await trio.lowlevel.wait_readable(listener)
                    await self._acquire_timed(global_slots, runtime.stats, is_global=True)
            try:
                accepted = await self._accept_one(listener, family)
            except BaseException:
                if global_slots is not None:
                    global_slots.release()
                raise
            if accepted is not None:
                return accepted[0], accepted[1], global_slots
            if global_slots is not None:
                global_slots.release()
            await trio.lowlevel.wait_readable(listener)

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
        self, listener: socket.socket, family: int
    ) -> tuple[_socket.socket, object] | None:
        """One accept(): a client, or None when there is none to take right now."""
        try:
            client, peer = accept_client(listener, family)
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno in ACCEPT_RESOURCE_ERRORS:
                if not self._resource_warning_logged:
                    # Why once: an fd storm would otherwise log thousands of lines.
                    self._resource_warning_logged = True
                    log.warning(
                        "accept failed, backing off", extra={"fields": {"error": error.strerror}}
                    )
                await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                return None
            if error.errno in ACCEPT_CONNECTION_ERRORS:
                return None
            raise
        if self._resource_warning_logged:
            self._resource_warning_logged = False
            log.info("accept resumed")
        return client, peer

    # ----- one connection ---------------------------------------------------------

    def _start_session(
        self, runtime: RouteRuntime, session: Session, endpoint: tuple[str, int] | None
    ) -> None:
        """Set a new connection up; only reading a PROXY header takes a task."""
        try:
            prepare_accepted(session.client)
        except OSError:
            self._finish(session, Outcome.CLIENT_RESET)  # gone before we could look
            return
        if runtime.route.accept_proxy_protocol:
            assert self._session_nursery is not None
            session.tracked = True  # trio waits on the client socket for the header
            session.cancel_scope = trio.CancelScope()
            self._session_nursery.start_soon(self._read_proxy_header, runtime, session, endpoint)
            return
        self._set_up(runtime, session, endpoint, None)

    async def _read_proxy_header(
        self, runtime: RouteRuntime, session: Session, source: tuple[str, int] | None
    ) -> None:
        route = runtime.route
        outcome: Outcome | None = None
        header = None
        try:
            assert session.cancel_scope is not None
            with session.cancel_scope:
                # Why a checkpoint first: a header already buffered is read without one,
                # and a stop() that came before this task ran must still end it.
                await trio.lowlevel.checkpoint()
                header = await receive_proxy_header(session.client, route.proxy_protocol_timeout)
            if header is None:
                outcome = session.closing_outcome or Outcome.SHUTDOWN
        except ProxyHeaderRejected as error:
            log.info(
                "bad PROXY header",
                extra={
                    "fields": {
                        "route": route.name,
                        "client": session.client_address,
                        "error": str(error),
                    }
                },
            )
            outcome = Outcome.BAD_PROXY_HEADER
        except Exception:
            # A bug, not a peer's doing: log it loudly but keep serving everyone else.
            log.exception("session failed unexpectedly")
            outcome = Outcome.UPSTREAM_RESET
        if outcome is not None or header is None:
            self._finish(session, outcome or Outcome.SHUTDOWN)
            return
        session.cancel_scope = None
        destination: tuple[str, int] | None = None
        if not header.local and header.source is not None:
            # From here on, the client is the one the trusted proxy in front named.
            source, destination = header.source, header.destination
            session.client_address = format_endpoint(source)
        self._set_up(runtime, session, source, destination)

    def _set_up(
        self,
        runtime: RouteRuntime,
        session: Session,
        source: tuple[str, int] | None,
        destination: tuple[str, int] | None,
    ) -> None:
        """Check the client against the route's rules, then start connecting."""
        try:
            outcome = self._admit_and_connect(runtime, session, source, destination)
        except Exception:
            log.exception("session failed unexpectedly")
            outcome = Outcome.UPSTREAM_RESET
        if outcome is not None:
            self._finish(session, outcome)

    def _finish(self, session: Session, outcome: Outcome) -> None:
        """Count, close and forget a connection, once: a later call is a no-op."""
        if session not in self._sessions:
            return  # only on a path where a bug was already logged
        runtime = session.owner
        assert isinstance(runtime, RouteRuntime)
        # Counted before the sockets close: whoever sees the connection end can
        # already see how it ended on /metrics.
        if session.upstream_stats is not None:
            session.upstream_stats.active -= 1
        stats = runtime.stats
        stats.active -= 1
        stats.outcomes[outcome.value] += 1
        stats.duration_seconds.observe(trio.current_time() - session.started)
        session.close(outcome)
        del self._sessions[session]
        source_key = session.source_key
        if source_key is not None:
            counts = runtime.per_source
            remaining = counts[source_key] - 1
            if remaining:
                counts[source_key] = remaining
            else:
                del counts[source_key]
        runtime.slots.release()
        if session.global_slot is not None:
            session.global_slot.release()
        if not self._sessions:
            self._all_done.set()
        if self._access is not None:
            self._access(runtime, session, outcome)

    def _admit_and_connect(
        self,
        runtime: RouteRuntime,
        session: Session,
        source: tuple[str, int] | None,
        destination: tuple[str, int] | None,
    ) -> Outcome | None:
        """An outcome when the client is turned away; None once connecting has begun."""
        route = runtime.route
        if (
            (route.allow or route.deny)
            and source is not None
            and not is_allowed(source[0], route.allow, route.deny)
        ):
            return Outcome.DENIED
        limit = route.max_connections_per_source
        if limit is not None and source is not None:
            counts = runtime.per_source
            held = counts.get(source[0], 0)
            if held >= limit:
                return Outcome.SOURCE_LIMIT
            counts[source[0]] = held + 1
            session.source_key = source[0]  # given back in _finish
        order = runtime.attempt_order(source[0] if source else None)
        if not order:
            return Outcome.NO_UPSTREAM

        def connected(sock: _socket.socket | None, upstream: UpstreamRuntime | None) -> None:
            self._connecting.discard(connector)
            session.on_stop = None  # the closure below refers to the session: no cycle
            if sock is None or upstream is None:
                self._finish(session, Outcome.CONNECT_FAILED)
                return
            upstream.stats.active += 1
            session.upstream_stats = upstream.stats
            session.upstream_label = upstream.target.label
            session.upstream = sock
            try:
                self._relay(runtime, session, sock, connector.interest, source, destination)
            except Exception:
                # A bug, not a peer's doing. The connector has already reported, so the
                # reactor's own safety net cannot end this session: end it here.
                log.exception("session failed unexpectedly")
                self.reactor.discard((session.client.fileno(), sock.fileno()), session)
                self._finish(session, Outcome.UPSTREAM_RESET)

        connector = Connector(
            runtime.upstreams,
            order,
            route.connect_timeout,
            route.health_check is not None,
            runtime.stats.connect_errors,
            self.reactor,
            route.name,
            connected,
        )

        def stop(outcome: Outcome) -> None:
            connector.abort()
            self._connecting.discard(connector)
            session.on_stop = None
            self._finish(session, outcome)

        session.on_stop = stop
        self._connecting.add(connector)
        connector.start(trio.current_time())
        return None

    def _relay(
        self,
        runtime: RouteRuntime,
        session: Session,
        upstream: _socket.socket,
        upstream_interest: int,
        source: tuple[str, int] | None,
        destination: tuple[str, int] | None,
    ) -> None:
        """The upstream accepted: send a PROXY header if asked, then relay.

        `upstream_interest`: what the connector left the upstream registered for.
        """
        route = runtime.route
        if route.proxy_protocol != "none":
            if destination is None:
                # Asked only now: most routes never need the address clients reached.
                destination = endpoint_of(session.client.family, session.client.getsockname())
            header = build_proxy_header(route.proxy_protocol, source, destination)
            try:
                # Why one send is enough: the socket has just connected, so its send
                # buffer (at least a few KiB) is empty, and a header is at most a few
                # hundred bytes.
                sent = upstream.send(header)
            except OSError:
                sent = -1
            if sent != len(header):
                if upstream_interest:
                    self.reactor.forget_fd(upstream.fileno())  # the connector's registration
                self._finish(session, Outcome.UPSTREAM_RESET)
                return
        session.adopt(
            upstream,
            self.reactor,
            self.pool,
            route.pipe_size,
            runtime.stats,
            self.use_splice,
            self._finish,
            upstream_interest=upstream_interest,
        )

    async def _expire_connects(self) -> None:
        """Connect timeouts, for every connection attempt, on one coarse timer."""
        while True:
            timeouts = [runtime.route.connect_timeout for runtime in self.runtimes]
            await trio.sleep(min(max(min(timeouts, default=1.0) / 20, 0.01), 0.25))
            if self._connecting:
                now = trio.current_time()
                for connector in list(self._connecting):
                    connector.expire(now)

    # ----- idle timeout and max duration -------------------------------------------

    def _sweep_interval(self) -> float:
        timeouts = [runtime.route.idle_timeout for runtime in self.runtimes]
        timeouts += [
            runtime.route.max_duration for runtime in self.runtimes if runtime.route.max_duration
        ]
        return min(max(min(timeouts, default=1.0) / 10, 0.05), 1.0)

    async def _sweep_idle(self) -> None:
        """One coarse timer for all sessions instead of one timer per I/O call.

        A session is idle when its byte count has not moved since it was last seen to;
        the timeout therefore fires between idle_timeout and idle_timeout + interval.
        max_duration is checked on the same sweep. Each session keeps the route options
        it started with, also across reloads.
        """
        while True:
            await trio.sleep(self._sweep_interval())
            now = trio.current_time()
            for session, runtime in list(self._sessions.items()):
                max_duration = runtime.route.max_duration
                if max_duration and now - session.started >= max_duration:
                    session.stop(Outcome.MAX_DURATION)
                elif session.activity != session.seen_activity:
                    session.seen_activity = session.activity
                    session.idle_since = now
                elif now - session.idle_since >= runtime.route.idle_timeout:
                    session.stop(Outcome.IDLE_TIMEOUT)


def session_record(runtime: RouteRuntime, session: Session, outcome: Outcome) -> dict[str, object]:
    """The access-log fields of one finished connection."""
    return {
        "route": runtime.route.name,
        "client": session.client_address,
        "upstream": session.upstream_label or None,
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
        "duration_seconds": round(trio.current_time() - session.started, 6),
        "outcome": outcome.value,
    }
