"""What the control socket's commands do in one relay process.

relay/control_socket.py serves the socket and parses each line; `ControlCommands` is
its handler: it answers `show ...` from the running relay, applies `set upstream ...`
through relay/admin.py, ends a connection for `kill connection ID`, and runs a reload
for `reload`, answering only once that reload has been applied or refused. Errors an
operator can act on (an unknown route, a connection that has ended) are CommandFailed:
an error reply that names what exists.

A supervisor with workers answers the configured socket itself (workers/control.py)
and asks each worker's handler, this one, for its part; so rows here are per process,
and their counters (`..._connections`, `bytes_...`) add up across workers.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import trio

from splicerelay import __version__
from splicerelay.datapath.session import Session
from splicerelay.protocol.control import (
    Command,
    CommandFailed,
    KillConnection,
    Reload,
    SetUpstreamState,
    SetUpstreamWeight,
    ShowConnections,
    ShowInfo,
    ShowRoutes,
    ShowUpstreams,
)
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay import admin
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.passed import listening_on
from splicerelay.relay.routes import RouteRuntime

__all__ = [
    "ConfigRecord",
    "ControlCommands",
    "ReloadResult",
    "ServiceRecord",
    "connection_row",
    "iso_time",
    "text_sha256",
]

# How long `kill connection` waits for the connection to be gone before it answers
# (most end at once; one reading a PROXY header ends when its task next runs).
KILL_WAIT: Final = 2.0
_KILL_POLL = 0.005


def iso_time(unix_time: float) -> str:
    """A unix time as ISO 8601 in UTC, to the second: for people and scripts alike."""
    return datetime.fromtimestamp(unix_time, UTC).isoformat(timespec="seconds")


def text_sha256(text: str) -> str:
    """The sha256 of a config file's text, as `sha256sum FILE` prints it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ConfigRecord:
    """The config in force: its file, the sha256 of its text, and when it was loaded."""

    path: str | None  # None: a one-off relay from command-line flags
    sha256: str | None
    loaded_at: float  # unix time


@dataclass(frozen=True)
class ReloadResult:
    """How one reload ended: applied, or refused with the reason (the running config
    stays)."""

    applied: bool
    at: float  # unix time
    trigger: str  # "SIGHUP", "control socket", "file changed"
    error: str | None = None

    def data(self) -> dict[str, object]:
        """The `reload` reply's data; `show info` shows it as the last reload."""
        data: dict[str, object] = {
            "result": "ok" if self.applied else "refused",
            "time": iso_time(self.at),
            "trigger": self.trigger,
        }
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass
class ServiceRecord:
    """What a running relay knows about itself beyond its routes, for `show info`.

    The service loop (relay/service.py) keeps it: the config in force and the last
    reload are replaced as a whole when a reload ends."""

    config: ConfigRecord
    started_at: float = field(default_factory=time.time)  # unix time
    control_socket: str | None = None
    worker: int | None = None  # the slot, when this process is a supervisor's worker
    last_reload: ReloadResult | None = None


ReloadFunction = Callable[[str], Awaitable[ReloadResult]]


