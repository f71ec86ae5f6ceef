"""`workers` above 1: a small supervisor process that runs N relay processes on one set
of listeners, keeps them running, and speaks for them.

It is a process manager, not a relay: no trio, no connections. It
- binds every route's listener once (a port in use fails here, before any worker
  starts) and hands the sockets to each worker, which accept on them in turn;
- starts each worker as `splicerelay run -c /proc/self/fd/N`, N being its in-memory copy
  of the config (contract.py says what a worker receives), restarts a worker that
  dies after a short backoff, and counts it;
- validates the config on SIGHUP (or a change seen with --watch) and only then has every
  worker reload it; SIGTERM/SIGINT make every worker drain, and a second one makes them
  close their connections;
- is the service manager for its workers (their NOTIFY_SOCKET is its socket) and tells
  the real one READY=1 once all are ready, STATUS=, RELOADING=1, STOPPING=1, WATCHDOG=1;
- serves one /metrics, /healthz and /readyz for all of them (scrape.py);
- serves the control socket for all of them (control.py, in a thread of its own:
  control_thread.py), and replays the upstreams' admin states to a restarted worker.

The Supervisor here says what to do on each event; supervisor_loop.py waits for the
events (signals, the notify socket, the control socket's requests, timers). A reload's
rounds are followed by reload_rounds.py; supervisor_reloads.py reads the file for a
reload and keeps what is said of each one (counts, `show info`'s last reload, log lines).

Workers read the config text the supervisor validated (config_copy.py), so that every
worker, including one restarted later, runs the config the supervisor accepted, never a
half-edited file. Nothing here writes to the file system: the copies are memfds, and the
sockets between the processes live in a private directory when one can be made, else in
the abstract namespace (rendezvous.py), so a read-only root is no obstacle.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

from splicerelay import __version__
from splicerelay.config import Config, ConfigError, worker_count
from splicerelay.ops.control_path import ControlPathError
from splicerelay.ops.metrics import MetricsServer
from splicerelay.ops.service import RunOptions, configure_logs, status_line
from splicerelay.ops.systemd import Notifier, NotifyReceiver, passed_sockets
from splicerelay.relay.control_socket import ControlSocketError
from splicerelay.relay.listeners import ListenError, ListenerSet, Role
from splicerelay.workers.contract import CUT_SIGNAL
from splicerelay.workers.control_link import ControlLink, iso_time, start_control
from splicerelay.workers.control_thread import ReloadRequest
from splicerelay.workers.merged_metrics import Exposition
from splicerelay.workers.pool import WorkerPool
from splicerelay.workers.reload_rounds import ReloadRounds
from splicerelay.workers.rendezvous import Rendezvous, open_rendezvous
from splicerelay.workers.scrape import WorkerScraper, make_merged_registry
from splicerelay.workers.supervisor_loop import supervise
from splicerelay.workers.supervisor_metrics import supervisor_families
from splicerelay.workers.supervisor_reloads import (
    ReloadHistory,
    ReloadRefused,
    Snapshot,
    read_reload,
)
from splicerelay.workers.worker_table import (
    Worker,
    WorkerTable,
    describe_exit,
    worker_watchdog_seconds,
)

log = logging.getLogger("splicerelay")

STOP_GRACE = 15.0  # after shutdown_timeout, seconds before SIGKILL to stuck workers


def ready_fields(pids: list[int], config: Config, listeners: ListenerSet) -> dict[str, object]:
    """What the supervisor's "ready" log line says."""
    return {
        "version": __version__,
        "workers": pids,
        "routes": {route.name: listeners.describe(route.listen) for route in config.routes},
    }


