"""The single-process service loop, in-process: reloads, the file watch and signals.

The relay behind the loop is a stand-in that records what it was asked to do; the notify
socket, the config files and the signals are real.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import trio

from splicerelay.config import Config, config_from_args, load_config
from splicerelay.datapath.stats import RelayStats
from splicerelay.ops.service import RunOptions
from splicerelay.ops.systemd import Notifier
from splicerelay.relay import service
from splicerelay.relay.routes import StartupError
from splicerelay.relay.service import AsWorker, Reloader, serve_until_signalled

CONFIG = """\
routes:
  - name: web
    listen: 127.0.0.1:{port}
    upstreams: [{{address: 127.0.0.1:9}}]
"""


class StandInRelay:
    """Records what the service loop asks of the relay."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = RelayStats()
        self.runtimes: list[object] = []
        self.use_splice = True
        self.active_sessions = 0
        self.reloaded: list[Config] = []
        self.refuse_reload: Exception | None = None
        self.calls: list[str] = []
        self._stopped = trio.Event()

    async def reload(self, config: Config) -> None:
        if self.refuse_reload is not None:
            raise self.refuse_reload
        self.reloaded.append(config)
        self.config = config

    def begin_shutdown(self) -> None:
        self.calls.append("begin_shutdown")

    def stop_all_sessions(self) -> None:
        self.calls.append("stop_all_sessions")
        self._stopped.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._stopped.wait()


class ServiceManager:
    """The service manager's end of NOTIFY_SOCKET: a real datagram socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.notifier = Notifier(str(path))

    def messages(self) -> list[dict[str, str]]:
        found = []
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except BlockingIOError:
                return found
            found.append(dict(line.split("=", 1) for line in data.splitlines()))

    async def wait_for(self, key: str) -> dict[str, str]:
        with trio.fail_after(5):
            while True:
                await trio.lowlevel.wait_readable(self.sock)
                for message in self.messages():
                    if key in message:
                        return message

    def close(self) -> None:
        self.notifier.close()
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path):  # type: ignore[no-untyped-def]
    manager = ServiceManager(tmp_path / "notify.sock")
    yield manager
    manager.close()


@pytest.fixture
def logs_configured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[RunOptions, Config]]:
    """Keep a successful reload from re-pointing the process's real log handlers."""
    calls: list[tuple[RunOptions, Config]] = []
    monkeypatch.setattr(
        service,
        "configure_service_logs",
        lambda options, config, worker=None: calls.append((options, config)),
    )
    return calls


def write_config(path: Path, port: int) -> Path:
    path.write_text(CONFIG.format(port=port))
    return path


async def test_a_valid_reload_applies_the_new_config_and_reports_ready(
    tmp_path, manager, logs_configured
):
    path = write_config(tmp_path / "relay.yaml", 7001)
    relay = StandInRelay(load_config(str(path)))
    write_config(path, 7002)
    reloader = Reloader(RunOptions(config_path=str(path)), relay, manager.notifier)
    await reloader.reload("SIGHUP")
    assert [str(c.routes[0].listen) for c in relay.reloaded] == ["127.0.0.1:7002"]
    assert relay.stats.config_reloads == {"success": 1}
    assert len(logs_configured) == 1
    sent = manager.messages()
    assert [next(iter(m)) for m in sent] == ["RELOADING", "READY"]
    assert sent[1]["STATUS"] == "0 connections"
    assert "X_SPLICERELAY_RELOAD" not in sent[1]


async def test_an_invalid_file_keeps_the_running_config_and_names_the_line(
    tmp_path, manager, caplog, logs_configured
):
    path = write_config(tmp_path / "relay.yaml", 7001)
    relay = StandInRelay(load_config(str(path)))
    path.write_text("routes:\n  - name: web\n    listen: nowhere\n")
    reloader = Reloader(RunOptions(config_path=str(path)), relay, manager.notifier)
    await reloader.reload("SIGHUP")
    assert relay.reloaded == []
    assert relay.stats.config_reloads == {"failure": 1}
    assert logs_configured == []
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage() == "reload failed: invalid config; the running config stays"
    assert any(f"{path}:3:" in error for error in record.fields["errors"])
    assert manager.messages()[-1]["READY"] == "1"


async def test_a_config_the_relay_cannot_start_is_refused_with_its_reason(
    tmp_path, manager, caplog, logs_configured
):
    path = write_config(tmp_path / "relay.yaml", 7001)
    relay = StandInRelay(load_config(str(path)))
    relay.refuse_reload = StartupError("route web: cannot listen on 127.0.0.1:7001")
    reloader = Reloader(RunOptions(config_path=str(path)), relay, manager.notifier)
    await reloader.reload("file changed")
    assert relay.stats.config_reloads == {"failure": 1}
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage() == "reload failed; the running config stays"
    assert record.fields == {
        "reason": "file changed",
        "error": "route web: cannot listen on 127.0.0.1:7001",
    }


@pytest.mark.parametrize("refuse", [False, True])
async def test_a_worker_tells_its_supervisor_how_the_reload_went(
    tmp_path, manager, logs_configured, refuse
):
    path = write_config(tmp_path / "relay.yaml", 7001)
    relay = StandInRelay(load_config(str(path)))
    if refuse:
        relay.refuse_reload = StartupError("no")
    worker = AsWorker(slot=1, cut_signal=signal.SIGUSR2, reload_result_field="X_RESULT")
    reloader = Reloader(RunOptions(config_path=str(path)), relay, manager.notifier, worker)
    await reloader.reload("SIGHUP")
    ready = manager.messages()[-1]
    assert ready["READY"] == "1"
    assert ready["X_RESULT"] == ("failure" if refuse else "success")


