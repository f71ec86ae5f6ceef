"""The relay as a running service: one process serving every route, until a signal.

This is `splicerelay run` when it runs alone (workers: 1) and also what each worker process
of a supervisor runs. It builds the relay from a validated config, serves /metrics, keeps
the service manager informed (READY, RELOADING, STOPPING, STATUS, WATCHDOG), reloads on
SIGHUP or a changed file, and drains on SIGTERM/SIGINT. What differs in a worker comes in
as an `AsWorker` value, so that this layer needs nothing from the supervisor's.

It also serves the control socket (relay/control_socket.py, with the commands of
control_commands.py) from when the listeners are bound until the drain has ended. Where:
`control.socket`, or for "auto" the default place of ops/control_path.py. A configured
path that cannot be had is a startup error; a default place that cannot be (a read-only
/run, another relay there already) is a warning, and the relay runs without one. A
worker serves only the private socket its supervisor names.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

import trio

from splicerelay import __version__
from splicerelay.config import Config, ConfigError, config_warnings, read_config
from splicerelay.config.addresses import Address
from splicerelay.datapath.session import Session
from splicerelay.datapath.stats import RelayStats
from splicerelay.ops.access_log import ACCESS_LOG
from splicerelay.ops.control_path import (
    ControlPathError,
    ControlPlace,
    control_place,
    make_directory,
    no_default_reason,
)
from splicerelay.ops.metrics import MetricsServer, make_registry
from splicerelay.ops.service import (
    STATUS_INTERVAL,
    WATCH_INTERVAL,
    FileWatch,
    RunOptions,
    configure_logs,
    log_reload_refused,
    status_line,
    warn_restart_only_changes,
)
from splicerelay.ops.systemd import Notifier, watchdog_interval
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.admin import AdminError, apply_admin_snapshot
from splicerelay.relay.control_commands import (
    ConfigRecord,
    ControlCommands,
    ReloadResult,
    ServiceRecord,
    text_sha256,
)
from splicerelay.relay.control_socket import (
    ControlListener,
    ControlServer,
    ControlSocketError,
    bind_control_socket,
)
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.listeners import ListenerSet
from splicerelay.relay.passed import listening_on
from splicerelay.relay.routes import RouteRuntime, StartupError, prepare_routes

log = logging.getLogger("splicerelay")

# Diagnostics only: set to 1 to move every byte through user space instead of splice(2),
# e.g. to rule the zero-copy path in or out while chasing a problem.
FORCE_COPY_ENV = "SPLICERELAY_FORCE_COPY"


@dataclass(frozen=True)
class AsWorker:
    """How the service differs when a supervisor runs this process as one of its workers."""

    slot: int  # tagged on every log line
    cut_signal: signal.Signals  # the supervisor's "close every connection now"
    reload_result_field: str  # the notify field that tells the supervisor how a reload went
    # Where to serve the control socket that only the supervisor uses (None: none). A
    # worker never serves the configured control.socket: that is the supervisor's.
    control_socket: str | None = None
    # The upstreams' admin states the other workers hold (relay/admin.admin_snapshot's
    # rows), taken before this one serves: a restarted worker must not send a connection
    # to an upstream an operator drained.
    admin_snapshot: tuple[dict[str, object], ...] = ()


class WorkerTag(logging.Filter):
    """Adds `worker` (the slot) to every line a worker process logs."""

    def __init__(self, slot: int) -> None:
        super().__init__()
        self.slot = slot

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), "worker": self.slot}
        return True


def configure_service_logs(
    options: RunOptions, config: Config, worker: AsWorker | None = None
) -> None:
    configure_logs(options, config, None if worker is None else worker.slot)
    if worker is not None:
        tag = WorkerTag(worker.slot)
        for handler in log.handlers:
            handler.addFilter(tag)


def log_config_warnings(config: Config, worker: AsWorker | None) -> None:
    """Say at warning level what in `config` is valid but probably a mistake.

    Every worker loads the same file, so only the first one says it, not one line per
    worker (a restarted first worker says it again).
    """
    if worker is None or worker.slot == 0:
        for warning in config_warnings(config):
            log.warning(warning)


def write_access_log(runtime: RouteRuntime, session: Session, outcome: Outcome) -> None:
    """The access line of a finished connection.

    `upstream` is the upstream the connection was relayed to or, when no connect
    succeeded, the last one tried (None when none was: denied, no upstream, a limit).
    On a listener that routes by TLS ClientHello, the hello's SNI and ALPN follow.
    """
    ACCESS_LOG.write(
        runtime.route.name,
        session.client_address,
        session.upstream_label or None,
        session.bytes_in,
        session.bytes_out,
        trio.current_time() - session.started,
        outcome.value,
        session.sni,
        session.alpn,
        session.tls_error,
    )


def relay_status(relay: Relay) -> str:
    return status_line(relay.active_sessions)


class Reloader:
    """Re-reads the config file and applies it; one reload at a time.

    `record` keeps the config in force and how the last reload went, for `show info`."""

    def __init__(
        self,
        options: RunOptions,
        relay: Relay,
        notifier: Notifier,
        worker: AsWorker | None = None,
        record: ServiceRecord | None = None,
    ) -> None:
        self.options = options
        self.path = options.config_path
        self.relay = relay
        self.notifier = notifier
        self.worker = worker
        self.record = record or ServiceRecord(ConfigRecord(self.path, None, time.time()))
        # Set once the drain has begun: a reload then is refused without a word to the
        # service manager (READY=1 after STOPPING=1 would tell it the relay is back).
        self.stopping = False
        self._lock = trio.Lock()

    async def reload(self, reason: str) -> ReloadResult:
        """Reload and return how it went, once it has been applied or refused (a reload
        already running is waited for first)."""
        if self.path is None:
            message = "nothing to reload: the relay runs from command-line flags"
            log.warning(message)
            return ReloadResult(False, time.time(), reason, message)
        if self.stopping:
            return ReloadResult(False, time.time(), reason, "the relay is shutting down")
        async with self._lock:
            self.notifier.reloading()
            reloads = self.relay.stats.reloads
            result = "failure"
            outcome = ReloadResult(False, time.time(), reason, "the reload did not finish")
            try:
                config, text = await trio.to_thread.run_sync(read_config, self.path)
                if self.worker is None:  # (a worker's supervisor says this, once, for all)
                    warn_restart_only_changes(self.relay.config, config, ("metrics",))
                    if config.control != self.relay.config.control:
                        log.warning("control.socket changed: it takes effect at the next restart")
                await self.relay.reload(config)
            except (ConfigError, StartupError) as error:
                reloads.record("failure")
                log_reload_refused(reason, error)
                outcome = ReloadResult(False, time.time(), reason, str(error))
            else:
                reloads.record("success")
                result = "success"
                now = time.time()
                self.record.config = ConfigRecord(
                    os.path.abspath(self.path), text_sha256(text), now
                )
                outcome = ReloadResult(True, now, reason)
                configure_service_logs(self.options, config, self.worker)
                log_config_warnings(config, self.worker)
            finally:
                self.record.last_reload = outcome
                # A worker tells its supervisor how the reload went, which counts it.
                extra = (
                    () if self.worker is None else (f"{self.worker.reload_result_field}={result}",)
                )
                self.notifier.ready(relay_status(self.relay), *extra)
        return outcome

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Reload when the file changes; also when a ConfigMap swaps its symlink."""
        assert self.path is not None
        watch = FileWatch(self.path)
        while True:
            await trio.sleep(interval)
            if watch.changed():
                await self.reload("file changed")


