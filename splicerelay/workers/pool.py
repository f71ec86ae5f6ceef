"""The worker processes themselves: starting them on the shared listeners, each one's
copy of the config (config_copy.py), signalling and reaping them, and reading what they
tell the supervisor.

WorkerTable decides (which slot to restart, which worker is hung, when a worker may take
a reload); this module does the process and descriptor work, and the supervisor decides
what a death or a message means for the service as a whole.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable

from splicerelay.ops.service import RunOptions
from splicerelay.ops.systemd import NotifyReceiver
from splicerelay.relay.listeners import ListenerSet
from splicerelay.workers.config_copy import ConfigCopy
from splicerelay.workers.contract import InheritedSocket, WorkerSetup
from splicerelay.workers.launch import start_worker, worker_command, worker_environment
from splicerelay.workers.rendezvous import Rendezvous
from splicerelay.workers.scrape import WorkerView
from splicerelay.workers.worker_table import Heard, Worker, WorkerTable

log = logging.getLogger("splicerelay")


class WorkerPool:
    """The running worker processes of one supervisor."""

    def __init__(
        self,
        options: RunOptions,
        table: WorkerTable,
        listeners: ListenerSet,
        rendezvous: Rendezvous,
        receiver: NotifyReceiver,
        worker_gone: Callable[[int], None],
        current_text: Callable[[], str],
    ) -> None:
        self.options = options
        self.table = table
        self.listeners = listeners
        self.rendezvous = rendezvous
        self.receiver = receiver
        self._worker_gone = worker_gone  # told a departed worker's id (the scraper)
        # The config a worker started or reloaded now is to load (the reload rounds').
        self._current_text = current_text
        self.views: tuple[WorkerView, ...] = ()
        self._ids = itertools.count(1)
        self._copies: dict[int, ConfigCopy] = {}  # worker id -> its copy of the config
        # The upstreams' admin states a new worker takes before serving (admin_memory.py).
        self.admin_snapshot: Callable[[], list[dict[str, object]]] = list

    def spawn(self, slot: int) -> Worker:
        """Start a worker for `slot` on the current config. Raises OSError."""
        worker_id = next(self._ids)
        metrics_path = self.rendezvous.metrics_address(worker_id)
        control_path = self.rendezvous.control_address(worker_id)
        copy = ConfigCopy(self._current_text())
        try:
            setup = WorkerSetup(
                slot=slot,
                supervisor_pid=os.getpid(),
                metrics_path=metrics_path,
                control_path=control_path,
                sockets=tuple(
                    InheritedSocket(item.sock.fileno(), item.name, item.kept)
                    for item in self.listeners.handover()
                ),
                config_fd=copy.fileno(),
                admin=tuple(self.admin_snapshot()),
            )
            environment = worker_environment(
                os.environ, setup, self.receiver.path, self.table.watchdog
            )
            process = start_worker(worker_command(self.options, copy.path), environment, setup)
        except BaseException:
            copy.close()
            raise
        now = time.monotonic()
        worker = Worker(
            worker_id, slot, process, metrics_path, now, last_heard=now, control_path=control_path
        )
        self._copies[worker_id] = copy
        self.table.add(worker)
        self._refresh_views()
        return worker

    def config_of(self, worker: Worker) -> str:
        """The text `worker` reads at its next reload (or is reading at its start)."""
        return self._copies[worker.id].read()

    def _refresh_views(self) -> None:
        # Replaced as a whole, so the metrics threads always see a consistent tuple.
        self.views = tuple(WorkerView(w.id, w.metrics_path) for w in self.table)

    def reap(self) -> list[tuple[Worker, int]]:
        """Take the workers that have exited out of the table, with their return codes."""
        exited = []
        for worker in list(self.table):
            returncode = worker.process.poll()
            if returncode is not None:
                self.table.remove(worker)
                self._refresh_views()
                self._worker_gone(worker.id)
                self._copies.pop(worker.id).close()
                self.rendezvous.remove(worker.metrics_path)
                self.rendezvous.remove(worker.control_path)
                exited.append((worker, returncode))
        return exited

    def restart_due(self, now: float) -> list[Worker]:
        """Start the workers whose restart is due; returns them."""
        started = []
        for slot in self.table.due(now):
            try:
                worker = self.spawn(slot)
            except OSError as error:
                # Why not stop: the other workers still serve; the slot waits its
                # backoff and tries again, as it does after a worker that died.
                delay = self.table.start_failed(slot, now)
                log.error(
                    f"cannot start a worker: {error.strerror or error}",
                    extra={"fields": {"slot": slot, "restart_in_seconds": round(delay, 3)}},
                )
                continue
            log.info("worker restarted", extra={"fields": {"slot": slot, "pid": worker.pid}})
            started.append(worker)
        return started

    def kill_hung(self, now: float) -> None:
        """SIGKILL each ready worker that has not been heard from within the watchdog
        time; reaping it then restarts it like any worker that died."""
        for worker, silent in self.table.hung(now):
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
            self.kill(worker, signal.SIGKILL)

    def kill(self, worker: Worker, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    def signal_all(self, signum: int) -> None:
        for worker in self.table:
            self.kill(worker, signum)

    def reload_all(self) -> None:
        """Have every worker load the current config: at once when it may take a
        reload, else once it may (WorkerTable.reload_now says why)."""
        for worker in self.table:
            if self.table.reload_now(worker):
                self._send_reload(worker)

    def _send_reload(self, worker: Worker) -> None:
        # The worker is not reading its copy now (WorkerTable.reload_now): the rewrite
        # cannot tear under it.
        self._copies[worker.id].write(self._current_text())
        self.kill(worker, signal.SIGHUP)

    def read_notifications(self) -> list[Heard]:
        """Take in the workers' sd_notify messages (ready, connections, a held-back
        reload); returns what each message from a live worker changed."""
        results = []
        while (message := self.receiver.receive()) is not None:
            heard = self.table.heard(message.pid, message.fields, time.monotonic())
            if heard is None:
                continue
            if heard.send_reload:
                self._send_reload(heard.worker)
            results.append(heard)
        return results

    def kill_all_and_wait(self) -> None:
        self.signal_all(signal.SIGKILL)
        for worker in self.table:
            worker.process.wait()

    def close(self) -> None:
        """Free the config copies of the workers still in the table."""
        for copy in self._copies.values():
            copy.close()
        self._copies.clear()