async def test_a_relay_from_flags_has_nothing_to_reload(manager, caplog):
    relay = StandInRelay(config_from_args("127.0.0.1:7001", ["127.0.0.1:9"]))
    reloader = Reloader(RunOptions(), relay, manager.notifier)
    await reloader.reload("SIGHUP")
    assert relay.stats.config_reloads == {}
    assert manager.messages() == []
    assert "nothing to reload" in caplog.text


async def test_a_changed_metrics_address_is_a_warning_in_a_single_process_only(
    tmp_path, manager, caplog, logs_configured
):
    path = write_config(tmp_path / "relay.yaml", 7001)
    relay = StandInRelay(load_config(str(path)))
    path.write_text("metrics: {listen: 127.0.0.1:9999}\n" + CONFIG.format(port=7001))
    await Reloader(RunOptions(config_path=str(path)), relay, manager.notifier).reload("x")
    assert "metrics.listen changed" in caplog.text
    caplog.clear()
    worker = AsWorker(slot=0, cut_signal=signal.SIGUSR2, reload_result_field="X")
    relay = StandInRelay(load_config(str(write_config(path, 7001))))
    path.write_text("metrics: {listen: 127.0.0.1:9998}\n" + CONFIG.format(port=7001))
    await Reloader(RunOptions(config_path=str(path)), relay, manager.notifier, worker).reload("x")
    assert "metrics.listen changed" not in caplog.text


async def wait_for_reloads(relay: StandInRelay, count: int) -> None:
    with trio.fail_after(5):
        while len(relay.reloaded) < count:
            await trio.sleep(0.005)


async def test_the_watch_reloads_once_per_change_of_the_file(tmp_path, manager, logs_configured):
    path = write_config(tmp_path / "relay.yaml", 7001)
    relay = StandInRelay(load_config(str(path)))
    reloader = Reloader(RunOptions(config_path=str(path), watch=True), relay, manager.notifier)
    interval = 0.01
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reloader.watch, interval)
        await trio.sleep(10 * interval)  # ten looks at an unchanged file
        assert relay.reloaded == []
        # A ConfigMap update: a new file swapped in under the same name.
        write_config(tmp_path / "next.yaml", 7002)
        os.replace(tmp_path / "next.yaml", path)
        await wait_for_reloads(relay, 1)
        path.unlink()  # gone: not a change; the next version is waited for
        await trio.sleep(10 * interval)
        assert len(relay.reloaded) == 1
        write_config(path, 7003)
        await wait_for_reloads(relay, 2)
        await trio.sleep(10 * interval)  # and only once per change
        nursery.cancel_scope.cancel()
    assert [str(c.routes[0].listen) for c in relay.reloaded] == ["127.0.0.1:7002", "127.0.0.1:7003"]
    assert relay.stats.config_reloads == {"success": 2}  # the missing file was no reload


async def test_signals_reload_then_drain_then_cut_the_drain_short(
    tmp_path, manager, logs_configured
):
    path = write_config(tmp_path / "relay.yaml", 7001)
    relay = StandInRelay(load_config(str(path)))
    reloader = Reloader(RunOptions(config_path=str(path)), relay, manager.notifier)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_until_signalled, relay, manager.notifier, reloader)
            # READY comes only once the signal receiver is in place.
            await manager.wait_for("READY")
            os.kill(os.getpid(), signal.SIGHUP)
            await manager.wait_for("RELOADING")
            await manager.wait_for("READY")
            assert len(relay.reloaded) == 1
            os.kill(os.getpid(), signal.SIGTERM)
            stopping = await manager.wait_for("STOPPING")
            assert stopping["STATUS"] == "draining 0 connections"
            assert relay.calls == ["begin_shutdown"]
            os.kill(os.getpid(), signal.SIGHUP)  # no reload while stopping
            os.kill(os.getpid(), signal.SIGTERM)
    assert relay.calls == ["begin_shutdown", "stop_all_sessions"]
    assert len(relay.reloaded) == 1


async def test_a_worker_cuts_its_drain_short_only_when_its_supervisor_says(
    tmp_path, manager, logs_configured
):
    path = write_config(tmp_path / "relay.yaml", 7001)
    relay = StandInRelay(load_config(str(path)))
    worker = AsWorker(slot=0, cut_signal=signal.SIGUSR2, reload_result_field="X")
    reloader = Reloader(RunOptions(config_path=str(path)), relay, manager.notifier, worker)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_until_signalled, relay, manager.notifier, reloader)
            await manager.wait_for("READY")
            os.kill(os.getpid(), signal.SIGTERM)
            await manager.wait_for("STOPPING")
            os.kill(os.getpid(), signal.SIGTERM)  # systemd's and the supervisor's: no cut
            await trio.sleep(0.2)
            assert relay.calls == ["begin_shutdown"]
            os.kill(os.getpid(), signal.SIGUSR2)
    assert relay.calls == ["begin_shutdown", "begin_shutdown", "stop_all_sessions"]
