"""The supervisor in-process, for component tests: fake worker processes, a fake notify
socket and service manager, and a harness around a real Supervisor whose workers are
those fakes (their copies of the config and the listeners are real)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from splicerelay.config import Config, read_config
from splicerelay.ops.service import RunOptions
from splicerelay.ops.systemd import NotifyMessage
from splicerelay.relay.listeners import ListenerSet, Role
from splicerelay.workers import pool as pool_module
from splicerelay.workers import supervisor as supervisor_module
from splicerelay.workers.contract import RELOAD_RESULT_FIELD, WorkerSetup
from splicerelay.workers.rendezvous import Rendezvous
from splicerelay.workers.supervisor import Supervisor
from splicerelay.workers.worker_table import Worker
from tests.support.harness import free_port


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode or 0


class FakeReceiver:
    """Notify messages queued by the test, as the notify socket would return them."""

    path = "/nonexistent/notify.sock"

    def __init__(self) -> None:
        self.messages: list[NotifyMessage] = []

    def send(self, pid: int, **fields: str) -> None:
        self.messages.append(NotifyMessage(pid, dict(fields)))

    def receive(self) -> NotifyMessage | None:
        return self.messages.pop(0) if self.messages else None

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class FakeNotifier:
    """The real service manager: records what it was told."""

    enabled = True

    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self, status: str, *extra: str) -> None:
        self.sent.append("READY=1")

    def reloading(self) -> None:
        self.sent.append("RELOADING=1")

    def stopping(self, status: str) -> None:
        self.sent.append("STOPPING=1")

    def status(self, status: str) -> None:
        self.sent.append(f"STATUS={status}")

    def watchdog(self) -> None:
        self.sent.append("WATCHDOG=1")

    def close(self) -> None:
        pass


def worker(pid: int, slot: int = 0, started: float = 0.0, ready: bool = False) -> Worker:
    return Worker(pid, slot, FakeProcess(pid), f"/nonexistent/w{pid}.sock", started, ready=ready)


CONFIG = """\
workers: 2
log: {{level: info, format: json}}
routes:
  - name: kept
    listen: 127.0.0.1:{kept}
    upstreams: [{{address: 127.0.0.1:9}}]
{more}"""
DROPPED = """\
  - name: dropped
    listen: 127.0.0.1:{dropped}
    upstreams: [{{address: 127.0.0.1:9}}]
"""


class Harness:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ports = {"kept": free_port(), "dropped": free_port()}
        self.path = tmp_path / "relay.yaml"
        self.old_text = CONFIG.format(more=DROPPED.format(**self.ports), **self.ports)
        self.path.write_text(self.old_text)
        config, text = read_config(str(self.path))
        self.listeners = ListenerSet(role=Role.SUPERVISOR)
        for route in config.routes:
            self.listeners.take(route.name, route.listen)
        self.logs_configured: list[Config] = []
        monkeypatch.setattr(
            supervisor_module,
            "configure_logs",
            lambda options, config: self.logs_configured.append(config),
        )
        directory = str(tmp_path / "run")
        os.mkdir(directory)
        self.supervisor = Supervisor(
            RunOptions(config_path=str(self.path)),
            config,
            text,
            self.listeners,
            Rendezvous(directory, directory),
        )
        self.supervisor.receiver.close()
        self.receiver = FakeReceiver()
        self.supervisor.receiver = self.supervisor.pool.receiver = self.receiver  # type: ignore[assignment]
        self.notifier = FakeNotifier()
        self.supervisor.notifier = self.notifier  # type: ignore[assignment]
        self.signals: list[tuple[int, int]] = []
        # What each worker would read when a signal reaches it.
        self.config_at_signal: list[tuple[int, str]] = []
        self.supervisor.pool.kill = self._kill  # type: ignore[method-assign]
        self.started: list[tuple[list[str], WorkerSetup]] = []
        pids: Iterator[int] = iter(range(1001, 2000))

        def start_worker(command: list[str], environment: object, setup: WorkerSetup) -> object:
            self.started.append((command, setup))
            return FakeProcess(next(pids))

        monkeypatch.setattr(pool_module, "start_worker", start_worker)
        self.workers = [self.supervisor.pool.spawn(0), self.supervisor.pool.spawn(1)]

    def _kill(self, worker: Worker, signum: int) -> None:
        self.signals.append((worker.pid, signum))
        if signum == signal.SIGHUP:
            self.config_at_signal.append((worker.pid, self.supervisor.pool.config_of(worker)))

    def snapshot(self) -> str:
        """The config a worker started now loads."""
        return self.supervisor.rounds.current.text

    def all_ready(self) -> None:
        for each in self.workers:
            self.receiver.send(each.pid, READY="1")
        self.supervisor.read_notifications()

    def reload_to_one_route(self) -> str:
        new_text = CONFIG.format(more="", **self.ports)
        self.path.write_text(new_text)
        self.supervisor.reload("SIGHUP")
        return new_text

    def answer(self, pid: int, result: str) -> None:
        self.receiver.send(pid, **{RELOAD_RESULT_FIELD: result})
        self.supervisor.read_notifications()

    def reloads(self) -> tuple[float, float]:
        family = self.supervisor.own_families()["splicerelay_config_reloads"]
        values = {dict(labels)["result"]: value for (_, labels), value in family.samples.items()}
        return values["success"], values["failure"]

    def listener_open(self, name: str) -> bool:
        return any(address.port == self.ports[name] for address in self.listeners.addresses())  # type: ignore[union-attr]


@contextmanager
def supervisor_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[Harness]:
    """A Harness whose supervisor's log lines `caplog` reads; closed at the end."""
    # Whatever logging an earlier test set up, these read the supervisor's lines.
    logger = logging.getLogger("splicerelay")
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "handlers", [])
    caplog.set_level(logging.INFO, logger="splicerelay")
    harness = Harness(tmp_path, monkeypatch)
    try:
        yield harness
    finally:
        harness.supervisor.close()