class ControlCommands:
    """The control socket's handler for one relay process (see the module docstring).

    `reload(trigger)` runs one reload as SIGHUP does and returns how it ended.
    `clock` (unix time) is replaceable for tests; ages of connections are on trio's
    clock, like the idle sweep's."""

    def __init__(
        self,
        relay: Relay,
        record: ServiceRecord,
        reload: ReloadFunction,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.relay = relay
        self.record = record
        self._reload = reload
        self._clock = clock

    async def __call__(self, command: Command) -> object:
        relay = self.relay
        try:
            match command:
                case ShowInfo():
                    return self.show_info()
                case ShowRoutes():
                    return [route_row(runtime) for runtime in relay.runtimes]
                case ShowUpstreams():
                    return admin.upstream_rows(relay, command.route)
                case ShowConnections():
                    return self.show_connections(command.route, command.limit)
                case SetUpstreamState():
                    return admin.set_upstream_state(
                        relay,
                        command.route,
                        command.address,
                        command.state,
                        kill_connections=command.kill_connections,
                    )
                case SetUpstreamWeight():
                    return admin.set_upstream_weight(
                        relay, command.route, command.address, command.weight
                    )
                case KillConnection():
                    return await self.kill_connection(command)
                case Reload():
                    result = await self._reload("control socket")
                    if not result.applied:
                        raise CommandFailed(result.error or "reload refused", result.data())
                    return result.data()
        except admin.AdminError as error:
            raise CommandFailed(str(error)) from None
        raise CommandFailed(f"{type(command).__name__}: not a command this relay runs")

    # ----- show ----------------------------------------------------------------------

    def show_info(self) -> dict[str, object]:
        record, relay = self.record, self.relay
        now = self._clock()
        last = record.last_reload
        info: dict[str, object] = {
            "version": __version__,
            "pid": os.getpid(),
            "started": iso_time(record.started_at),
            "uptime_seconds": round(max(0.0, now - record.started_at), 3),
            "workers": 1,
            "connections": relay.active_sessions,
            "routes": len(relay.runtimes),
            "data_path": "splice" if relay.use_splice else "copy",
            "config_path": record.config.path,
            "config_sha256": record.config.sha256,
            "config_loaded": iso_time(record.config.loaded_at),
            "last_reload": None if last is None else last.data(),
            "reloads": dict(relay.stats.config_reloads),
            "control_socket": record.control_socket,
        }
        if record.worker is not None:
            info["worker"] = record.worker
        return info

    def show_connections(self, route: str | None, limit: int | None) -> list[dict[str, object]]:
        sessions = self.relay.table.sessions
        if route is not None and not any(r.route.name == route for r in sessions.values()):
            self._runtime(route)  # an unknown route is an error; a known one may be empty
        now = trio.current_time()
        chosen = sorted(
            (
                (session, runtime)
                for session, runtime in sessions.items()
                if route is None or runtime.route.name == route
            ),
            key=lambda item: item[0].id,
        )
        if limit is not None:
            chosen = chosen[:limit]
        return [connection_row(session, runtime, now) for session, runtime in chosen]

    # ----- kill ----------------------------------------------------------------------

    async def kill_connection(self, command: KillConnection) -> dict[str, object]:
        if command.slot is not None:
            raise CommandFailed(
                f"no connection {command.label}: this relay runs no workers, so a connection"
                " id is a plain number, as show connections prints it"
            )
        table = self.relay.table
        session = table.find(command.id)
        if session is None:
            raise CommandFailed(
                f"no connection {command.id}: it has ended, or there never was one;"
                " show connections lists the open ones"
            )
        runtime = table.sessions[session]
        session.stop(Outcome.KILLED)
        # Why wait: an answer should mean the connection is gone. Most end inside stop();
        # one whose task reads a PROXY header ends when that task runs next.
        with trio.move_on_after(KILL_WAIT):
            while session in table.sessions:
                await trio.sleep(_KILL_POLL)
        row = connection_row(session, runtime, trio.current_time())
        row["outcome"] = (session.closing_outcome or Outcome.KILLED).value
        row["closed"] = session not in table.sessions
        return row

    # ----- helpers -------------------------------------------------------------------

    def _runtime(self, name: str) -> RouteRuntime:
        """The running route `name`; CommandFailed naming the routes there are."""
        runtimes = self.relay.runtimes
        for runtime in runtimes:
            if runtime.route.name == name:
                return runtime
        names = ", ".join(runtime.route.name for runtime in runtimes) or "none"
        raise CommandFailed(f"no route {name} (routes: {names})")


def route_row(runtime: RouteRuntime) -> dict[str, object]:
    """One row of `show routes`."""
    route = runtime.route
    return {
        "name": route.name,
        "listen": listening_on(route.listen, runtime.listener),
        "balance": route.balance,
        "upstreams": len(route.upstreams),
        "active_connections": runtime.stats.active,
        "limits": {
            "max_connections": route.max_connections,
            "max_connections_per_source": route.max_connections_per_source,
            "connect_timeout_seconds": route.connect_timeout,
            "idle_timeout_seconds": route.idle_timeout,
            "max_duration_seconds": route.max_duration,
        },
    }


def _phase(session: Session) -> str:
    if session.adopted:
        return "relaying"
    if session.cancel_scope is not None:
        return "proxy_header"  # waiting for the PROXY header a trusted proxy sends
    return "connecting"


def connection_row(session: Session, runtime: RouteRuntime, now: float) -> dict[str, object]:
    """One row of `show connections`; `now` on trio's clock.

    Idle time is as the idle sweep sees it: since the sweep last saw bytes move, or 0
    when bytes have moved since that sweep (so it is exact to a sweep interval)."""
    moved_since_sweep = session.activity != session.seen_activity
    return {
        "id": session.id,
        "route": runtime.route.name,
        "client": session.client_address,
        "upstream": session.upstream_label or None,
        "state": _phase(session),
        "age_seconds": round(max(0.0, now - session.started), 3),
        "idle_seconds": 0.0 if moved_since_sweep else round(max(0.0, now - session.idle_since), 3),
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
    }
