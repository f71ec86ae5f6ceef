"""The supervisor loop's side of its control socket (control_thread.py runs the other).

It publishes what the control socket reads (the workers and the supervisor's info),
tells the thread when a worker came up (to replay the admin states to it) and when a
config became the one workers load (to forget the admin states of upstreams that left
it), and turns the end of a reload round into the reply to the `reload` that asked for
it: {"result": "ok"|"refused", "workers": [{"slot", "pid", "result", "error"}], "error"}.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from splicerelay.config import Config
from splicerelay.ops.control_path import (
    ControlPathError,
    control_place,
    make_directory,
    no_default_reason,
)
from splicerelay.relay.control_socket import ControlSocketError
from splicerelay.workers.control import SupervisorControl, WorkerEntry
from splicerelay.workers.control_thread import ControlThread, ReloadRequest
from splicerelay.workers.reload_rounds import RoundOutcome
from splicerelay.workers.worker_table import Worker

__all__ = [
    "ControlLink",
    "entry_of",
    "iso_time",
    "reload_record",
    "reload_refused",
    "round_result",
    "start_control",
    "text_sha256",
]

log = logging.getLogger("splicerelay")


def iso_time(unix_time: float) -> str:
    """As one relay process writes times in `show info` (relay/control_commands.py)."""
    return datetime.fromtimestamp(unix_time, UTC).isoformat(timespec="seconds")


def text_sha256(text: str) -> str:
    """The sha256 of a config's text, as `sha256sum FILE` prints it."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def entry_of(worker: Worker, now_monotonic: float, now: float) -> WorkerEntry:
    if not worker.ready:
        state = "starting"
    elif worker.reload_in_flight or worker.reload_pending:
        state = "reloading"
    else:
        state = "ready"
    return WorkerEntry(
        slot=worker.slot,
        pid=worker.pid,
        control_path=worker.control_path,
        state=state,
        started_at=now - (now_monotonic - worker.started),
        connections=worker.connections,
    )


def reload_refused(error: str) -> dict[str, Any]:
    """The reply's data for a reload the supervisor refused before any worker saw it."""
    return {"result": "refused", "workers": [], "error": error}


def round_result(
    outcome: RoundOutcome[Any], slots: dict[int, int], timeout: float
) -> dict[str, Any]:
    """The reply's data for a reload round that ended (`slots`: pid -> slot)."""
    workers: list[dict[str, Any]] = []

    def add(pids: Iterable[int], result: str, error: str | None) -> None:
        for pid in pids:
            workers.append({"slot": slots.get(pid), "pid": pid, "result": result, "error": error})

    add(outcome.succeeded, "ok", None)
    add(outcome.failed, "refused", None)
    add(outcome.timed_out, "no answer", f"did not report the reload within {timeout:g}s")
    workers.sort(key=lambda w: (w["slot"] is None, w["slot"], w["pid"]))
    if outcome.result == "success":
        return {"result": "ok", "workers": workers, "error": None}
    if outcome.refused_by_all:
        error = "every worker refused the new config; the running config stays"
    else:
        bad = [w for w in workers if w["result"] != "ok"]
        named = ", ".join(f"worker {w['slot']} (pid {w['pid']}): {w['result']}" for w in bad)
        error = f"the new config is not live in every worker: {named}"
    return {"result": "refused", "workers": workers, "error": error}


class ControlLink:
    """What the supervisor's loop does for its control socket."""

    def __init__(self, path: str, reload_timeout: float, config: Config) -> None:
        """`path`: where to serve the control socket; `reload_timeout`: how long a
        reload round waits for the workers (what the reply says of a silent one)."""
        self.reload_timeout = reload_timeout
        self.entries: tuple[WorkerEntry, ...] = ()
        self.info: dict[str, object] = {}
        self.config = config  # what a worker started now runs
        self._waiting: dict[int, list[ReloadRequest]] = {}  # round number -> requests
        self._slots: dict[int, int] = {}  # pid -> slot, of workers a round may name
        self.thread = ControlThread(
            path,
            lambda thread: SupervisorControl(
                workers=lambda: self.entries,
                info=lambda: self.info,
                config=lambda: self.config,
                reload=thread.request_reload,
            ),
        )

    def start(self) -> None:
        """Bind the control socket and serve it; raises ControlSocketError."""
        try:
            self.thread.start()
        except BaseException:
            self.thread.stop()
            raise

    def publish(self, workers: Iterable[Worker], info: dict[str, object], config: Config) -> None:
        """What the control socket reads; each value replaced as a whole.

        Why through the thread's queue: news handed over with `came_up` must reach it
        before a view in which that worker is ready (see SupervisorControl.worker_up)."""
        now_monotonic, now = time.monotonic(), time.time()
        entries = tuple(entry_of(worker, now_monotonic, now) for worker in workers)
        for entry in entries:
            self._slots[entry.pid] = entry.slot

        def update() -> None:
            self.entries = entries
            self.info = info
            self.config = config

        self.thread.call_soon(update)

    def came_up(self, worker: Worker) -> None:
        """`worker` is ready: give it the admin states (call before the next publish)."""
        self.thread.replay_to(entry_of(worker, time.monotonic(), time.time()))

    def refuse(self, request: ReloadRequest, error: str) -> None:
        self.thread.answer(request, reload_refused(error))

    def wait_for_round(self, number: int, request: ReloadRequest) -> None:
        self._waiting.setdefault(number, []).append(request)

    def round_ended(self, outcome: RoundOutcome[Any], config: Config) -> None:
        """Answer the reloads that waited for this round; `config` is what a new worker
        loads from now on."""
        requests = self._waiting.pop(outcome.number, [])
        if requests:
            data = round_result(outcome, self._slots, self.reload_timeout)
            for request in requests:
                self.thread.answer(request, data)
        self.thread.handler.memory.prune(config)
        if not self._waiting:
            live = {entry.pid for entry in self.entries}
            self._slots = {pid: slot for pid, slot in self._slots.items() if pid in live}

    def close(self) -> None:
        """Answer whatever still waits (the supervisor is stopping), and stop the thread."""
        for requests in self._waiting.values():
            for request in requests:
                self.refuse(request, "the relay stopped before the reload ended")
        self._waiting.clear()
        self.thread.stop()


def start_control(config: Config, reload_timeout: float) -> ControlLink | None:
    """Serve the control socket where `control.socket` says, for all the workers.

    Raises ControlSocketError or ControlPathError when a configured path cannot be had;
    a default place that cannot be had only costs the control socket, with a warning."""
    place = control_place(config.control.socket, os.environ, os.geteuid())
    if place is None:
        reason = no_default_reason(config.control.socket)
        log.info("no control socket", extra={"fields": {"reason": reason}})
        return None
    link = ControlLink(place.path, reload_timeout, config)
    try:
        make_directory(place)
        link.start()
    except (ControlSocketError, ControlPathError) as error:
        if place.configured:
            raise
        fields = {"path": place.path, "source": place.source}
        log.warning(f"no control socket: {error}", extra={"fields": fields})
        return None
    log.info("control socket", extra={"fields": {"path": place.path}})
    return link


def reload_record(trigger: str, error: str | None) -> dict[str, object]:
    """`show info`'s last reload, as one relay process says it."""
    record: dict[str, object] = {
        "result": "ok" if error is None else "refused",
        "time": iso_time(time.time()),
        "trigger": trigger,
    }
    if error is not None:
        record["error"] = error
    return record