class Supervisor:
    """What the supervisor does on each event; supervisor_loop.supervise() runs it."""

    def __init__(
        self,
        options: RunOptions,
        config: Config,
        config_text: str,
        listeners: ListenerSet,
        rendezvous: Rendezvous,
    ) -> None:
        """Raises OSError when the notify socket cannot be bound."""
        if options.config_path is None:
            raise ValueError("the supervisor runs a config file")
        self.options = options
        self.path: str = options.config_path
        self.listeners = listeners
        self.rendezvous = rendezvous
        self.table = WorkerTable(worker_count(config.workers), worker_watchdog_seconds(os.environ))
        self.history = ReloadHistory()
        self.rounds = ReloadRounds(Snapshot(config, config_text))
        self.announced = False  # READY=1 sent to the real service manager
        self.started_at = time.time()
        self.link: ControlLink | None = None  # the control socket, when it is on
        self.stopping = False
        self._stop_deadline: float | None = None
        self._exit_code = 0
        self.notifier = Notifier()
        self.receiver = NotifyReceiver(rendezvous.notify_address)
        self.scraper = WorkerScraper(lambda: self.pool.views, lambda: self.count, self.own_families)
        self.pool = WorkerPool(
            options,
            self.table,
            listeners,
            rendezvous,
            self.receiver,
            self.scraper.worker_gone,
            lambda: self.rounds.current.text,
        )

    @property
    def config(self) -> Config:
        """The current snapshot's config: what a worker started now runs."""
        return self.rounds.current.config

    @property
    def count(self) -> int:
        return self.table.count

    def info(self) -> dict[str, object]:
        """`show info`'s answer for the whole relay, with the keys one relay process
        answers with (relay/control_commands.py); the workers' rows come with it."""
        snapshot = self.rounds.current
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": iso_time(self.started_at),
            "uptime_seconds": round(max(0.0, time.time() - self.started_at), 3),
            "workers": self.count,
            "connections": self.table.connections(),
            "routes": len(snapshot.config.routes),
            # Absolute, as a single relay says it: `reload` compares it with its -c.
            "config_path": os.path.abspath(self.path) if self.path else self.path,
            "config_sha256": snapshot.sha256,
            "config_loaded": iso_time(snapshot.loaded_at),
            "last_reload": self.history.last,
            "reloads": dict(self.history.record.counts),
            "control_socket": None if self.link is None else self.link.thread.path,
        }

    def publish(self) -> None:
        """Give the control socket a fresh view of the workers and of the supervisor."""
        if self.link is not None:
            self.link.publish(self.table, self.info(), self.config)

    def own_families(self) -> Exposition:
        """The supervisor's own metrics (read from the metrics threads)."""
        return supervisor_families(self.table.restarts, self.history.record, len(self.pool.views))

    # ----- workers -------------------------------------------------------------------

    def reap(self) -> None:
        for worker, returncode in self.pool.reap():
            self.worker_exited(worker, returncode)

    def worker_exited(self, worker: Worker, returncode: int) -> None:
        self.rounds.worker_gone(worker.pid)
        fields = {"slot": worker.slot, "pid": worker.pid, "status": describe_exit(returncode)}
        if self.stopping:
            log.info("worker stopped", extra={"fields": fields})
            return
        if not self.announced and not worker.ready and returncode != 0:
            # At start, a worker that cannot come up (say, an upstream name that does not
            # resolve) would fail the same way again and again: fail as one process would.
            log.error("worker failed to start; stopping", extra={"fields": fields})
            self._exit_code = 1
            self.begin_stop("worker failed to start")
            return
        delay = self.table.schedule_restart(worker, time.monotonic())
        log.warning(
            "worker exited; restarting it",
            extra={"fields": {**fields, "restart_in_seconds": round(delay, 3)}},
        )

    def restart_due(self, now: float) -> None:
        for worker in self.pool.restart_due(now):
            self.rounds.worker_started(worker.pid)  # it loads the current snapshot

    def read_notifications(self) -> None:
        """The workers' sd_notify messages: ready, connections, reload results."""
        for heard in self.pool.read_notifications():
            if heard.came_up:
                self.rounds.worker_ready(heard.worker.pid)
                if self.link is not None:
                    self.link.came_up(heard.worker)
            if heard.reload_ok is not None:
                self.rounds.answered(heard.worker.pid, heard.reload_ok)
        if not self.announced and not self.stopping and self.table.all_started_and_ready():
            self.announced = True
            self.notifier.ready(self.status())
            log.info(
                "ready",
                extra={"fields": ready_fields(self.table.pids(), self.config, self.listeners)},
            )

    def status(self) -> str:
        return status_line(self.table.connections(), len(self.table))

    # ----- reload --------------------------------------------------------------------

    def reload(self, reason: str, request: ReloadRequest | None = None) -> None:
        """Reload the config file in every worker; `request`, from the control socket,
        is answered once the round has ended (or at once, if there is none)."""
        if self.stopping:
            if request is not None and self.link is not None:
                self.link.refuse(request, "the relay is stopping")
            return
        self.notifier.reloading()
        try:
            snapshot = read_reload(self.path, self.config, self.listeners.addresses())
        except (ConfigError, ReloadRefused) as error:
            self._refuse(reason, error, request)
            return
        waiting = set(self.table.pids())
        number = self.rounds.start(snapshot, waiting, time.monotonic())
        self.history.started(number, reason)
        if request is not None and self.link is not None:
            self.link.wait_for_round(number, request)
        configure_logs(self.options, snapshot.config)
        log.info(
            "reloading every worker",
            extra={"fields": {"reason": reason, "workers": sorted(waiting)}},
        )
        self.pool.reload_all()
        self.finish_reloads(time.monotonic())

    def _refuse(self, reason: str, error: Exception, request: ReloadRequest | None) -> None:
        self.history.refused(reason, error)
        self.notifier.ready(self.status())
        if request is not None and self.link is not None:
            self.link.refuse(request, str(error))

    def finish_reloads(self, now: float) -> None:
        """Count the reloads every worker has answered (or that timed out), in order,
        and do what each outcome asks."""
        for outcome in self.rounds.finish(now):
            if outcome.restore is not None:
                # Every worker refused it (a name that does not resolve, say) and runs the
                # config from before: so must a worker restarted or reloaded from here
                # on (the rounds' current snapshot is that one again). Before the log
                # lines of its end, so that they come out as the restored config says.
                configure_logs(self.options, outcome.restore.config)
            self.history.ended(outcome)
            if outcome.close_dropped_listeners:
                # The supervisor's copies of listeners no route uses any more: closed
                # now, so a restarted worker does not get them (the workers close theirs
                # as they reload). Not before: if every worker refused the config, the
                # old routes still need them.
                self.listeners.close_except({route.listen for route in self.config.routes}, _close)
            if outcome.announce_ready and not self.stopping:
                self.notifier.ready(self.status())
            if self.link is not None:
                self.publish()
                self.link.round_ended(outcome, self.config)

    # ----- stop ----------------------------------------------------------------------

    def begin_stop(self, reason: str) -> None:
        if self.stopping:
            log.info("second signal: closing all connections now")
            self.pool.signal_all(CUT_SIGNAL)
            return
        self.stopping = True
        self.table.cancel_restarts()
        key = "signal" if reason.startswith("SIG") else "reason"
        log.info("stopping", extra={"fields": {key: reason}})
        self.notifier.stopping(f"draining {self.status()}")
        # Why close our copies first: a listening socket stays open, and keeps completing
        # handshakes into its backlog, until its last descriptor closes. With ours gone,
        # the port refuses new clients as soon as every worker has closed its own.
        self.listeners.close_all(_close)
        self.pool.signal_all(signal.SIGTERM)
        self._stop_deadline = time.monotonic() + self.config.shutdown_timeout + STOP_GRACE

    def check_stop_deadline(self, now: float) -> None:
        if self._stop_deadline is not None and now >= self._stop_deadline and self.table:
            log.warning(
                "workers still running after the drain: killing them",
                extra={"fields": {"workers": self.table.pids()}},
            )
            self.pool.signal_all(signal.SIGKILL)
            self._stop_deadline = None

    # ----- the loop (supervisor_loop.py runs it) ---------------------------------------

    def start_workers(self) -> None:
        """Start a worker in every slot; raises OSError."""
        for slot in range(self.count):
            self.rounds.worker_started(self.pool.spawn(slot).pid)

    @property
    def exit_code(self) -> int:
        return self._exit_code

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
        elif signum == signal.SIGHUP:
            self.reload("SIGHUP")
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.begin_stop(signal.Signals(signum).name)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.pool.close()
        self.receiver.close()
        self.notifier.close()
        self.listeners.close_all(_close)


