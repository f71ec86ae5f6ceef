"""Reload rounds: which config the workers run while reloads come and go. Pure.

A reload the supervisor accepted becomes the snapshot a worker loads, and goes to every
live worker as a round; the round ends when each of them has answered, died, or when it
times out. Rounds end in the order they started. A worker can still refuse a config the
supervisor accepted (an upstream name that does not resolve, say), so the snapshot must
follow what the workers really run:

- a round every worker refused (no success, no silence) is not what the workers run: the
  snapshot goes back to the one from before it, so that a worker restarted later loads
  what the others run;
- when such a round is followed by another that started from it, the following round
  inherits what to go back to (the config from before the refused one);
- the supervisor's copies of listeners the new config dropped are closed once the latest
  round ended, unless every worker refused it (the old routes still need them);
- a worker started while a round is pending loads that round's snapshot, so the round
  waits for it too, and its coming up is its answer: otherwise a round every *other*
  worker refused would put the snapshot back while this one runs the refused config.

No I/O, no clock, no logging here: the supervisor passes the time in, does the I/O that
each `RoundOutcome` asks for, and logs it. Snapshots are opaque to this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

S = TypeVar("S")

RELOAD_RESULT_TIMEOUT = 60.0  # how long to wait for every worker to report a reload

Result = Literal["success", "failure"]


@dataclass(eq=False)
class _Round(Generic[S]):
    number: int
    snapshot: S
    waiting: set[int]  # pids
    deadline: float
    # What every worker ran before: restored if they all refuse the new config.
    previous: S
    failed: list[int] = field(default_factory=list)
    succeeded: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class RoundOutcome(Generic[S]):
    """How one round ended, and what the supervisor is to do about it."""

    number: int  # as start() returned it
    snapshot: S  # the config the round asked the workers to load
    result: Result
    refused_by_all: bool  # failed, with no success and nobody left silent
    failed: tuple[int, ...]  # pids that refused it, sorted
    succeeded: tuple[int, ...]  # pids that applied it (or came up on it), sorted
    timed_out: tuple[int, ...]  # pids that did not answer in time, sorted
    # The snapshot to go back to (write it, and configure from it), or None.
    restore: S | None
    # Close the supervisor's copies of listeners the current snapshot no longer uses.
    close_dropped_listeners: bool
    # No round is pending any more: the service manager may hear READY=1 again.
    announce_ready: bool


class ReloadRounds(Generic[S]):
    """The reload rounds in flight, and the snapshot a newly started worker loads."""

    def __init__(self, current: S, timeout: float = RELOAD_RESULT_TIMEOUT) -> None:
        self._current = current
        self.timeout = timeout
        self._rounds: list[_Round[S]] = []
        self._numbers = 0
        self._starting: dict[int, _Round[S]] = {}  # pid -> the round whose snapshot it loads

    @property
    def current(self) -> S:
        """What a worker started now loads (and a worker reloaded now)."""
        return self._current

    @property
    def pending(self) -> int:
        """How many rounds have not ended yet."""
        return len(self._rounds)

    def waiting(self) -> set[int]:
        """The pids some round still waits for."""
        return set().union(*(round_.waiting for round_ in self._rounds))

    def start(self, snapshot: S, pids: set[int] | frozenset[int], now: float) -> int:
        """A reload to `snapshot`, sent to the workers `pids`; returns its number.

        The snapshot becomes current at once: a worker started during the round loads it.
        """
        # A worker still starting loads the snapshot from before this round: its coming
        # up no longer says it took the current one. It leaves its round (as any worker
        # started before the first round does) and answers this one like the others,
        # once its held-back SIGHUP has reached it.
        for pid, started_in in self._starting.items():
            started_in.waiting.discard(pid)
        self._starting.clear()
        self._numbers += 1
        self._rounds.append(
            _Round(self._numbers, snapshot, set(pids), now + self.timeout, self._current)
        )
        self._current = snapshot
        return self._numbers

    def answered(self, pid: int, ok: bool) -> None:
        """A worker reported how its reload went; it answers every round waiting for it."""
        for round_ in self._rounds:
            if pid in round_.waiting:
                round_.waiting.discard(pid)
                (round_.succeeded if ok else round_.failed).append(pid)

    def worker_started(self, pid: int) -> None:
        """A worker was just started: it loads the current snapshot, which is the latest
        round's while one is pending; that round waits for it to come up."""
        if self._rounds:
            latest = self._rounds[-1]
            latest.waiting.add(pid)
            self._starting[pid] = latest

    def worker_ready(self, pid: int) -> None:
        """A worker started during a round came up: it took that round's snapshot."""
        round_ = self._starting.pop(pid, None)
        if round_ is not None and pid in round_.waiting:
            round_.waiting.discard(pid)
            round_.succeeded.append(pid)

    def worker_gone(self, pid: int) -> None:
        """A worker died: no round waits for it any more."""
        self._starting.pop(pid, None)
        for round_ in self._rounds:
            round_.waiting.discard(pid)

    def finish(self, now: float) -> list[RoundOutcome[S]]:
        """End, in order, the rounds every worker has answered or that timed out."""
        outcomes: list[RoundOutcome[S]] = []
        while self._rounds and (not self._rounds[0].waiting or self._rounds[0].deadline <= now):
            round_ = self._rounds.pop(0)
            for pid in [pid for pid, started in self._starting.items() if started is round_]:
                del self._starting[pid]  # too late to answer it now
            result: Result = "failure" if round_.failed or round_.waiting else "success"
            latest = not self._rounds  # its snapshot is still the current one
            refused_by_all = result == "failure" and not round_.succeeded and not round_.waiting
            restore: S | None = None
            if refused_by_all and not latest:
                # The next round started from this refused config; what the workers run
                # is the one from before it, and that is what to go back to.
                self._rounds[0].previous = round_.previous
            if refused_by_all and latest:
                # Every worker refused it and runs the config from before: so must a
                # worker restarted from here on.
                restore = round_.previous
                self._current = round_.previous
            outcomes.append(
                RoundOutcome(
                    number=round_.number,
                    snapshot=round_.snapshot,
                    result=result,
                    refused_by_all=refused_by_all,
                    failed=tuple(sorted(round_.failed)),
                    succeeded=tuple(sorted(round_.succeeded)),
                    timed_out=tuple(sorted(round_.waiting)),
                    restore=restore,
                    close_dropped_listeners=latest and not refused_by_all,
                    announce_ready=not self._rounds,
                )
            )
        return outcomes
