"""The command line as users run it: check, run, --version and signals."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from splicerelay import __version__
from tests.support.harness import free_port, poll_until
from tests.support.peers import connect, receive_all, start_server

VALID = """\
routes:
  - name: web
    listen: 127.0.0.1:18080
    upstreams:
      - address: 127.0.0.1:18000
"""

# Each bad config, and the line its error must point at.
BAD_CONFIGS = {
    "unknown key": (VALID + "    colour: blue\n", 6),
    "bad duration": (VALID + "    connect_timeout: 5 seconds\n", 6),
    "bad address": (VALID.replace("127.0.0.1:18000", "127.0.0.1"), 5),
    "duplicate route name": (
        VALID + "  - name: web\n    listen: 127.0.0.1:18081\n"
        "    upstreams:\n      - address: 127.0.0.1:1\n",
        6,
    ),
    "missing upstreams": ("routes:\n  - name: web\n    listen: 127.0.0.1:18080\n", 2),
    "not yaml": ("routes:\n  - name: [web\n", 3),
}


def splicerelay(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splicerelay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_config_gives_one_line_with_file_and_line_and_exit_1(
    tmp_path: Path, case: str, command: str
):
    text, line = BAD_CONFIGS[case]
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    result = splicerelay(command, "-c", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(rf"^{re.escape(str(path))}:{line}: \S", lines[0]), lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_check_prints_effective_config_with_defaults(tmp_path: Path):
    path = tmp_path / "relay.yaml"
    path.write_text(VALID)
    result = splicerelay("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "connect_timeout: 5s" in result.stdout
    assert "pipe_size: 1MiB" in result.stdout
    # The printed config is itself a valid config.
    again = tmp_path / "effective.yaml"
    again.write_text(result.stdout)
    assert splicerelay("check", "-c", str(again)).stdout == result.stdout


def test_missing_config_file_is_a_clean_error(tmp_path: Path):
    result = splicerelay("check", "-c", str(tmp_path / "absent.yaml"))
    assert result.returncode == 1
    assert str(tmp_path / "absent.yaml") in result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = splicerelay("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"splicerelay {__version__}"


def test_listen_already_in_use_is_a_clean_error(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = splicerelay("run", "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:9")
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_one_off_relay_from_flags_relays_and_stops_cleanly_on(signum: int, tmp_path: Path):
    async def upstream(stream: trio.SocketStream) -> None:
        data = await receive_all(stream)
        await stream.send_all(b"got %d" % data.count)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, upstream)
        listen_port = free_port()
        stderr_path = tmp_path / "err"
        command = [sys.executable, "-m", "splicerelay", "run"]
        command += [
            "--listen",
            f"127.0.0.1:{listen_port}",
            "--upstream",
            f"127.0.0.1:{upstream_port}",
        ]
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            await trio.to_thread.run_sync(
                poll_until, lambda: b'"ready"' in stderr_path.read_bytes(), 15, "ready"
            )
            stream = await connect(listen_port)
            await stream.send_all(b"x" * 100_000)
            await stream.send_eof()
            reply = await stream.receive_some(100)
            await stream.aclose()
            assert reply == b"got 100000"
            process.send_signal(signum)
            code = await trio.to_thread.run_sync(lambda: process.wait(timeout=15))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        nursery.cancel_scope.cancel()
    assert code == 0, stderr_path.read_text()
    assert "Traceback" not in stderr_path.read_text()


EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "relay.yaml"


def test_example_config_is_valid():
    result = splicerelay("check", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr


def test_example_config_runs_as_it_is(tmp_path: Path):
    """The shipped example starts and stops cleanly (on free ports instead of its own)."""
    text = EXAMPLE.read_text()
    assert "127.0.0.1:8080" in text and "127.0.0.1:9109" in text
    listen_port, metrics_port = free_port(), free_port()
    config = tmp_path / "relay.yaml"
    config.write_text(
        text.replace("127.0.0.1:8080", f"127.0.0.1:{listen_port}").replace(
            "127.0.0.1:9109", f"127.0.0.1:{metrics_port}"
        )
    )
    stderr_path = tmp_path / "err"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "splicerelay", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        poll_until(lambda: b'"ready"' in stderr_path.read_bytes(), 15, "ready")
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
            assert b'splicerelay_connections_active{route="web"} 0.0' in reply.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
