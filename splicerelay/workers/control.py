"""The supervisor's control socket: one relay's answers, given by N worker processes.

With `workers: N` the configured control socket is the supervisor's; each worker serves
a private one that only the supervisor uses (contract.py). Commands go on to them:

- `show info` is the supervisor's own (pid, uptime, the config it accepted, the last
  reload), with each worker's slot, pid and state;
- `show routes|upstreams|connections` asks every ready worker at once and merges the
  answers (control_merge.py);
- `set upstream ...` goes to every worker at once; the reply lists which applied it and
  which did not, and is an error reply if any did not. A worker still starting is listed
  as pending: it gets the change once it is ready, with every other change some worker
  applied (admin_memory.py), so that a restarted worker serves like the others;
- `kill connection SLOT:ID` goes to the worker in that slot, as `kill connection ID`;
- `reload` runs a reload round in the supervisor and answers once every worker has
  reported it (`reload` below).

Each worker gets WORKER_TIMEOUT to answer; one that does not is named in the reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from splicerelay.config import Config
from splicerelay.protocol.control import (
    Command,
    CommandFailed,
    KillConnection,
    Reload,
    Reply,
    SetUpstreamState,
    SetUpstreamWeight,
    ShowConnections,
    ShowInfo,
    ShowRoutes,
    ShowUpstreams,
)
from splicerelay.relay.control_client import ControlClientError, send_command_async
from splicerelay.workers.admin_memory import AdminCommand, AdminMemory
from splicerelay.workers.control_merge import (
    ROUTE_KEYS,
    UPSTREAM_KEYS,
    Outcome,
    WorkerRef,
    fan_out_summary,
    merge_connections,
    merge_rows,
)

__all__ = [
    "REPLAY_WAIT",
    "WORKER_TIMEOUT",
    "Ask",
    "SupervisorControl",
    "WorkerEntry",
]

log = logging.getLogger("splicerelay")

# Seconds one worker has to answer one command.
WORKER_TIMEOUT: Final = 5.0
# A worker that has just come up may bind its control socket a moment later: how long
# the supervisor keeps trying to reach it to replay the admin commands.
REPLAY_WAIT: Final = 10.0
_REPLAY_POLL = 0.05

Ask = Callable[[str, Command, float], Awaitable[Reply]]


@dataclass(frozen=True)
class WorkerEntry:
    """A running worker, as the supervisor's loop last published it."""

    slot: int
    pid: int
    control_path: str
    state: str  # "starting", "ready" or "reloading"
    started_at: float  # unix time
    connections: int = 0

    @property
    def ref(self) -> WorkerRef:
        return WorkerRef(self.slot, self.pid)

    @property
    def ready(self) -> bool:
        return self.state != "starting"

    def row(self, now: float) -> dict[str, object]:
        return {
            "slot": self.slot,
            "pid": self.pid,
            "state": self.state,
            "uptime_seconds": round(max(0.0, now - self.started_at), 3),
            "connections": self.connections,
        }