def _close(sock: socket.socket) -> None:
    sock.close()


def run_supervisor(options: RunOptions, config: Config, config_text: str) -> int:
    """`splicerelay run -c FILE` with workers > 1, running `config` (read from
    `config_text`); returns the exit code."""
    listeners = ListenerSet(passed_sockets(), role=Role.SUPERVISOR)
    for route in config.routes:
        try:
            listeners.take(route.name, route.listen)
        except ListenError as error:
            log.error(f"route {route.name}: {error}")
            listeners.close_all(_close)
            return 1
    rendezvous = open_rendezvous(os.environ)
    metrics_address = options.metrics_address
    metrics_server = None
    supervisor: Supervisor | None = None
    try:
        try:
            supervisor = Supervisor(options, config, config_text, listeners, rendezvous)
        except OSError as error:
            log.error(f"cannot open the workers' notify socket: {error.strerror or error}")
            return 1
        try:
            supervisor.link = start_control(config, supervisor.rounds.timeout)
            if supervisor.link is not None:
                supervisor.pool.admin_snapshot = supervisor.link.thread.handler.memory.snapshot
        except (ControlSocketError, ControlPathError) as error:
            log.error(str(error))
            return 1
        supervisor.publish()
        if metrics_address is not None:
            try:
                metrics_server = MetricsServer(
                    metrics_address,
                    make_merged_registry(supervisor.scraper),
                    is_ready=supervisor.scraper.all_ready,
                )
            except OSError as error:
                log.error(f"cannot serve metrics on {metrics_address}: {error.strerror or error}")
                return 1
            metrics_server.start()
        log.info(
            "starting workers",
            extra={"fields": {"workers": supervisor.count, "version": __version__}},
        )
        code = supervise(supervisor)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        if supervisor is not None:
            supervisor.close()
        listeners.close_all(_close)
        rendezvous.close()
    log.info("stopped")
    return code
