"""`workers` above 1: a small supervisor process that runs N relay processes on one set
of listeners, keeps them running, and speaks for them.

It is a process manager, not a relay: no trio, no connections. It
- binds every route's listener once (a port in use fails here, before any worker
  starts) and hands the sockets to each worker, which accept on them in turn;
- starts each worker as `splicerelay run -c SNAPSHOT` (worker_env.py says what a worker
  receives), restarts a worker that dies after a short backoff, and counts it;
- validates the config on SIGHUP (or a change seen with --watch) and only then has every
  worker reload it; SIGTERM/SIGINT make every worker drain, and a second one makes them
  close their connections;
- is the service manager for its workers (their NOTIFY_SOCKET is its socket) and tells
  the real one READY=1 once all are ready, STATUS=, RELOADING=1, STOPPING=1, WATCHDOG=1;
- serves one /metrics, /healthz and /readyz for all of them (worker_scrape.py).

Workers read a snapshot of the config that the supervisor wrote after validating it, so
that every worker, including one restarted later, runs the config the supervisor
accepted, never a half-edited file.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from splicerelay import __version__
from splicerelay.config import Config, ConfigError, file_identity, read_config, worker_count
from splicerelay.config.addresses import Address, UnixAddress
from splicerelay.ops import logs
from splicerelay.ops.metrics import MetricsServer
from splicerelay.ops.systemd import Notifier, NotifyReceiver, passed_sockets, watchdog_interval
from splicerelay.relay.listeners import ListenError, ListenerSet, Role
from splicerelay.workers.contract import (
    CUT_SIGNAL,
    RELOAD_RESULT_FIELD,
    WORKER_ENV,
    InheritedSocket,
    WorkerSetup,
    encode,
)
from splicerelay.workers.merged_metrics import Exposition, counter_family, gauge_family
from splicerelay.workers.scrape import WorkerScraper, WorkerView, make_merged_registry

log = logging.getLogger("splicerelay")

RESTART_BACKOFF_FIRST = 0.1  # seconds before restarting a worker that died
RESTART_BACKOFF_MAX = 5.0  # doubling up to this while it keeps dying young
STABLE_AFTER = 10.0  # a worker that lived this long resets its slot's backoff
TICK = 0.5  # seconds between looks at timers when nothing else happens
WATCH_INTERVAL = 1.0  # seconds between looks at the config file with --watch
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to the service manager
RELOAD_RESULT_TIMEOUT = 60.0  # how long to wait for every worker to report a reload
STOP_GRACE = 15.0  # after shutdown_timeout, seconds before SIGKILL to stuck workers
# A ready worker that has sent nothing for this long is hung (its event loop no longer
# runs) and is killed, then restarted. Workers ping at half of it. The environment
# variable below overrides it (seconds; 0 turns the watchdog off).
WORKER_WATCHDOG_SECONDS = 20.0
WORKER_WATCHDOG_ENV = "SPLICERELAY_WORKER_WATCHDOG"
# The environment a worker must not inherit: socket activation is the supervisor's (the
# worker gets its sockets through WORKER_ENV), and so is systemd's watchdog.
NOT_FOR_WORKERS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass(eq=False)
class Worker:
    id: int
    slot: int
    process: subprocess.Popen[bytes]
    metrics_path: str
    started: float
    ready: bool = False
    connections: int = 0
    reload_pending: bool = False  # SIGHUP held back until the worker is ready
    last_heard: float = 0.0  # monotonic time of its last sd_notify message
    killed_as_hung: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(eq=False)
class ReloadRound:
    """One reload forwarded to the workers, until each has said how it went."""

    waiting: set[int]  # pids
    deadline: float
    # What every worker ran before: restored if they all refuse the new config.
    previous_config: Config
    previous_text: str
    failed: list[int] = field(default_factory=list)
    succeeded: list[int] = field(default_factory=list)


def describe_exit(returncode: int) -> str:
    """ "exit code 1" or "killed by SIGKILL", from a Popen return code."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def restart_delay(failures: int) -> float:
    """Seconds to wait before a slot's next restart after `failures` early deaths."""
    return min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_FIRST * 2.0 ** min(failures, 16))


_CONNECTIONS = re.compile(r"([0-9]+) connections?\b")


def worker_watchdog_seconds(environ: Mapping[str, str]) -> float:
    """The hung-worker timeout: WORKER_WATCHDOG_SECONDS unless the environment says."""
    text = environ.get(WORKER_WATCHDOG_ENV)
    if text is None:
        return WORKER_WATCHDOG_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        log.warning(
            "ignoring a bad worker watchdog setting",
            extra={"fields": {WORKER_WATCHDOG_ENV: text, "using": WORKER_WATCHDOG_SECONDS}},
        )
        return WORKER_WATCHDOG_SECONDS
    return seconds


