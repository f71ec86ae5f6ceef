"""The relay's lifecycle: serve the routes, reload them, drain and stop.

`Relay` puts the parts together: admission (the accept loops and their limits, in
admission.py), connection setup (connection_setup.py) and the table of open connections
(sessions.py), the timers (timers.py) and the shared reactor that relays every
established connection without a task of its own. The operator's admin settings on
upstreams (admin_store.py) belong to the relay, not to a route's runtime, so that a reload
hands them to the new routes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from splicerelay.config import Config
from splicerelay.datapath.flow import PipePool, close_socket
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.stats import RelayStats
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.admin_store import AdminStore
from splicerelay.relay.admission import Admission, count_open_fds
from splicerelay.relay.connection_setup import ConnectionSetup
from splicerelay.relay.listeners import ListenerSet
from splicerelay.relay.members import maintain_members
from splicerelay.relay.routes import (
    RouteRuntime,
    StartupError,
    forget_removed_upstreams,
    prepare_routes,
)
from splicerelay.relay.sessions import AccessLogger, SessionTable
from splicerelay.relay.timers import expire_connects, sweep_idle
from splicerelay.relay.tls_routing import make_acceptors

log = logging.getLogger("splicerelay")


class Relay:
    """Serves routes until `begin_shutdown()`, then drains and returns.

    `reload()` swaps in the routes of a new config while running: new routes start,
    removed ones stop accepting, changed ones apply to new connections, and every
    established connection carries on untouched. Upstreams keep the admin state and
    weight the operator set (`admin`), while their route and address stay configured.

    `fd_limit` and `count_fds` replace the process's open-file limit and fd count for
    the fd-headroom check (tests); by default they come from the process.
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
        fd_limit: int | None = None,
        count_fds: Callable[[], int] = count_open_fds,
    ) -> None:
        self.config = config
        self.runtimes = runtimes
        # One per listener that routes by TLS ClientHello: it accepts for its routes.
        self.acceptors = make_acceptors(runtimes, stats)
        self.stats = stats
        self.listeners = listeners
        self.pool = PipePool(stats.pipes)
        self.reactor = Reactor()
        self.serving = False
        self.table = SessionTable(access)
        self.setup = ConnectionSetup(self.table, self.reactor, self.pool, use_splice=use_splice)
        self.admission = Admission(
            stats,
            self.pool,
            self.table.sessions,
            self.setup.accepted,
            config.max_connections,
            fd_limit=fd_limit,
            count_fds=count_fds,
            reactor=self.reactor,
        )
        self._stop_requested = trio.Event()
        self._route_nursery: trio.Nursery | None = None
        self.admin = AdminStore()
        self.apply_admin(runtimes)

    def apply_admin(self, runtimes: list[RouteRuntime]) -> None:
        """Give `runtimes` the relay's admin store and their members its settings."""
        for runtime in runtimes:
            runtime.admin = self.admin
            runtime.apply_admin()

    @property
    def use_splice(self) -> bool:
        """Whether connections splice (False: every byte through user space)."""
        return self.setup.use_splice

    @property
    def active_sessions(self) -> int:
        return len(self.table)

    def is_ready(self) -> bool:
        """Listeners bound and every route has an upstream that is up (for /readyz)."""
        return self.serving and all(
            any(upstream.health.up for upstream in runtime.upstreams)
            for runtime in list(self.runtimes)
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as sessions:
                self.setup.nursery = sessions
                sessions.start_soon(self.reactor.run)
                sessions.start_soon(sweep_idle, self.table.sessions, self._current_runtimes)
                sessions.start_soon(expire_connects, self.table.connecting, self._current_runtimes)
                async with trio.open_nursery() as routes:
                    self._route_nursery = routes
                    for runtime in self.runtimes + self.acceptors:
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

    def _current_runtimes(self) -> list[RouteRuntime]:
        return self.runtimes + self.acceptors

    def _start_route(self, runtime: RouteRuntime) -> None:
        assert self._route_nursery is not None
        self._route_nursery.start_soon(self._run_route, runtime)

    async def _run_route(self, runtime: RouteRuntime) -> None:
        with runtime.scope:
            async with trio.open_nursery() as nursery:
                if runtime.accepts:
                    nursery.start_soon(self.admission.accept_loop, runtime)
                if runtime.tls is None:  # (an acceptor has no members of its own)
                    nursery.start_soon(maintain_members, runtime)

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
        acceptors = make_acceptors(runtimes, self.stats)
        for runtime in old + self.acceptors:
            runtime.scope.cancel()
            self.admission.stop_accepting(runtime)  # before its listener may close
        self.listeners.close_except({runtime.route.listen for runtime in runtimes}, close_socket)
        if config.max_connections != self.config.max_connections:
            self.admission.set_global_limit(config.max_connections)
        forget_removed_upstreams(runtimes)
        for route, address in self.admin.prune(config):
            log.info(
                "admin setting dropped: no longer in the config",
                extra={"fields": {"route": route, "upstream": address}},
            )
        self.apply_admin(runtimes)
        self.config = config
        self.runtimes = runtimes
        self.acceptors = acceptors
        for runtime in runtimes + acceptors:
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

    def begin_shutdown(self) -> None:
        """Stop accepting; running transfers get `shutdown_timeout` to finish."""
        self._stop_requested.set()

    def stop_all_sessions(self) -> None:
        """Cut every running session now (second signal, or drain timeout)."""
        self.table.stop_all(Outcome.SHUTDOWN)

    async def _drain(self) -> None:
        table = self.table
        if table.sessions:
            log.info(
                "draining",
                extra={
                    "fields": {
                        "connections": len(table),
                        "timeout_seconds": self.config.shutdown_timeout,
                    }
                },
            )
        with trio.move_on_after(self.config.shutdown_timeout):
            await table.wait_all_done()
        if table.sessions:
            log.warning(
                "shutdown timeout: closing remaining connections",
                extra={"fields": {"connections": len(table)}},
            )
            self.stop_all_sessions()
            await table.wait_all_done()
