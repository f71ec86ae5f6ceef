"""`splicerelay ctl` and `splicerelay reload` against a real `splicerelay run`.

The relay finds its control socket where the operator's tools look for it without being
told (here `$RUNTIME_DIRECTORY/control.sock`: each test has its own, see
tests/conftest.py). `reload` checks the file first, exactly as `check` does, and only
then asks the relay, which answers once the new config is live or refused; its exit code
says which. A relay that is not running, a stale socket file, and a second relay on the
same path each get a clear word.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from tests.support.ctl import ctl_json, ready_fields, reload_count, splicerelay
from tests.support.harness import RelayFactory, free_port, poll_until, relay_config
from tests.support.peers import connect, echo, round_trip, start_server

SECOND_ROUTE = (
    "  - name: second\n"
    "    listen: 127.0.0.1:{listen}\n"
    "    upstreams:\n"
    "      - address: 127.0.0.1:{upstream}\n"
)


def with_second_route(config: str, listen: int, upstream: int) -> str:
    return config + SECOND_ROUTE.format(listen=listen, upstream=upstream)


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on, as a relay killed with SIGKILL leaves behind."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


def test_ctl_show_info_finds_the_relay_through_its_runtime_directory(
    relay_factory: RelayFactory, runtime_directory: Path
) -> None:
    relay = relay_factory.start(relay_config(free_port(), free_port()))
    socket_path = runtime_directory / "control.sock"
    assert ready_fields(relay)["control_socket"] == str(socket_path)
    assert socket_path.stat().st_mode & 0o777 == 0o600

    shown = splicerelay("ctl", "show", "info")
    assert shown.returncode == 0, shown.stderr
    lines = {
        key: value.strip()
        for key, value in (line.split(": ", 1) for line in shown.stdout.splitlines())
    }
    expected = {
        "pid": str(relay.pid),
        "workers": "1",
        "config path": str(relay.config_path),
        "last reload": "none since start",
    }
    assert expected.items() <= lines.items(), shown.stdout

    info = ctl_json("show", "info")
    assert info["pid"] == relay.pid
    assert info["config_path"] == str(relay.config_path)
    assert info["config_sha256"] == hashlib.sha256(relay.config_path.read_bytes()).hexdigest()
    assert info["control_socket"] == str(socket_path)
    assert info["uptime_seconds"] >= 0

    routes = splicerelay("ctl", "show", "routes")
    assert routes.returncode == 0
    assert routes.stdout.splitlines()[0].split()[:3] == ["NAME", "LISTEN", "BALANCE"]


def test_the_socket_file_goes_with_the_relay(
    relay_factory: RelayFactory, runtime_directory: Path
) -> None:
    relay = relay_factory.start(relay_config(free_port(), free_port()))
    assert (runtime_directory / "control.sock").exists()
    assert relay.stop() == 0
    assert not (runtime_directory / "control.sock").exists()


async def test_reload_of_a_good_config_is_live_when_it_returns(
    relay_factory: RelayFactory,
) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        config = relay_config(free_port(), upstream)
        relay = await relay_factory.astart(config)
        second = free_port()
        relay.config_path.write_text(
            with_second_route(relay.config_path.read_text(), second, upstream)
        )
        result = await trio.to_thread.run_sync(
            lambda: splicerelay("reload", "-c", str(relay.config_path))
        )
        assert result.returncode == 0, result.stderr
        # As systemd's ExecReload=: one line on success, nothing else.
        assert result.stdout == "reloaded: the new config is live\n"
        assert result.stderr == ""
        # Live now: no polling for the new route.
        assert await round_trip(second, b"via the new route") == b"via the new route"
        assert relay.metrics().get("splicerelay_config_reloads_total", result="success") == 1
        info = await trio.to_thread.run_sync(lambda: ctl_json("show", "info"))
        assert info["last_reload"]["result"] == "ok"
        assert info["config_sha256"] == hashlib.sha256(relay.config_path.read_bytes()).hexdigest()
        # (The new route's listener is above the fd baseline: stopped here, not checked.)
        assert relay.stop() == 0
        nursery.cancel_scope.cancel()


async def test_reload_of_a_broken_config_says_file_and_line_and_never_asks_the_relay(
    relay_factory: RelayFactory,
) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        listen = free_port()
        relay = await relay_factory.astart(relay_config(listen, upstream))
        good = relay.config_path.read_text()
        broken = good + "    colour: blue\n"
        bad_line = len(broken.splitlines())
        relay.config_path.write_text(broken)

        result = await trio.to_thread.run_sync(
            lambda: splicerelay("reload", "-c", str(relay.config_path))
        )
        checked = await trio.to_thread.run_sync(
            lambda: splicerelay("check", "-c", str(relay.config_path))
        )
        assert result.returncode == 1
        # Exactly what `check` says, then one line on what it means.
        assert result.stderr.startswith(checked.stderr)
        assert re.match(rf"{re.escape(str(relay.config_path))}:{bad_line}: .*colour", result.stderr)
        assert "reload not attempted" in result.stderr
        assert result.stdout == ""
        # The relay was never asked: no reload counted, none logged, the old config on.
        assert reload_count(relay) == 0
        assert "control socket: reload" not in relay.stderr()
        assert await round_trip(listen, b"old config") == b"old config"
        nursery.cancel_scope.cancel()


async def test_reload_refused_by_the_relay_fails_with_its_reason(
    relay_factory: RelayFactory,
) -> None:
    """Valid to `check`, but the relay cannot apply it: the new listen address is taken."""
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        listen = free_port()
        relay = await relay_factory.astart(relay_config(listen, upstream))
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            taken = holder.getsockname()[1]
            relay.config_path.write_text(
                with_second_route(relay.config_path.read_text(), taken, upstream)
            )
            result = await trio.to_thread.run_sync(
                lambda: splicerelay("reload", "-c", str(relay.config_path))
            )
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stdout == ""
        first = result.stderr.splitlines()[0]
        assert first.startswith("reload refused; the running config stays: route second:")
        assert f"127.0.0.1:{taken}" in first and "in use" in first
        assert relay.metrics().get("splicerelay_config_reloads_total", result="failure") == 1
        assert await round_trip(listen, b"old config") == b"old config"
        info = await trio.to_thread.run_sync(lambda: ctl_json("show", "info"))
        assert info["last_reload"]["result"] == "refused"
        assert f"127.0.0.1:{taken}" in info["last_reload"]["error"]
        nursery.cancel_scope.cancel()


def test_ctl_reload_answers_the_same(relay_factory: RelayFactory) -> None:
    relay = relay_factory.start(relay_config(free_port(), free_port()))
    result = splicerelay("ctl", "reload")
    assert (result.returncode, result.stdout) == (0, "reloaded: the new config is live\n")
    relay.config_path.write_text(relay.config_path.read_text() + "    colour: blue\n")
    refused = splicerelay("ctl", "reload")
    assert refused.returncode == 1
    assert "reload refused" in refused.stderr and "colour" in refused.stderr


async def test_ctl_lists_a_live_transfer_and_kills_it_with_a_counted_outcome(
    relay_factory: RelayFactory,
) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        listen = free_port()
        relay = await relay_factory.astart(relay_config(listen, upstream))
        client = await connect(listen)
        await client.send_all(b"x" * 5000)
        received = 0
        while received < 5000:
            received += len(await client.receive_some(65536))

        def connections() -> list[dict[str, object]]:
            rows = ctl_json("show", "connections")
            assert isinstance(rows, list)
            return rows

        [row] = await trio.to_thread.run_sync(connections)
        assert (row["bytes_in"], row["bytes_out"]) == (5000, 5000)
        table = await trio.to_thread.run_sync(lambda: splicerelay("ctl", "show", "connections"))
        assert table.stdout.splitlines()[1].split()[:2] == [str(row["id"]), "test"]

        killed = await trio.to_thread.run_sync(
            lambda: splicerelay("ctl", "kill", "connection", str(row["id"]))
        )
        assert killed.returncode == 0, killed.stderr
        assert killed.stdout.startswith(f"connection {row['id']} (test: ")
        assert " killed after " in killed.stdout
        assert await client.receive_some(65536) == b""  # nothing was in flight: a FIN
        await client.aclose()
        metrics = relay.metrics()
        assert metrics.get("splicerelay_connections_total", outcome="killed") == 1
        again = await trio.to_thread.run_sync(
            lambda: splicerelay("ctl", "kill", "connection", str(row["id"]))
        )
        assert again.returncode == 1
        assert again.stderr.startswith(f"error: no connection {row['id']}")
        nursery.cancel_scope.cancel()


def test_ctl_to_a_relay_that_is_not_running_exits_2_naming_the_path(
    runtime_directory: Path,
) -> None:
    result = splicerelay("ctl", "show", "info")
    assert result.returncode == 2
    expected = runtime_directory / "control.sock"
    assert result.stderr.startswith(
        f"splicerelay ctl: no relay answers at the control socket {expected}"
    )
    assert "is the relay running" in result.stderr

    stale_socket(expected)
    result = splicerelay("ctl", "-s", str(expected), "show", "info")
    assert result.returncode == 2
    assert "Connection refused" in result.stderr

    reload = splicerelay("reload", "-c", "/dev/null", "-s", str(expected))
    assert reload.returncode == 1  # the empty file is not a config: checked first


def test_ctl_as_another_user_is_told_permission_denied(
    relay_factory: RelayFactory, runtime_directory: Path
) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1), to run ctl as another user")
    relay_factory.start(relay_config(free_port(), free_port()))
    path = runtime_directory / "control.sock"
    # The directory is private; open it so that only the socket's own mode stands.
    runtime_directory.chmod(0o711)
    result = splicerelay(
        "ctl",
        "-s",
        str(path),
        "show",
        "info",
        prefix=["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"],
    )
    assert result.returncode == 2
    assert f"permission denied on the control socket {path}" in result.stderr


def test_a_stale_socket_file_is_replaced_at_start(
    relay_factory: RelayFactory, runtime_directory: Path
) -> None:
    path = runtime_directory / "control.sock"
    stale_socket(path)
    relay = relay_factory.start(relay_config(free_port(), free_port()))
    assert ctl_json("show", "info")["pid"] == relay.pid
    assert "warning" not in relay.stderr()


def test_a_second_relay_on_the_same_configured_path_fails_clearly(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    directory = Path(os.environ["RUNTIME_DIRECTORY"]) / "explicit"
    directory.mkdir()
    path = directory / "relay.sock"
    control = f"control: {{socket: {path}}}\n"
    first = relay_factory.start(control + relay_config(free_port(), free_port()))
    second_config = tmp_path / "second.yaml"
    second_config.write_text(
        control + relay_config(free_port(), free_port()).replace("{metrics_port}", str(free_port()))
    )
    second = subprocess.run(
        [sys.executable, "-m", "splicerelay", "run", "-c", str(second_config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 1
    last = second.stderr.strip().splitlines()[-1]
    assert f"the control socket {path} is in use by another running relay" in last
    assert '"level": "error"' in last or " error " in last
    # The first one is untouched and still answers there.
    assert ctl_json("-s", str(path), "show", "info")["pid"] == first.pid


def test_a_configured_path_that_cannot_be_had_is_a_startup_error(tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(
        "control: {socket: /nonexistent-dir/relay.sock}\n"
        + relay_config(free_port(), free_port()).replace("{metrics_port}", str(free_port()))
    )
    result = subprocess.run(
        [sys.executable, "-m", "splicerelay", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "/nonexistent-dir does not exist" in line


def test_a_default_place_that_cannot_be_had_only_costs_the_control_socket(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    """A RUNTIME_DIRECTORY that is not there (or a read-only /run): a warning, and the
    relay serves all the same."""
    missing = tmp_path / "gone"
    relay = relay_factory.start(
        relay_config(free_port(), free_port()), env={"RUNTIME_DIRECTORY": str(missing)}
    )
    warnings = [line for line in relay.stderr().splitlines() if '"level": "warning"' in line]
    assert len(warnings) == 1
    assert "running without a control socket" in warnings[0]
    assert ready_fields(relay)["control_socket"] is None


def test_no_default_place_is_said_in_one_info_line(relay_factory: RelayFactory) -> None:
    """Not root, no $RUNTIME_DIRECTORY, no $XDG_RUNTIME_DIR: no control socket, said once
    (run as nobody when the test runs as root, who always has /run/splicerelay)."""
    prefix: list[str] = []
    config_dir = None
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv(1), to run the relay as another user")
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        config_dir = Path(tempfile.mkdtemp(prefix="splicerelay-"))
        config_dir.chmod(0o755)
    try:
        relay = relay_factory.start(
            relay_config(free_port(), free_port()),
            env={"RUNTIME_DIRECTORY": "", "XDG_RUNTIME_DIR": ""},
            prefix=prefix,
            config_dir=config_dir,
        )
        lines = [line for line in relay.stderr().splitlines() if "control socket" in line]
        assert len(lines) == 1, lines
        assert '"level": "info"' in lines[0]
        assert "no control socket: control.socket is auto" in lines[0]
        assert ready_fields(relay)["control_socket"] is None
        assert relay.stop() == 0
    finally:
        if config_dir is not None:
            shutil.rmtree(config_dir, ignore_errors=True)


def test_sighup_and_the_control_socket_reload_one_at_a_time(relay_factory: RelayFactory) -> None:
    relay = relay_factory.start(relay_config(free_port(), free_port()))
    relay.process.send_signal(signal.SIGHUP)
    result = splicerelay("ctl", "reload")
    assert result.returncode == 0
    poll_until(lambda: reload_count(relay) == 2, 10, "both reloads to be counted", interval=0.05)