async def keep_service_manager_informed(relay: Relay, notifier: Notifier) -> None:
    """WATCHDOG=1 at half of WATCHDOG_USEC, and STATUS= with the connection count."""
    watchdog = watchdog_interval()
    interval = min(watchdog, STATUS_INTERVAL) if watchdog else STATUS_INTERVAL
    last_status = ""
    while True:
        if watchdog:
            notifier.watchdog()
        status = relay_status(relay)
        if status != last_status:
            notifier.status(status)
            last_status = status
        await trio.sleep(interval)


async def serve_until_signalled(
    relay: Relay,
    notifier: Notifier,
    reloader: Reloader,
    control: ControlServer | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain; a second signal cuts the drain short.

    SIGHUP reloads the config file. A worker process takes its cue for cutting the drain
    short from its supervisor (its cut signal) only; a repeated SIGTERM does nothing more.
    `control`, a bound control socket, is served from before READY=1 until the drain has
    ended (`show connections` is useful during a drain).
    """
    worker = reloader.worker
    watched: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    if worker is not None:
        watched += (worker.cut_signal,)
    with trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await relay.serve(task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve)
            if control is not None:
                nursery.start_soon(control.serve)
            notifier.ready(relay_status(relay))
            log.info(
                "ready" if worker is None else "worker ready",
                extra={
                    "fields": {
                        "version": __version__,
                        "routes": {
                            r.route.name: listening_on(r.route.listen, r.listener)
                            for r in relay.runtimes
                        },
                        "data_path": "splice" if relay.use_splice else "copy",
                        "control_socket": reloader.record.control_socket,
                    }
                },
            )
            nursery.start_soon(ACCESS_LOG.keep_flushing)
            if notifier.enabled:
                nursery.start_soon(keep_service_manager_informed, relay, notifier)
            if reloader.options.watch:
                nursery.start_soon(reloader.watch)
            stopping = False
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if not stopping:
                        await reloader.reload("SIGHUP")
                    continue
                if worker is not None and signum == worker.cut_signal:
                    log.info("told to close all connections now")
                    relay.begin_shutdown()
                    relay.stop_all_sessions()
                    stopping = reloader.stopping = True
                    continue
                if not stopping:
                    stopping = reloader.stopping = True
                    log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
                    notifier.stopping(f"draining {relay_status(relay)}")
                    relay.begin_shutdown()
                elif worker is None:
                    log.info("second signal: closing all connections now")
                    relay.stop_all_sessions()


def control_place_of(config: Config, worker: AsWorker | None) -> ControlPlace | None:
    """Where this process serves its control socket, if anywhere."""
    if worker is not None:
        path = worker.control_socket
        return None if path is None else ControlPlace(path, True, None, "the supervisor")
    return control_place(config.control.socket, os.environ, os.geteuid())


def open_control_socket(config: Config, worker: AsWorker | None) -> ControlListener | None:
    """Bind the control socket; None when there is none (said in the log).

    Raises ControlSocketError when a configured path cannot be had: a startup error."""
    place = control_place_of(config, worker)
    if place is None:
        if worker is None and config.control.socket is not None:
            log.info(f"no control socket: {no_default_reason(config.control.socket)}")
        return None
    try:
        make_directory(place)
        return bind_control_socket(place.path)
    except (ControlPathError, ControlSocketError) as error:
        if place.configured:
            raise ControlSocketError(str(error)) from None
        log.warning(
            f"{error}; running without a control socket (splicerelay ctl and reload will"
            " not reach this relay; set control.socket to give it one)",
            extra={"fields": {"chosen_by": place.source}},
        )
        return None


def run_relay(
    options: RunOptions,
    config: Config,
    listeners: ListenerSet,
    worker: AsWorker | None = None,
    metrics_address: Address | None = None,
    config_text: str | None = None,
) -> int:
    """Serve `config` in this process until a stop signal; returns the exit code.

    `metrics_address` overrides `options.metrics_address` (a worker serves its metrics on
    a private unix socket for its supervisor). `config_text` is the text `config` was
    read from, for the sha256 that `show info` reports.
    """
    record = ServiceRecord(
        ConfigRecord(
            None if options.config_path is None else os.path.abspath(options.config_path),
            None if config_text is None else text_sha256(config_text),
            time.time(),
        ),
        worker=None if worker is None else worker.slot,
    )
    log_config_warnings(config, worker)
    stats = RelayStats()
    try:
        runtimes = prepare_routes(config, stats, listeners)
    except StartupError as error:
        log.error(str(error))
        listeners.close_all(lambda sock: sock.close())
        return 1
    use_splice = os.environ.get(FORCE_COPY_ENV, "") not in ("1", "true", "yes")
    relay = Relay(
        config, runtimes, stats, listeners, use_splice=use_splice, access=write_access_log
    )
    relay.reactor.after_round = ACCESS_LOG.flush_round
    if worker is not None and worker.admin_snapshot:
        try:
            apply_admin_snapshot(relay, worker.admin_snapshot)
        except AdminError as error:
            log.error(f"cannot take the other workers' upstream admin states: {error}")
    address = metrics_address or options.metrics_address
    metrics_server = None
    if address is not None:
        try:
            registry = make_registry(
                stats,
                __version__,
                config=lambda: relay.config,  # the limits follow reloads
                worker=None if worker is None else str(worker.slot),
            )
            metrics_server = MetricsServer(address, registry, is_ready=relay.is_ready)
        except OSError as error:
            listeners.close_all(lambda sock: sock.close())
            log.error(f"cannot serve metrics on {address}: {error.strerror or error}")
            return 1
        metrics_server.start()
    try:
        control_listener = open_control_socket(config, worker)
    except ControlSocketError as error:
        listeners.close_all(lambda sock: sock.close())
        if metrics_server is not None:
            metrics_server.close()
        log.error(str(error))
        return 1
    notifier = Notifier()
    reloader = Reloader(options, relay, notifier, worker, record)
    control = None
    if control_listener is not None:
        record.control_socket = control_listener.path
        control = ControlServer(control_listener, ControlCommands(relay, record, reloader.reload))
    try:
        trio.run(serve_until_signalled, relay, notifier, reloader, control)
    finally:
        # Every connection has ended by now: its line is written before the process
        # exits, whether the drain ended on SIGTERM, in a worker told to stop, or here.
        ACCESS_LOG.close()
        notifier.close()
        if metrics_server is not None:
            metrics_server.close()
        if control_listener is not None:
            control_listener.close()
    log.info("stopped")
    return 0