def connections_in_status(status: str) -> int | None:
    """The connection count in a worker's STATUS= line ("3 connections")."""
    match = _CONNECTIONS.match(status)
    return int(match.group(1)) if match else None


def status_line(connections: int, workers: int) -> str:
    return (
        f"{connections} connection{'' if connections == 1 else 's'}"
        f" in {workers} worker{'' if workers == 1 else 's'}"
    )


def runtime_directory() -> str:
    """A private directory for the snapshot and the sockets between the processes.

    Under systemd's RUNTIME_DIRECTORY when the unit has one, else the temp directory.
    Why 0700 (mkdtemp's mode): whoever can reach the notify socket could claim a worker
    is ready, and whoever can reach a worker's socket could read its metrics.
    """
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    return tempfile.mkdtemp(prefix="splicerelay-", dir=base)


class Supervisor:
    def __init__(
        self,
        args: argparse.Namespace,
        config: Config,
        config_text: str,
        listeners: ListenerSet,
        directory: str,
    ) -> None:
        self.args = args
        self.path: str = args.config
        self.config = config
        self.listeners = listeners
        self.directory = directory
        self.snapshot = os.path.join(directory, "config.yaml")
        self.count = worker_count(config.workers)
        self.workers: list[Worker] = []
        self._views: tuple[WorkerView, ...] = ()
        self._ids = itertools.count(1)
        self._restart_at: dict[int, float] = {}  # slot -> when
        self._failures: Counter[int] = Counter()  # slot -> early deaths in a row
        self.restarts = 0
        self.worker_watchdog = worker_watchdog_seconds(os.environ)
        self.reloads: Counter[str] = Counter()
        self._rounds: list[ReloadRound] = []
        self.announced = False  # READY=1 sent to the real service manager
        self.stopping = False
        self._stop_deadline: float | None = None
        self._exit_code = 0
        self.notifier = Notifier()
        self.receiver = NotifyReceiver(os.path.join(directory, "notify.sock"))
        self.scraper = WorkerScraper(lambda: self._views, lambda: self.count, self.own_families)
        self._snapshot_text = ""  # what the snapshot file holds (write_snapshot)
        self.write_snapshot(config_text)

    # ----- the supervisor's own metrics (read from the metrics threads) ------------

    def own_families(self) -> Exposition:
        restarts = counter_family(
            "splicerelay_worker_restarts",
            "Worker processes that died and were started again.",
            [((), float(self.restarts))],
        )
        reloads = counter_family(
            "splicerelay_config_reloads",
            "Config reloads (SIGHUP or --watch), by result; a failure keeps the running config.",
            [
                ((("result", result),), float(self.reloads[result]))
                for result in ("success", "failure")
            ],
        )
        running = gauge_family(
            "splicerelay_workers", "Worker processes running now.", [((), float(len(self._views)))]
        )
        return {family.name: family for family in (restarts, reloads, running)}

    # ----- workers -------------------------------------------------------------------

    def write_snapshot(self, text: str) -> None:
        self._snapshot_text = text
        # Why write-then-rename: a worker that reads it at that moment gets the old file
        # or the new one, never a torn one.
        temporary = self.snapshot + ".new"
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, self.snapshot)

    def spawn(self, slot: int) -> None:
        worker_id = next(self._ids)
        metrics_path = os.path.join(self.directory, f"worker-{worker_id}.sock")
        handed = self.listeners.handover()
        setup = WorkerSetup(
            slot=slot,
            supervisor_pid=os.getpid(),
            metrics_path=metrics_path,
            sockets=tuple(
                InheritedSocket(item.sock.fileno(), item.name, item.kept) for item in handed
            ),
        )
        environment = {
            key: value for key, value in os.environ.items() if key not in NOT_FOR_WORKERS
        }
        environment[WORKER_ENV] = encode(setup)
        environment["NOTIFY_SOCKET"] = self.receiver.path
        if self.worker_watchdog:
            # The worker's own sd_notify code then sends WATCHDOG=1 at half of this.
            environment["WATCHDOG_USEC"] = str(int(self.worker_watchdog * 1e6))
        command = [sys.executable, "-m", "splicerelay", "run", "-c", self.snapshot]
        if self.args.log_level:
            command += ["--log-level", self.args.log_level]
        if self.args.log_format:
            command += ["--log-format", self.args.log_format]
        process = subprocess.Popen(
            command,
            env=environment,
            stdin=subprocess.DEVNULL,
            # Why pass_fds: every descriptor the supervisor opens is close-on-exec (Python's
            # default), and Popen closes all the others in the child; only the listeners
            # are meant to cross into the worker, at the numbers WORKER_ENV lists.
            pass_fds=[item.fd for item in setup.sockets],
            # Why a process group of its own: Ctrl-C in a terminal signals the whole
            # foreground group; the workers must hear SIGINT once, from the supervisor,
            # or the forwarded copy would look like a second one.
            process_group=0,
        )
        now = time.monotonic()
        self.workers.append(Worker(worker_id, slot, process, metrics_path, now, last_heard=now))
        self._refresh_views()

    def _refresh_views(self) -> None:
        # Replaced as a whole, so the metrics threads always see a consistent tuple.
        self._views = tuple(WorkerView(w.id, w.metrics_path) for w in self.workers)

    def reap(self) -> None:
        for worker in list(self.workers):
            returncode = worker.process.poll()
            if returncode is not None:
                self.worker_exited(worker, returncode)

    def worker_exited(self, worker: Worker, returncode: int) -> None:
        self.workers.remove(worker)
        self._refresh_views()
        self.scraper.worker_gone(worker.id)
        with contextlib.suppress(OSError):
            os.unlink(worker.metrics_path)
        for round_ in self._rounds:
            round_.waiting.discard(worker.pid)
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
        now = time.monotonic()
        if now - worker.started >= STABLE_AFTER:
            self._failures[worker.slot] = 0
        delay = restart_delay(self._failures[worker.slot])
        self._failures[worker.slot] += 1
        self._restart_at[worker.slot] = now + delay
        log.warning(
            "worker exited; restarting it",
            extra={"fields": {**fields, "restart_in_seconds": round(delay, 3)}},
        )

    def restart_due(self, now: float) -> None:
        for slot, when in list(self._restart_at.items()):
            if when <= now:
                del self._restart_at[slot]
                self.restarts += 1
                self.spawn(slot)
                log.info(
                    "worker restarted",
                    extra={"fields": {"slot": slot, "pid": self.workers[-1].pid}},
                )

    def kill_hung_workers(self, now: float) -> None:
        """SIGKILL each ready worker that has not been heard from within the watchdog
        time; reap() then restarts it like any worker that died.

        Why only ready workers: one still starting may be resolving names for longer.
        """
        if not self.worker_watchdog or self.stopping:
            return
        for worker in self.workers:
            silent = now - worker.last_heard
            if worker.ready and not worker.killed_as_hung and silent > self.worker_watchdog:
                worker.killed_as_hung = True
                log.error(
                    "worker stopped answering; killing it",
                    extra={
                        "fields": {
                            "slot": worker.slot,
                            "pid": worker.pid,
                            "silent_seconds": round(silent, 1),
                        }
                    },
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    def signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    # ----- sd_notify from the workers ---------------------------------------------

    def read_notifications(self) -> None:
        while (message := self.receiver.receive()) is not None:
            worker = next((w for w in self.workers if w.pid == message.pid), None)
            if worker is None:
                continue  # a worker already reaped, or not one of ours
            worker.last_heard = time.monotonic()
            fields = message.fields
            if fields.get("READY") == "1":
                worker.ready = True
                if worker.reload_pending:
                    worker.reload_pending = False
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGHUP)
            count = connections_in_status(fields.get("STATUS", ""))
            if count is not None:
                worker.connections = count
            result = fields.get(RELOAD_RESULT_FIELD)
            if result is not None:
                for round_ in self._rounds:
                    if worker.pid in round_.waiting:
                        round_.waiting.discard(worker.pid)
                        if result == "success":
                            round_.succeeded.append(worker.pid)
                        else:
                            round_.failed.append(worker.pid)
        if not self.announced and not self.stopping and self.all_started_and_ready():
            self.announced = True
            self.notifier.ready(self.status())
            log.info(
                "ready",
                extra={
                    "fields": {
                        "version": __version__,
                        "workers": [w.pid for w in self.workers],
                        "routes": {r.name: str(r.listen) for r in self.config.routes},
                    }
                },
            )

    def all_started_and_ready(self) -> bool:
        return len(self.workers) == self.count and all(w.ready for w in self.workers)

    def status(self) -> str:
        return status_line(sum(w.connections for w in self.workers), len(self.workers))

    # ----- reload --------------------------------------------------------------------

    def reload(self, reason: str) -> None:
        if self.stopping:
            return
        self.notifier.reloading()
        try:
            config, text = read_config(self.path)
        except ConfigError as error:
            self.reloads["failure"] += 1
            log.error(
                "reload failed: invalid config; the running config stays",
                extra={"fields": {"reason": reason, "errors": error.errors}},
            )
            self.notifier.ready(self.status())
            return
        new_unix = [
            route
            for route in config.routes
            if isinstance(route.listen, UnixAddress)
            and route.listen not in self.listeners.addresses()
        ]
        if new_unix:
            self.reloads["failure"] += 1
            log.error(
                "reload failed; the running config stays",
                extra={
                    "fields": {
                        "reason": reason,
                        "error": f"route {new_unix[0].name}: a new unix socket listener"
                        f" ({new_unix[0].listen}) needs a restart when workers > 1",
                    }
                },
            )
            self.notifier.ready(self.status())
            return
        if config.metrics != self.config.metrics:
            log.warning("metrics.listen changed: it takes effect at the next restart")
        if config.workers != self.config.workers:
            log.warning("workers changed: it takes effect at the next restart")
        previous_config, previous_text = self.config, self._snapshot_text
        self.write_snapshot(text)
        self.config = config
        self._configure_logs()
        waiting = {worker.pid for worker in self.workers}
        self._rounds.append(
            ReloadRound(
                waiting, time.monotonic() + RELOAD_RESULT_TIMEOUT, previous_config, previous_text
            )
        )
        log.info(
            "reloading every worker",
            extra={"fields": {"reason": reason, "workers": sorted(waiting)}},
        )
        for worker in self.workers:
            if worker.ready:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGHUP)
            else:
                # Why wait: until a worker is ready it has not set up its signal
                # handling, and SIGHUP's default action would kill it.
                worker.reload_pending = True
        self.finish_reloads(time.monotonic())

    def _configure_logs(self) -> None:
        """The supervisor's own logging, as the current config and the command line say."""
        logs.configure(
            self.args.log_level or self.config.log.level,
            self.args.log_format or self.config.log.format,
            self.config.log.access_log,
        )

    def finish_reloads(self, now: float) -> None:
        """Count the reloads every worker has answered (or that timed out), in order."""
        while self._rounds and (not self._rounds[0].waiting or self._rounds[0].deadline <= now):
            round_ = self._rounds.pop(0)
            if round_.waiting:
                log.warning(
                    "workers did not report a reload in time",
                    extra={"fields": {"workers": sorted(round_.waiting)}},
                )
            result = "failure" if round_.failed or round_.waiting else "success"
            self.reloads[result] += 1
            latest = not self._rounds  # its snapshot is still the one on disk
            refused_by_all = result == "failure" and not round_.succeeded and not round_.waiting
            if refused_by_all and not latest:
                # The next reload started from this refused config; what the workers
                # run is the one from before it, and that is what to go back to.
                following = self._rounds[0]
                following.previous_config = round_.previous_config
                following.previous_text = round_.previous_text
            if refused_by_all and latest:
                # Every worker refused it (a name that does not resolve, say) and runs the
                # config from before: so must a worker restarted from here on.
                self.write_snapshot(round_.previous_text)
                self.config = round_.previous_config
                self._configure_logs()
            if result == "failure":
                log.error(
                    "reload failed in every worker; the running config stays"
                    if refused_by_all
                    else "reload failed in some workers; see their log lines",
                    extra={"fields": {"workers": sorted(round_.failed)}},
                )
            if latest and not refused_by_all:
                # The supervisor's copies of listeners no route uses any more: closed
                # now, so a restarted worker does not get them (the workers close theirs
                # as they reload). Not before: if every worker refused the config, the
                # old routes still need them.
                self.listeners.close_except({route.listen for route in self.config.routes}, _close)
            if not self._rounds and not self.stopping:
                self.notifier.ready(self.status())

    # ----- stop ----------------------------------------------------------------------

    def begin_stop(self, reason: str) -> None:
        if self.stopping:
            log.info("second signal: closing all connections now")
            self.signal_workers(CUT_SIGNAL)
            return
        self.stopping = True
        self._restart_at.clear()
        key = "signal" if reason.startswith("SIG") else "reason"
        log.info("stopping", extra={"fields": {key: reason}})
        self.notifier.stopping(f"draining {self.status()}")
        # Why close our copies first: a listening socket stays open, and keeps completing
        # handshakes into its backlog, until its last descriptor closes. With ours gone,
        # the port refuses new clients as soon as every worker has closed its own.
        self.listeners.close_all(_close)
        self.signal_workers(signal.SIGTERM)
        self._stop_deadline = time.monotonic() + self.config.shutdown_timeout + STOP_GRACE

    def check_stop_deadline(self, now: float) -> None:
        if self._stop_deadline is not None and now >= self._stop_deadline and self.workers:
            log.warning(
                "workers still running after the drain: killing them",
                extra={"fields": {"workers": [w.pid for w in self.workers]}},
            )
            self.signal_workers(signal.SIGKILL)
            self._stop_deadline = None

    # ----- the loop ------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until they have all stopped."""
        wakeup_read, wakeup_write = socket.socketpair()
        wakeup_read.setblocking(False)
        wakeup_write.setblocking(False)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        previous = {signum: signal.getsignal(signum) for signum in handled}
        # Why a wakeup fd: a Python signal handler only runs between bytecodes, and
        # select() restarts itself after EINTR (PEP 475); the C-level handler writes the
        # signal number to this socket instead, which wakes select() at once.
        old_wakeup = signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        for signum in handled:
            signal.signal(signum, _ignore)
        selector = selectors.DefaultSelector()
        selector.register(wakeup_read, selectors.EVENT_READ, "signal")
        selector.register(self.receiver.fileno(), selectors.EVENT_READ, "notify")
        try:
            for slot in range(self.count):
                self.spawn(slot)
            self._loop(selector, wakeup_read)
        finally:
            if self.workers:  # only on an unexpected error: do not leave them behind
                self.signal_workers(signal.SIGKILL)
                for worker in self.workers:
                    worker.process.wait()
            selector.close()
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            wakeup_read.close()
            wakeup_write.close()
        return self._exit_code

    def _loop(self, selector: selectors.BaseSelector, wakeup: socket.socket) -> None:
        watchdog = watchdog_interval()
        # Pings must not wait a whole TICK when the watchdog wants them more often.
        tick = min(TICK, watchdog / 2) if watchdog else TICK
        next_watchdog = time.monotonic()
        next_status = time.monotonic() + STATUS_INTERVAL
        last_status = ""
        watching = bool(self.args.watch)
        seen = file_identity(self.path)
        next_watch = time.monotonic() + WATCH_INTERVAL
        while not (self.stopping and not self.workers):
            for key, _events in selector.select(self._next_timeout(tick)):
                if key.data == "signal":
                    for signum in _drain(wakeup):
                        self.handle_signal(signum)
                else:
                    self.read_notifications()
            self.reap()
            now = time.monotonic()
            if not self.stopping:
                self.restart_due(now)
            self.finish_reloads(now)
            self.check_stop_deadline(now)
            self.kill_hung_workers(now)
            if watchdog and now >= next_watchdog:
                self.notifier.watchdog()
                next_watchdog = now + watchdog
            if self.notifier.enabled and self.announced and now >= next_status:
                next_status = now + STATUS_INTERVAL
                status = self.status()
                if status != last_status and not self.stopping:
                    self.notifier.status(status)
                    last_status = status
            if watching and now >= next_watch:
                next_watch = now + WATCH_INTERVAL
                current = file_identity(self.path)
                if current != seen and current is not None:
                    seen = current
                    self.reload("file changed")

    def _next_timeout(self, tick: float) -> float:
        """Until the next restart is due, but at most `tick` (for the other timers)."""
        now = time.monotonic()
        due = [when - now for when in self._restart_at.values()]
        return max(0.0, min([tick, *due]))

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
        elif signum == signal.SIGHUP:
            self.reload("SIGHUP")
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.begin_stop(signal.Signals(signum).name)

    def close(self) -> None:
        self.receiver.close()
        self.notifier.close()
        self.listeners.close_all(_close)


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler: the wakeup fd carries the signal to the loop."""


def _drain(wakeup: socket.socket) -> Iterator[int]:
    while True:
        try:
            data = wakeup.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return
        yield from data


def _close(sock: socket.socket) -> None:
    sock.close()


def run_supervisor(
    args: argparse.Namespace, config: Config, metrics_address: Address | None
) -> int:
    """`splicerelay run -c FILE` with workers > 1; returns the exit code."""
    try:
        config, text = read_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    listeners = ListenerSet(passed_sockets(), role=Role.SUPERVISOR)
    for route in config.routes:
        try:
            listeners.take(route.name, route.listen)
        except ListenError as error:
            log.error(f"route {route.name}: {error}")
            listeners.close_all(_close)
            return 1
    directory = runtime_directory()
    metrics_server = None
    supervisor: Supervisor | None = None
    try:
        supervisor = Supervisor(args, config, text, listeners, directory)
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
        code = supervisor.run()
    finally:
        if metrics_server is not None:
            metrics_server.close()
        if supervisor is not None:
            supervisor.close()
        listeners.close_all(_close)
        shutil.rmtree(directory, ignore_errors=True)
    log.info("stopped")
    return code
