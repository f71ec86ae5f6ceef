"""The worker processes themselves: starting them on the shared listeners, the snapshot
they load, signalling and reaping them, and reading what they tell the supervisor.

WorkerTable decides (which slot to restart, which worker is hung); this module does the
process and file work, and the supervisor decides what a death or a message means for
the service as a whole.
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
from splicerelay.workers.contract import InheritedSocket, WorkerSetup
from splicerelay.workers.launch import start_worker, worker_command, worker_environment
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
        directory: str,
        receiver: NotifyReceiver,
        worker_gone: Callable[[int], None],
    ) -> None:
        self.options = options
        self.table = table
        self.listeners = listeners
        self.directory = directory
        self.receiver = receiver
        self._worker_gone = worker_gone  # told a departed worker's id (the scraper)
        self.snapshot = os.path.join(directory, "config.yaml")
        self.views: tuple[WorkerView, ...] = ()
        self._ids = itertools.count(1)

    def write_snapshot(self, text: str) -> None:
        """The config text every worker started from now on loads."""
        # Why write-then-rename: a worker that reads it at that moment gets the old file
        # or the new one, never a torn one.
        temporary = self.snapshot + ".new"
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, self.snapshot)

    def spawn(self, slot: int) -> Worker:
        worker_id = next(self._ids)
        metrics_path = os.path.join(self.directory, f"worker-{worker_id}.sock")
        setup = WorkerSetup(
            slot=slot,
            supervisor_pid=os.getpid(),
            metrics_path=metrics_path,
            sockets=tuple(
                InheritedSocket(item.sock.fileno(), item.name, item.kept)
                for item in self.listeners.handover()
            ),
        )
        environment = worker_environment(os.environ, setup, self.receiver.path, self.table.watchdog)
        process = start_worker(worker_command(self.options, self.snapshot), environment, setup)
        now = time.monotonic()
        worker = Worker(worker_id, slot, process, metrics_path, now, last_heard=now)
        self.table.add(worker)
        self._refresh_views()
        return worker

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
                with contextlib.suppress(OSError):
                    os.unlink(worker.metrics_path)
                exited.append((worker, returncode))
        return exited

    def restart_due(self, now: float) -> list[Worker]:
        """Start the workers whose restart is due; returns them."""
        started = []
        for slot in self.table.due(now):
            worker = self.spawn(slot)
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
        """SIGHUP every ready worker; one still starting gets it once it is ready."""
        for worker in self.table:
            if worker.ready:
                self.kill(worker, signal.SIGHUP)
            else:
                # Why wait: until a worker is ready it has not set up its signal
                # handling, and SIGHUP's default action would kill it.
                worker.reload_pending = True

    def read_notifications(self) -> list[Heard]:
        """Take in the workers' sd_notify messages (ready, connections, a held-back
        reload); returns what each message from a live worker changed."""
        results = []
        while (message := self.receiver.receive()) is not None:
            heard = self.table.heard(message.pid, message.fields, time.monotonic())
            if heard is None:
                continue
            if heard.send_reload:
                self.kill(heard.worker, signal.SIGHUP)
            results.append(heard)
        return results

    def kill_all_and_wait(self) -> None:
        self.signal_all(signal.SIGKILL)
        for worker in self.table:
            worker.process.wait()
