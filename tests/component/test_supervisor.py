"""The supervisor in-process, without worker processes: the worker table's decisions
(restart backoff, the hung-worker watchdog, what a notify message means) and what the
supervisor does with the workers' messages and deaths.

Worker processes, the notify socket's messages, the service manager and signals to the
workers are fakes (tests/support/supervisor.py); the config files, each worker's copy of
the config (a real memfd) and the listeners are real.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from splicerelay.workers.contract import RELOAD_RESULT_FIELD
from splicerelay.workers.worker_table import (
    RESTART_BACKOFF_FIRST,
    RESTART_BACKOFF_MAX,
    STABLE_AFTER,
    WorkerTable,
)
from tests.support.supervisor import Harness, supervisor_harness, worker

# ----- the worker table -----------------------------------------------------------------


def test_restart_backoff_doubles_while_a_slot_dies_young_and_is_capped() -> None:
    table = WorkerTable(2, watchdog=0)
    delays = [table.schedule_restart(worker(10 + n, slot=1, started=n), n + 1.0) for n in range(8)]
    assert delays[:4] == [RESTART_BACKOFF_FIRST * 2**n for n in range(4)]
    assert delays[-1] == RESTART_BACKOFF_MAX
    # The other slot has its own count.
    assert table.schedule_restart(worker(99, slot=0), 1.0) == RESTART_BACKOFF_FIRST


def test_a_worker_that_lived_long_enough_resets_its_slots_backoff() -> None:
    table = WorkerTable(1, watchdog=0)
    for n in range(3):
        table.schedule_restart(worker(n, started=0.0), 1.0)
    assert table.schedule_restart(worker(9, started=100.0), 100.0 + STABLE_AFTER) == (
        RESTART_BACKOFF_FIRST
    )


def test_restarts_come_due_in_time_and_count_once() -> None:
    table = WorkerTable(2, watchdog=0)
    delay = table.schedule_restart(worker(1, slot=0), 10.0)
    table.schedule_restart(worker(2, slot=1, started=10.0), 10.0)
    table.schedule_restart(worker(3, slot=1, started=10.0), 10.0)  # slot 1 again: longer
    assert table.next_timeout(10.0, tick=0.5) == pytest.approx(delay)
    assert table.due(10.0) == []
    assert table.due(10.0 + delay) == [0]
    assert table.due(10.0 + delay) == []
    assert table.due(20.0) == [1]
    assert table.restarts == 2
    assert table.next_timeout(20.0, tick=0.5) == 0.5


def test_stopping_cancels_the_restarts_waiting() -> None:
    table = WorkerTable(1, watchdog=0)
    table.schedule_restart(worker(1), 0.0)
    table.cancel_restarts()
    assert table.due(1000.0) == []
    assert table.restarts == 0


def test_the_watchdog_names_a_silent_ready_worker_once() -> None:
    table = WorkerTable(3, watchdog=20.0)
    silent = worker(1, ready=True)
    starting = worker(2, ready=False)  # resolving names, maybe: not hung
    talking = worker(3, ready=True)
    for each in (silent, starting, talking):
        table.add(each)
    table.heard(3, {"WATCHDOG": "1"}, now=15.0)
    assert table.hung(20.0) == []  # 20 s is not more than 20 s
    assert table.hung(21.0) == [(silent, 21.0)]
    assert silent.killed_as_hung
    assert table.hung(60.0) == [(talking, 45.0)]  # the silent one is named once


def test_the_watchdog_set_to_zero_is_off() -> None:
    table = WorkerTable(1, watchdog=0)
    table.add(worker(1, ready=True))
    assert table.hung(1e9) == []


def test_a_notify_message_updates_its_worker() -> None:
    table = WorkerTable(2, watchdog=20.0)
    one, two = worker(1), worker(2)
    table.add(one)
    table.add(two)
    one.reload_pending = True
    assert table.heard(3, {"READY": "1"}, now=1.0) is None  # not one of ours
    heard = table.heard(1, {"READY": "1", "STATUS": "3 connections"}, now=5.0)
    assert heard is not None
    assert (heard.worker, heard.send_reload, heard.reload_ok) == (one, True, None)
    assert one.ready and not one.reload_pending and one.last_heard == 5.0
    assert not table.all_started_and_ready()
    again = table.heard(1, {"READY": "1"}, now=6.0)
    assert again is not None and not again.send_reload  # the held-back SIGHUP goes once
    table.heard(2, {"READY": "1", "STATUS": "1 connection"}, now=7.0)
    assert table.all_started_and_ready()
    assert table.connections() == 4
    table.heard(1, {"STATUS": "2 connections"}, now=7.5)
    assert table.connections() == 3
    refused = table.heard(2, {RELOAD_RESULT_FIELD: "failure"}, now=8.0)
    taken = table.heard(1, {RELOAD_RESULT_FIELD: "success"}, now=8.0)
    assert refused is not None and refused.reload_ok is False
    assert taken is not None and taken.reload_ok is True


# ----- the supervisor with fake workers -----------------------------------------------


@pytest.fixture
def harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[Harness]:
    with supervisor_harness(tmp_path, monkeypatch, caplog) as harness:
        yield harness


def test_ready_is_announced_once_every_worker_is_ready(harness: Harness) -> None:
    harness.receiver.send(1001, READY="1")
    harness.supervisor.read_notifications()
    assert not harness.supervisor.announced and harness.notifier.sent == []
    harness.all_ready()
    assert harness.supervisor.announced
    assert harness.notifier.sent == ["READY=1"]


def test_a_reload_every_worker_refused_restores_the_snapshot_and_keeps_listeners(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.all_ready()
    new_text = harness.reload_to_one_route()
    assert harness.snapshot() == new_text
    assert harness.signals == [(1001, signal.SIGHUP), (1002, signal.SIGHUP)]
    harness.answer(1001, "failure")
    harness.answer(1002, "failure")
    harness.supervisor.finish_reloads(0.0)
    assert harness.snapshot() == harness.old_text
    assert [len(c.routes) for c in harness.logs_configured] == [1, 2]  # new, then back
    assert len(harness.supervisor.config.routes) == 2
    assert harness.reloads() == (0, 1)
    assert harness.listener_open("dropped")
    assert "reload failed in every worker; the running config stays" in caplog.messages
    assert harness.notifier.sent[-2:] == ["RELOADING=1", "READY=1"]


def test_a_reload_some_workers_took_closes_the_dropped_listener(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.all_ready()
    new_text = harness.reload_to_one_route()
    harness.answer(1001, "success")
    harness.supervisor.finish_reloads(0.0)
    assert harness.listener_open("dropped")  # one worker has not answered yet
    harness.answer(1002, "failure")
    harness.supervisor.finish_reloads(0.0)
    assert harness.snapshot() == new_text
    assert harness.reloads() == (0, 1)
    assert not harness.listener_open("dropped")
    assert harness.listener_open("kept")
    assert "reload failed in some workers; see their log lines" in caplog.messages


def test_a_reload_is_held_back_until_the_worker_is_ready(harness: Harness) -> None:
    harness.receiver.send(1001, READY="1")
    harness.supervisor.read_notifications()
    harness.reload_to_one_route()
    assert harness.signals == [(1001, signal.SIGHUP)]
    assert harness.workers[1].reload_pending
    harness.receiver.send(1002, READY="1")
    harness.receiver.send(1002, READY="1")
    harness.supervisor.read_notifications()
    assert harness.signals == [(1001, signal.SIGHUP), (1002, signal.SIGHUP)]
    harness.answer(1001, "success")
    harness.answer(1002, "success")
    harness.supervisor.finish_reloads(0.0)
    assert harness.reloads() == (1, 0)


def test_an_invalid_config_is_refused_before_any_worker_hears_of_it(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.all_ready()
    harness.path.write_text("routes: [")
    harness.supervisor.reload("SIGHUP")
    assert harness.signals == []
    assert harness.snapshot() == harness.old_text
    assert harness.reloads() == (0, 1)
    assert harness.supervisor.rounds.pending == 0
    assert "reload failed: invalid config; the running config stays" in caplog.messages


def test_a_worker_that_dies_during_a_round_is_not_waited_for(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.all_ready()
    new_text = harness.reload_to_one_route()
    harness.answer(1001, "success")
    harness.workers[1].process.returncode = -9  # type: ignore[attr-defined]
    harness.supervisor.reap()
    harness.supervisor.finish_reloads(0.0)
    assert harness.reloads() == (1, 0)
    assert harness.snapshot() == new_text
    assert not harness.listener_open("dropped")
    [record] = [r for r in caplog.records if r.message == "worker exited; restarting it"]
    assert record.fields["status"] == "killed by SIGKILL"  # type: ignore[attr-defined]
    assert harness.supervisor.table.next_timeout(0.0, tick=10.0) > 0  # slot 1 waits


def test_a_round_times_out_as_a_failure_naming_the_silent(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.all_ready()
    harness.reload_to_one_route()
    harness.answer(1001, "success")
    harness.supervisor.finish_reloads(1.0)
    assert harness.reloads() == (0, 0)
    harness.supervisor.finish_reloads(1e12)
    assert harness.reloads() == (0, 1)
    [record] = [r for r in caplog.records if "did not report" in r.message]
    assert record.fields == {"workers": [1002]}  # type: ignore[attr-defined]


def test_a_worker_failing_before_the_service_is_ready_stops_everything(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.workers[0].process.returncode = 1  # type: ignore[attr-defined]
    harness.supervisor.reap()
    assert harness.supervisor.stopping
    assert harness.supervisor._exit_code == 1
    assert harness.signals == [(1002, signal.SIGTERM)]
    assert harness.notifier.sent == ["STOPPING=1"]
    assert "worker failed to start; stopping" in caplog.messages


def test_a_hung_worker_is_killed_once(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness.all_ready()
    harness.supervisor.table.watchdog = 20.0
    now = harness.workers[0].last_heard + 30.0
    harness.workers[1].last_heard = now
    harness.supervisor.pool.kill_hung(now)
    harness.supervisor.pool.kill_hung(now + 1)
    assert harness.signals == [(1001, signal.SIGKILL)]
    assert caplog.messages.count("worker stopped answering; killing it") == 1


def test_a_reload_that_adds_a_unix_listener_is_refused(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness.all_ready()
    unix_route = (
        f"  - name: local\n    listen: unix:{tmp_path / 'local.sock'}\n"
        "    upstreams: [{address: 127.0.0.1:9}]\n"
    )
    harness.path.write_text(harness.old_text + unix_route)
    harness.supervisor.reload("SIGHUP")
    assert harness.signals == []
    assert harness.snapshot() == harness.old_text
    assert harness.reloads() == (0, 1)
    assert harness.supervisor.rounds.pending == 0
    [record] = [r for r in caplog.records if r.message == "reload failed; the running config stays"]
    assert record.fields == {  # type: ignore[attr-defined]
        "reason": "SIGHUP",
        "error": f"route local: a new unix socket listener (unix:{tmp_path / 'local.sock'})"
        " needs a restart when workers > 1",
    }
    assert harness.notifier.sent[-2:] == ["RELOADING=1", "READY=1"]


def test_a_worker_restarted_during_a_round_is_counted_in_it(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker 1002 dies during a reload and its replacement loads the new snapshot; when
    1001 then refuses, the snapshot must not go back under the replacement's feet."""
    harness.all_ready()
    new_text = harness.reload_to_one_route()
    harness.workers[1].process.returncode = -9  # type: ignore[attr-defined]
    harness.supervisor.reap()
    harness.supervisor.restart_due(1e12)
    [replacement] = [w for w in harness.supervisor.table if w.pid == 1003]
    assert harness.supervisor.pool.config_of(replacement) == new_text
    harness.answer(1001, "failure")
    harness.supervisor.finish_reloads(0.0)
    assert harness.reloads() == (0, 0)  # the replacement has not come up yet
    harness.receiver.send(1003, READY="1")
    harness.supervisor.read_notifications()
    harness.supervisor.finish_reloads(0.0)
    assert harness.reloads() == (0, 1)
    assert harness.snapshot() == new_text  # what the replacement runs
    assert "reload failed in some workers; see their log lines" in caplog.messages