@dataclass
class SupervisorControl:
    """The handler of the supervisor's control socket (relay/control_socket.Handler).

    `workers` and `info` are read from the supervisor's loop, which publishes them as
    whole values; `reload` asks that loop for a reload round and returns its result's
    data ({"result": "ok"|"refused", "workers": [...], "error": ...})."""

    workers: Callable[[], Sequence[WorkerEntry]]
    info: Callable[[], dict[str, object]]
    config: Callable[[], Config]  # what a worker started now runs
    reload: Callable[[], Awaitable[dict[str, Any]]]
    memory: AdminMemory = field(default_factory=AdminMemory)
    ask: Ask = send_command_async
    timeout: float = WORKER_TIMEOUT
    # One command at a time to each worker (by pid) from here: a replay's commands and
    # an operator's change to the same upstream must arrive in the order they were made.
    _locks: dict[int, trio.Lock] = field(default_factory=dict)
    # Workers that came up (worker_up), and of those the ones whose replay has not ended:
    # nothing else is sent to them until it has (see `worker_up`).
    _up: set[int] = field(default_factory=set)
    _syncing: dict[int, trio.Event] = field(default_factory=dict)

    async def __call__(self, command: Command) -> object:
        match command:
            case ShowInfo():
                now = time.time()
                return {**self.info(), "worker_processes": [w.row(now) for w in self.workers()]}
            case ShowRoutes():
                return merge_rows(await self._show(command), ROUTE_KEYS)
            case ShowUpstreams():
                return merge_rows(await self._show(command), UPSTREAM_KEYS)
            case ShowConnections(limit=limit):
                return merge_connections(await self._show(command), limit)
            case SetUpstreamState() | SetUpstreamWeight():
                return await self._set(command)
            case KillConnection():
                return await self._kill(command)
            case Reload():
                data = await self.reload()
                await self._explain_refusals(data)
                if data.get("result") != "ok":
                    raise CommandFailed(str(data.get("error") or "reload refused"), data)
                return data
        raise CommandFailed(f"not a command for the supervisor: {type(command).__name__}")

    # ----- asking workers ------------------------------------------------------------

    async def ask_one(self, worker: WorkerEntry, command: Command) -> Outcome:
        """`command` to one worker: its reply, or why there was none, as an Outcome.

        A worker whose replay has not ended is asked once it has (or REPLAY_WAIT has
        passed): until then it would answer with states the others no longer have."""
        syncing = self._syncing.get(worker.pid)
        if syncing is not None:
            with trio.move_on_after(REPLAY_WAIT + self.timeout):
                await syncing.wait()
        lock = self._locks.setdefault(worker.pid, trio.Lock())
        async with lock:
            return await self._ask_unlocked(worker, command)

    async def _ask_unlocked(self, worker: WorkerEntry, command: Command) -> Outcome:
        try:
            reply = await self.ask(worker.control_path, command, self.timeout)
        except ControlClientError as error:
            return Outcome(worker.ref, False, error=f"no answer: {_short(error)}")
        if reply.ok:
            return Outcome(worker.ref, True, reply.data)
        return Outcome(worker.ref, False, reply.data, reply.error)

    async def ask_all(self, workers: Sequence[WorkerEntry], command: Command) -> list[Outcome]:
        """`command` to every worker in `workers` at once; the outcomes in their order."""
        outcomes: list[Outcome | None] = [None] * len(workers)

        async def one(index: int, worker: WorkerEntry) -> None:
            outcomes[index] = await self.ask_one(worker, command)

        async with trio.open_nursery() as nursery:
            for index, worker in enumerate(workers):
                nursery.start_soon(one, index, worker)
        self._forget_locks()
        return [outcome for outcome in outcomes if outcome is not None]

    def _forget_locks(self) -> None:
        live = {worker.pid for worker in self.workers()}
        for pid in [pid for pid, lock in self._locks.items() if pid not in live]:
            if not self._locks[pid].locked():
                del self._locks[pid]
        self._up &= live

    def _ready(self) -> list[WorkerEntry]:
        """The workers to ask: ready in the loop's last view, or up as far as this
        thread has heard (its view may lag behind the news that one came up)."""
        return [w for w in self.workers() if w.ready or w.pid in self._up]

    # ----- the commands --------------------------------------------------------------

    async def _show(self, command: Command) -> list[tuple[int, list[Any]]]:
        """Every ready worker's rows for a `show`; an error reply if any did not answer."""
        workers = self._ready()
        if not workers:
            raise CommandFailed("no worker is ready yet; try again")
        outcomes = await self.ask_all(workers, command)
        answers = [(o.worker.slot, o.data) for o in outcomes if o.ok and isinstance(o.data, list)]
        failed = [o for o in outcomes if not (o.ok and isinstance(o.data, list))]
        if failed:
            errors = {o.error for o in failed}
            if len(failed) == len(outcomes) and len(errors) == 1 and None not in errors:
                raise CommandFailed(str(errors.pop()))  # say, an unknown route
            reasons = "; ".join(
                f"{o.worker.describe()}: {o.error or 'not a list of rows'}" for o in failed
            )
            raise CommandFailed(f"not every worker answered: {reasons}")
        return answers

    async def _set(self, command: AdminCommand) -> dict[str, object]:
        # Remembered first: a worker that comes up while this goes out gets it in its
        # replay, since the replay reads the memory only after its first await.
        undo = self.memory.remember(command, self.config())
        ready = self._ready()
        outcomes = await self.ask_all(ready, command)
        asked = {w.pid for w in ready}
        pending = [w.ref for w in self.workers() if w.pid not in asked]
        if undo is not None and not any(outcome.ok for outcome in outcomes):
            self.memory.restore(undo)
        data, error = fan_out_summary(outcomes, pending)
        if error is not None:
            raise CommandFailed(error, data)
        return data

    async def _kill(self, command: KillConnection) -> dict[str, object]:
        if command.slot is None:
            raise CommandFailed(
                f"connection {command.id}: with workers, a connection id is SLOT:ID, as"
                " show connections prints it"
            )
        worker = next((w for w in self.workers() if w.slot == command.slot), None)
        if worker is None or not worker.ready:
            raise CommandFailed(f"no connection {command.label}: no worker {command.slot} runs")
        outcome = await self.ask_one(worker, KillConnection(command.id))
        data = {"slot": worker.slot, "pid": worker.pid, "data": outcome.data}
        if not outcome.ok:
            raise CommandFailed(f"{worker.ref.describe()}: {outcome.error}", data)
        return data

    async def _explain_refusals(self, data: dict[str, Any]) -> None:
        """Fill in why each worker that refused the reload did: its `show info` says.

        (A worker reports only "failure" to its supervisor; the reason is in its log and
        in its own last reload record.)"""
        by_pid = {worker.pid: worker for worker in self.workers()}
        refused = [
            (row, by_pid[row["pid"]])
            for row in data.get("workers", ())
            if row.get("result") == "refused" and not row.get("error") and row.get("pid") in by_pid
        ]

        async def explain(row: dict[str, Any], worker: WorkerEntry) -> None:
            outcome = await self.ask_one(worker, ShowInfo())
            last = outcome.data.get("last_reload") if isinstance(outcome.data, dict) else None
            error = last.get("error") if isinstance(last, dict) else None
            row["error"] = error if isinstance(error, str) else "refused it; its log says why"

        async with trio.open_nursery() as nursery:
            for row, worker in refused:
                nursery.start_soon(explain, row, worker)

    # ----- a new worker ----------------------------------------------------------------

    def worker_up(self, worker: WorkerEntry) -> None:
        """`worker` has come up; `replay(worker)` is to run next. Call from the thread,
        before the loop's next view (which shows it ready) can be read, so that no
        command reaches the worker before its replay has ended, and none is lost: a
        change made meanwhile goes to it after the replay."""
        self._up.add(worker.pid)
        self._syncing[worker.pid] = trio.Event()

    async def replay(self, worker: WorkerEntry) -> list[Outcome]:
        """Send a worker that has just come up every admin command to date, in order.

        Holds the worker's lock throughout, so that a change made meanwhile reaches it
        after the replay, not in the middle of it."""
        lock = self._locks.setdefault(worker.pid, trio.Lock())
        outcomes: list[Outcome] = []
        try:
            async with lock:
                commands = self.memory.commands()
                if not commands:
                    return outcomes
                if not await self._wait_reachable(worker):
                    log.error(
                        "cannot give a new worker the upstreams' admin states: its control"
                        " socket does not answer",
                        extra={"fields": {"worker": worker.slot, "pid": worker.pid}},
                    )
                    return outcomes
                for command in commands:
                    outcomes.append(await self._ask_unlocked(worker, command))
        finally:
            synced = self._syncing.pop(worker.pid, None)
            if synced is not None:
                synced.set()
        failed = [o for o in outcomes if not o.ok]
        fields = {"worker": worker.slot, "pid": worker.pid, "commands": len(outcomes)}
        if failed:
            log.error(
                "a new worker refused some of the upstreams' admin states",
                extra={"fields": {**fields, "errors": [o.error for o in failed]}},
            )
        else:
            log.info("gave a new worker the upstreams' admin states", extra={"fields": fields})
        return outcomes

    async def _wait_reachable(self, worker: WorkerEntry) -> bool:
        """Poll the worker's control socket until it answers (bounded by REPLAY_WAIT)."""
        with trio.move_on_after(REPLAY_WAIT):
            while True:
                try:
                    await self.ask(worker.control_path, ShowInfo(), self.timeout)
                    return True
                except ControlClientError:
                    await trio.sleep(_REPLAY_POLL)
        return False


def _short(error: Exception) -> str:
    return str(error).split(" (", 1)[0]
