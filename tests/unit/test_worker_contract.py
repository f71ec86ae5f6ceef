"""What a worker receives from its supervisor (the setup in its environment, its command
line, the names of the sockets between them), and when the supervisor may hand a worker
a reload. Pure code: no processes, no sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splicerelay.ops.service import RunOptions
from splicerelay.workers.contract import (
    RELOAD_RESULT_FIELD,
    WORKER_ENV,
    InheritedSocket,
    WorkerSetup,
    decode,
    encode,
)
from splicerelay.workers.launch import NOT_FOR_WORKERS, worker_command, worker_environment
from splicerelay.workers.rendezvous import ABSTRACT, Rendezvous, for_environment, is_abstract
from splicerelay.workers.worker_table import Worker, WorkerTable

ABSTRACT_PREFIX = f"{ABSTRACT}splicerelay-42-00ff"


def setup(metrics_path: str = "/run/x/worker-3.sock") -> WorkerSetup:
    return WorkerSetup(
        slot=1,
        supervisor_pid=42,
        metrics_path=metrics_path,
        control_path=metrics_path.replace("worker-", "control-"),
        sockets=(InheritedSocket(7, "web", False),),
        config_fd=5,
        admin=({"route": "web", "address": "10.0.0.2:80", "state": "drain"},),
    )


# ----- the setup in the environment -----------------------------------------------


@pytest.mark.parametrize("metrics_path", ["/run/x/worker-3.sock", f"{ABSTRACT_PREFIX}/worker-3"])
def test_the_setup_round_trips_with_its_config_fd(metrics_path: str) -> None:
    text = encode(setup(metrics_path))
    # An environment variable cannot hold a NUL byte: JSON spells it \u0000.
    assert "\0" not in text
    assert decode(text) == setup(metrics_path)
    assert decode(text).config_fd == 5
    assert decode(text).admin == ({"route": "web", "address": "10.0.0.2:80", "state": "drain"},)


def test_a_setup_without_its_config_fd_is_refused() -> None:
    data = json.loads(encode(setup()))
    del data["config_fd"]
    with pytest.raises(ValueError, match="config_fd"):
        decode(json.dumps(data))
    data["config_fd"] = "five"
    with pytest.raises(ValueError, match=WORKER_ENV):
        decode(json.dumps(data))


def test_the_worker_reads_its_config_at_the_path_it_is_given() -> None:
    command = worker_command(RunOptions(log_level="debug"), "/proc/self/fd/5")
    assert command[-4:] == ["-c", "/proc/self/fd/5", "--log-level", "debug"]


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        ("/run/splicerelay-x/notify.sock", "/run/splicerelay-x/notify.sock"),
        (f"{ABSTRACT_PREFIX}/notify", "@splicerelay-42-00ff/notify"),
    ],
)
def test_the_worker_environment(notify: str, expected: str) -> None:
    environ = {"PATH": "/usr/bin", **{key: "1" for key in NOT_FOR_WORKERS}}
    environment = worker_environment(environ, setup(), notify, watchdog=20.0)
    assert environment["NOTIFY_SOCKET"] == expected
    assert decode(environment[WORKER_ENV]) == setup()
    assert environment["WATCHDOG_USEC"] == "20000000"
    assert environment["PATH"] == "/usr/bin"
    assert not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID"} & set(environment)
    assert all("\0" not in value for value in environment.values())


# ----- the names of the sockets -------------------------------------------------------


def test_abstract_names_are_spelled_with_an_at_in_the_environment() -> None:
    assert for_environment("\0abc/notify") == "@abc/notify"
    assert for_environment("/run/a/notify.sock") == "/run/a/notify.sock"
    assert is_abstract("\0x") and not is_abstract("/x") and not is_abstract("@x")


def test_in_a_directory_the_sockets_have_fixed_names_in_it() -> None:
    rendezvous = Rendezvous("/run/splicerelay-ab", "/run/splicerelay-ab")
    assert rendezvous.notify_address == "/run/splicerelay-ab/notify.sock"
    assert rendezvous.metrics_address(3) == "/run/splicerelay-ab/worker-3.sock"
    assert rendezvous.control_address(3) == "/run/splicerelay-ab/control-3.sock"


def test_abstract_metrics_names_cannot_be_guessed_before_the_worker_binds_one() -> None:
    rendezvous = Rendezvous(None, ABSTRACT_PREFIX)
    assert rendezvous.notify_address == f"{ABSTRACT_PREFIX}/notify"
    names = [rendezvous.metrics_address(3) for _ in range(20)]
    assert all(name.startswith(f"{ABSTRACT_PREFIX}/worker-3-") for name in names)
    assert all(is_abstract(name) for name in names)
    assert len(set(names)) == len(names)  # a random part, new for every worker
    controls = [rendezvous.control_address(3) for _ in range(20)]
    assert all(name.startswith(f"{ABSTRACT_PREFIX}/control-3-") for name in controls)
    assert all(is_abstract(name) for name in controls)
    assert len(set(controls)) == len(controls)


# ----- when a worker may take a reload ------------------------------------------------


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None

    def wait(self, timeout: float | None = None) -> int:
        return 0


def new_worker(table: WorkerTable) -> Worker:
    worker = Worker(1, 0, FakeProcess(1001), "/nonexistent/w.sock", 0.0)
    table.add(worker)
    return worker


def test_a_ready_idle_worker_takes_a_reload_at_once_and_the_next_waits_for_its_answer() -> None:
    table = WorkerTable(1, watchdog=0)
    worker = new_worker(table)
    table.heard(1001, {"READY": "1"}, now=1.0)
    assert table.reload_now(worker)
    assert not table.reload_now(worker)  # it may still be reading the first
    assert worker.reload_pending
    progress = table.heard(1001, {"RELOADING": "1"}, now=2.0)
    assert progress is not None and not progress.send_reload
    answer = table.heard(1001, {"READY": "1", RELOAD_RESULT_FIELD: "success"}, now=3.0)
    assert answer is not None and answer.send_reload and answer.reload_ok
    assert worker.reload_in_flight and not worker.reload_pending
    last = table.heard(1001, {"READY": "1", RELOAD_RESULT_FIELD: "failure"}, now=4.0)
    assert last is not None and not last.send_reload and last.reload_ok is False
    assert not worker.reload_in_flight
    assert table.reload_now(worker)


def test_a_worker_still_starting_takes_its_reload_once_ready() -> None:
    table = WorkerTable(1, watchdog=0)
    worker = new_worker(table)
    assert not table.reload_now(worker)
    assert not table.reload_now(worker)  # two reloads while starting: one SIGHUP
    status = table.heard(1001, {"STATUS": "starting"}, now=1.0)
    assert status is not None and not status.send_reload
    ready = table.heard(1001, {"READY": "1"}, now=2.0)
    assert ready is not None and ready.came_up and ready.send_reload
    again = table.heard(1001, {"READY": "1"}, now=3.0)
    assert again is not None and not again.send_reload


class ReloadHandover(RuleBasedStateMachine):
    """A worker as the supervisor's table sees it, against a model of when the worker
    reads its config: from its start until it is ready, and from each SIGHUP until it
    reports that reload. The supervisor rewrites the worker's copy of the config only
    when it sends a SIGHUP, so a SIGHUP may go only while the worker reads nothing; and
    no reload asked for is left behind once the worker is idle."""

    def __init__(self) -> None:
        super().__init__()
        self.table = WorkerTable(1, watchdog=0)
        self.worker = new_worker(self.table)
        self.reading_start = True
        self.sighups_unanswered = 0
        self.asked_since_last_sighup = False
        self.now = 0.0

    def _sighup(self) -> None:
        assert not self.reading_start and self.sighups_unanswered == 0, "rewrote under a reader"
        self.sighups_unanswered += 1
        self.asked_since_last_sighup = False

    def _heard(self, fields: dict[str, str]) -> None:
        self.now += 1
        heard = self.table.heard(1001, fields, self.now)
        assert heard is not None
        if heard.send_reload:
            self._sighup()

    @rule()
    def supervisor_reloads(self) -> None:
        self.asked_since_last_sighup = True
        if self.table.reload_now(self.worker):
            self._sighup()

    @precondition(lambda self: self.reading_start)
    @rule()
    def worker_comes_up(self) -> None:
        self.reading_start = False
        self._heard({"READY": "1", "STATUS": "0 connections"})

    @precondition(lambda self: self.sighups_unanswered > 0)
    @rule(ok=st.booleans())
    def worker_answers(self, ok: bool) -> None:
        self.sighups_unanswered -= 1
        self._heard({"READY": "1", RELOAD_RESULT_FIELD: "success" if ok else "failure"})

    @rule(count=st.integers(0, 3))
    def worker_reports_status(self, count: int) -> None:
        self._heard({"STATUS": f"{count} connections"})

    @invariant()
    def nothing_left_behind_when_idle(self) -> None:
        idle = not self.reading_start and self.sighups_unanswered == 0
        if idle:
            assert not self.asked_since_last_sighup and not self.worker.reload_pending


TestReloadHandover = ReloadHandover.TestCase
