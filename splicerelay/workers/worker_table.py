"""The supervisor's table of workers: slots, restarts with backoff, the hung-worker
watchdog and what a worker's sd_notify message means. Pure decisions, no processes.

The table never starts, signals or reaps a process: it says which slot is due for a
restart, which worker to kill as hung, and what a message from a worker changed, and the
supervisor does it.
"""

from __future__ import annotations

import logging
import re
import signal
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from splicerelay.workers.contract import RELOAD_RESULT_FIELD

log = logging.getLogger("splicerelay")

RESTART_BACKOFF_FIRST = 0.1  # seconds before restarting a worker that died
RESTART_BACKOFF_MAX = 5.0  # doubling up to this while it keeps dying young
STABLE_AFTER = 10.0  # a worker that lived this long resets its slot's backoff
# A ready worker that has sent nothing for this long is hung (its event loop no longer
# runs) and is killed, then restarted. Workers ping at half of it. The environment
# variable below overrides it (seconds; 0 turns the watchdog off).
WORKER_WATCHDOG_SECONDS = 20.0
WORKER_WATCHDOG_ENV = "SPLICERELAY_WORKER_WATCHDOG"

_CONNECTIONS = re.compile(r"([0-9]+) connections?\b")


class Process(Protocol):
    """What the table and the supervisor need of a worker's process (a Popen)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass(eq=False)
class Worker:
    id: int
    slot: int
    process: Process
    metrics_path: str
    started: float
    ready: bool = False
    connections: int = 0
    reload_pending: bool = False  # SIGHUP held back until the worker may take one
    reload_in_flight: bool = False  # SIGHUP sent, outcome not reported yet
    last_heard: float = 0.0  # monotonic time of its last sd_notify message
    killed_as_hung: bool = False
    control_path: str = ""  # its private control socket (rendezvous.py)

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(frozen=True)
class Heard:
    """What one sd_notify message from a worker changed."""

    worker: Worker
    came_up: bool  # this is its first READY=1: it has loaded its config and serves
    send_reload: bool  # a reload was held back and the worker may take it: SIGHUP it now
    reload_ok: bool | None  # it reported a reload: did it succeed (None: no report)


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


class WorkerTable:
    """The live workers by slot, and the slots waiting to be restarted."""

    def __init__(self, count: int, watchdog: float) -> None:
        self.count = count  # slots
        self.watchdog = watchdog  # seconds of silence that make a ready worker hung; 0: off
        self.workers: list[Worker] = []
        self.restarts = 0  # workers started again after dying
        self._restart_at: dict[int, float] = {}  # slot -> when
        self._failures: Counter[int] = Counter()  # slot -> early deaths in a row

    def __iter__(self) -> Iterator[Worker]:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    def __bool__(self) -> bool:
        return bool(self.workers)

    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]

    def by_pid(self, pid: int) -> Worker | None:
        return next((w for w in self.workers if w.pid == pid), None)

    def add(self, worker: Worker) -> None:
        self.workers.append(worker)

    def remove(self, worker: Worker) -> None:
        self.workers.remove(worker)

    def connections(self) -> int:
        return sum(worker.connections for worker in self.workers)

    def all_started_and_ready(self) -> bool:
        return len(self.workers) == self.count and all(w.ready for w in self.workers)

    # ----- restarts --------------------------------------------------------------------

    def schedule_restart(self, worker: Worker, now: float) -> float:
        """`worker` died: when to start its slot again, as a delay in seconds.

        The delay doubles while the slot's workers keep dying young, and starts over once
        one has lived STABLE_AFTER seconds.
        """
        if now - worker.started >= STABLE_AFTER:
            self._failures[worker.slot] = 0
        delay = restart_delay(self._failures[worker.slot])
        self._failures[worker.slot] += 1
        self._restart_at[worker.slot] = now + delay
        return delay

    def due(self, now: float) -> list[int]:
        """The slots whose restart is due now; each counts as a restart."""
        slots = [slot for slot, when in self._restart_at.items() if when <= now]
        for slot in slots:
            del self._restart_at[slot]
        self.restarts += len(slots)
        return slots

    def start_failed(self, slot: int, now: float) -> float:
        """A due restart of `slot` could not even start a process (fork, memfd or fd
        limits): it is not counted as a restart, and is tried again after the slot's
        backoff, which grows as for a worker dying young. Returns the delay."""
        self.restarts -= 1  # due() counted it
        delay = restart_delay(self._failures[slot])
        self._failures[slot] += 1
        self._restart_at[slot] = now + delay
        return delay

    def cancel_restarts(self) -> None:
        self._restart_at.clear()

    def next_timeout(self, now: float, tick: float) -> float:
        """Until the next restart is due, but at most `tick` (for the other timers)."""
        due = [when - now for when in self._restart_at.values()]
        return max(0.0, min([tick, *due]))

    # ----- reloads ---------------------------------------------------------------------

    def reload_now(self, worker: Worker) -> bool:
        """A reload for `worker`: True to SIGHUP it now, False when it is held back
        (`heard` says when to send it).

        Why hold back: until a worker is ready it has not set up its signal handling
        (SIGHUP's default action would kill it) and it is reading its config; after a
        SIGHUP it may be reading its config until it reports the outcome. Its copy of
        the config may only be rewritten while it is not reading it (config_copy.py).
        """
        if worker.ready and not worker.reload_in_flight:
            worker.reload_in_flight = True
            return True
        worker.reload_pending = True
        return False

    # ----- what the workers say ------------------------------------------------------

    def heard(self, pid: int, fields: Mapping[str, str], now: float) -> Heard | None:
        """A worker's sd_notify message; None if it is not one of the live workers."""
        worker = self.by_pid(pid)
        if worker is None:
            return None  # a worker already reaped, or not one of ours
        worker.last_heard = now
        came_up = False
        if fields.get("READY") == "1":
            came_up = not worker.ready
            worker.ready = True
        count = connections_in_status(fields.get("STATUS", ""))
        if count is not None:
            worker.connections = count
        result = fields.get(RELOAD_RESULT_FIELD)
        if result is not None:
            worker.reload_in_flight = False  # it has read its config
        send_reload = False
        if worker.reload_pending and worker.ready and not worker.reload_in_flight:
            worker.reload_pending = False
            worker.reload_in_flight = True
            send_reload = True
        reload_ok = None if result is None else result == "success"
        return Heard(worker, came_up, send_reload, reload_ok)

    def hung(self, now: float) -> list[tuple[Worker, float]]:
        """The ready workers silent for longer than the watchdog, with their silence;
        each is marked as killed, so that it is named once.

        Why only ready workers: one still starting may be resolving names for longer.
        """
        if not self.watchdog:
            return []
        found = []
        for worker in self.workers:
            silent = now - worker.last_heard
            if worker.ready and not worker.killed_as_hung and silent > self.watchdog:
                worker.killed_as_hung = True
                found.append((worker, silent))
        return found
