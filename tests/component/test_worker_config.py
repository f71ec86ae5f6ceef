"""How the config and the sockets reach the workers without a file system: each worker's
in-memory copy of the config, rewritten only while the worker is not reading it, and the
sockets between supervisor and workers in a private directory or the abstract namespace.

In-process: the memfds, sockets and listeners are real; the worker processes, their
signals and the notify messages are the fakes of tests/support/supervisor.py.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from splicerelay.config import read_config
from splicerelay.config.addresses import UnixAddress
from splicerelay.ops.metrics import MetricsServer
from splicerelay.ops.service import RunOptions
from splicerelay.ops.systemd import Notifier, NotifyReceiver
from splicerelay.workers import supervisor as supervisor_module
from splicerelay.workers.config_copy import ConfigCopy
from splicerelay.workers.rendezvous import Rendezvous, for_environment, open_rendezvous
from splicerelay.workers.scrape import fetch
from splicerelay.workers.supervisor import run_supervisor
from tests.support.harness import free_port
from tests.support.supervisor import CONFIG, Harness, supervisor_harness


@pytest.fixture
def harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[Harness]:
    with supervisor_harness(tmp_path, monkeypatch, caplog) as harness:
        yield harness


def is_memfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except FileNotFoundError:
        return False


# ----- a copy of the config in memory --------------------------------------------


def test_a_copy_reads_back_through_its_path_as_a_file() -> None:
    copy = ConfigCopy("workers: 2\n# überall\n")
    try:
        assert is_memfd(copy.fileno())
        assert copy.path == f"/proc/self/fd/{copy.fileno()}"
        with open(copy.path, encoding="utf-8") as file:
            assert file.read() == "workers: 2\n# überall\n"
        # Why it matters: a shorter text must not keep the old one's tail.
        copy.write("workers: 3\n")
        with open(copy.path, encoding="utf-8") as file:
            assert file.read() == "workers: 3\n"
        assert copy.read() == "workers: 3\n"
        # Only the worker it is for inherits it, through pass_fds.
        assert not os.get_inheritable(copy.fileno())
    finally:
        copy.close()
    copy.close()  # twice is fine


def test_a_large_config_is_copied_whole() -> None:
    text = "".join(f"# line {index}\n" for index in range(20000))
    copy = ConfigCopy(text)
    try:
        assert copy.read() == text
    finally:
        copy.close()


# ----- the supervisor and its workers' copies ----------------------------------------


def test_each_worker_starts_on_its_own_copy_of_the_config(harness: Harness) -> None:
    fds = []
    for command, setup in harness.started:
        assert command[command.index("-c") + 1] == f"/proc/self/fd/{setup.config_fd}"
        # The test runs as the supervisor: the worker's fd number names the same memfd.
        with open(f"/proc/self/fd/{setup.config_fd}", encoding="utf-8") as file:
            assert file.read() == harness.old_text
        fds.append(setup.config_fd)
    assert len(set(fds)) == 2


def test_a_reload_rewrites_each_copy_before_its_sighup(harness: Harness) -> None:
    harness.all_ready()
    new_text = harness.reload_to_one_route()
    assert harness.config_at_signal == [(1001, new_text), (1002, new_text)]


def test_a_copy_is_not_rewritten_while_its_worker_may_read_it(harness: Harness) -> None:
    """1002 has not answered the first reload when a second one comes: it may still be
    reading its copy, which must stay as it is until its answer; then it gets the
    second reload."""
    harness.all_ready()
    first = harness.reload_to_one_route()
    harness.answer(1001, "success")
    second = first.replace("workers: 2", "workers: 2\nshutdown_timeout: 7s")
    harness.path.write_text(second)
    harness.supervisor.reload("SIGHUP")
    pool = harness.supervisor.pool
    [one, two] = harness.workers
    assert harness.config_at_signal[-1] == (1001, second)
    assert pool.config_of(two) == first
    assert harness.signals.count((1002, signal.SIGHUP)) == 1
    harness.answer(1002, "success")
    assert harness.config_at_signal[-1] == (1002, second)
    assert pool.config_of(one) == pool.config_of(two) == second


def test_a_worker_still_starting_reads_its_start_config_undisturbed(harness: Harness) -> None:
    harness.receiver.send(1001, READY="1")
    harness.supervisor.read_notifications()
    new_text = harness.reload_to_one_route()
    starting = harness.workers[1]
    assert harness.supervisor.pool.config_of(starting) == harness.old_text
    harness.receiver.send(1002, READY="1")
    harness.supervisor.read_notifications()
    assert harness.config_at_signal == [(1001, new_text), (1002, new_text)]


def test_a_restarted_worker_gets_the_config_the_others_run(harness: Harness) -> None:
    """After a reload every worker refused, the old config; after one they took, the new."""
    harness.all_ready()
    harness.reload_to_one_route()
    harness.answer(1001, "failure")
    harness.answer(1002, "failure")
    harness.supervisor.finish_reloads(0.0)
    harness.workers[0].process.returncode = -9  # type: ignore[attr-defined]
    harness.supervisor.reap()
    harness.supervisor.restart_due(1e12)
    [restarted] = [w for w in harness.supervisor.table if w.pid == 1003]
    assert harness.supervisor.pool.config_of(restarted) == harness.old_text

    harness.all_ready()
    harness.receiver.send(1003, READY="1")
    harness.supervisor.read_notifications()
    new_text = harness.reload_to_one_route()
    for pid in (1002, 1003):
        harness.answer(pid, "success")
    harness.supervisor.finish_reloads(0.0)
    harness.workers[1].process.returncode = -9  # type: ignore[attr-defined]
    harness.supervisor.reap()
    harness.supervisor.restart_due(1e12)
    [again] = [w for w in harness.supervisor.table if w.pid == 1004]
    assert harness.supervisor.pool.config_of(again) == new_text


def test_a_dead_workers_copy_is_freed(harness: Harness) -> None:
    [_, setup] = harness.started[0]
    assert is_memfd(setup.config_fd)
    harness.workers[0].process.returncode = 0  # type: ignore[attr-defined]
    harness.supervisor.reap()
    assert not is_memfd(setup.config_fd)


# ----- where the sockets live ---------------------------------------------------------


def test_a_private_directory_under_the_runtime_directory(tmp_path: Path) -> None:
    rendezvous = open_rendezvous({"RUNTIME_DIRECTORY": f"{tmp_path}:/elsewhere"})
    try:
        assert rendezvous.directory is not None
        assert Path(rendezvous.directory).parent == tmp_path
        assert stat.S_IMODE(os.stat(rendezvous.directory).st_mode) == 0o700
        assert rendezvous.notify_address.startswith(rendezvous.directory + "/")
    finally:
        rendezvous.close()
    assert not Path(rendezvous.directory).exists()


def test_abstract_names_when_no_directory_can_be_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = logging.getLogger("splicerelay")
    monkeypatch.setattr(logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="splicerelay")
    rendezvous = open_rendezvous({"RUNTIME_DIRECTORY": str(tmp_path / "missing")})
    assert rendezvous.directory is None
    assert rendezvous.notify_address.startswith(f"\0splicerelay-{os.getpid()}-")
    assert "using abstract socket names" in caplog.text
    rendezvous.close()  # nothing to remove


def test_the_notify_socket_under_an_abstract_name() -> None:
    """A worker's Notifier reaches the supervisor's receiver through NOTIFY_SOCKET's
    "@" spelling, and the kernel names the sender; closing leaves nothing behind."""
    address = Rendezvous(None, f"\0splicerelay-test-{os.getpid()}").notify_address
    receiver = NotifyReceiver(address)
    notifier = Notifier(for_environment(address))
    try:
        notifier.ready("0 connections")
        message = None
        for _ in range(100):
            if (message := receiver.receive()) is not None:
                break
            socket.socket(socket.AF_UNIX).close()  # (a syscall's worth of waiting)
        assert message is not None
        assert message.pid == os.getpid() and message.fields["READY"] == "1"
    finally:
        notifier.close()
        receiver.close()
    # The name is free again as soon as the socket is closed.
    NotifyReceiver(address).close()


def test_a_workers_metrics_under_an_abstract_name() -> None:
    address = Rendezvous(None, f"\0splicerelay-test-{os.getpid()}").metrics_address(1)
    from prometheus_client import CollectorRegistry

    server = MetricsServer(UnixAddress(address), CollectorRegistry())
    server.start()
    try:
        status, _ = fetch(address, "/readyz")
        assert status == 200
    finally:
        server.close()


# ----- failing with one clear line --------------------------------------------------


def run_failing_supervisor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[logging.LogRecord], int]:
    logger = logging.getLogger("splicerelay")
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "handlers", [])
    caplog.set_level(logging.INFO, logger="splicerelay")
    port = free_port()
    path = tmp_path / "relay.yaml"
    path.write_text(CONFIG.format(kept=port, more=""))
    config, text = read_config(str(path))
    code = run_supervisor(RunOptions(config_path=str(path)), config, text)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    return code, errors, port


def assert_port_free(port: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # the supervisor closed its listener


def test_no_notify_socket_is_one_error_line_and_exit_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = str(tmp_path / "missing")
    monkeypatch.setattr(
        supervisor_module, "open_rendezvous", lambda environ: Rendezvous(nowhere, nowhere)
    )
    code, errors, port = run_failing_supervisor(tmp_path, caplog, monkeypatch)
    assert code == 1
    assert [record.getMessage() for record in errors] == [
        "cannot open the workers' notify socket: No such file or directory"
    ]
    assert_port_free(port)


def test_no_memfd_is_one_error_line_and_exit_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(name: str, flags: int = 0) -> int:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "memfd_create", refused)
    code, errors, port = run_failing_supervisor(tmp_path, caplog, monkeypatch)
    assert code == 1
    assert [record.getMessage() for record in errors] == [
        "cannot start a worker: Operation not permitted"
    ]
    assert_port_free(port)


def test_a_restart_that_cannot_start_a_process_waits_and_tries_again(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness.all_ready()
    harness.workers[1].process.returncode = -9  # type: ignore[attr-defined]
    harness.supervisor.reap()
    table = harness.supervisor.table
    with monkeypatch.context() as failing:

        def refused(name: str, flags: int = 0) -> int:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        failing.setattr(os, "memfd_create", refused)
        harness.supervisor.restart_due(1e6)
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "cannot start a worker: Too many open files"
    assert table.restarts == 0 and len(table) == 1
    assert table.next_timeout(1e6, tick=10.0) > 0  # after a backoff, not at once
    harness.supervisor.restart_due(1e6 + 10.0)
    assert table.restarts == 1 and len(table) == 2
    [again] = [w for w in table if w.slot == 1]
    assert harness.supervisor.pool.config_of(again) == harness.old_text
