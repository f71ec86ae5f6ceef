"""The control socket's owner check, between real processes of different uids.

The server is `python -m tests.support.control` (serve_control_socket with a handler that
records each command it runs in a file); clients run under `setpriv` as another uid. To
show that SO_PEERCRED refuses a peer by itself, the tests open the socket file to
everyone (chmod 0666) after it was made: the kernel's file check then lets the other uid
connect, and only the relay's check stands between it and the commands.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.control import socket_dir, wait_for

REPO = Path(__file__).resolve().parents[2]
NOBODY = (65534, 65534)  # nobody:nogroup
STRANGER = (65533, 65533)  # a uid with no name, neither the server's nor root

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to run processes as other uids",
)

# A client run as another uid: the blocking client of splicerelay, or raw bytes.
CLIENT = """
import json, sys
from splicerelay.relay.control_client import ControlClientError, send_command
from tests.support.control import ask_raw
path, how, line = sys.argv[1:4]
if how == "raw":
    print(json.dumps({"raw": ask_raw(path, line.encode()).decode()}))
    sys.exit()
try:
    reply = send_command(path, line, 10)
except ControlClientError as error:
    print(json.dumps({"client_error": type(error).__name__, "message": str(error)}))
else:
    print(json.dumps({"ok": reply.ok, "data": reply.data, "error": reply.error}))
"""


def as_uid(ids: tuple[int, int], *argv: str) -> list[str]:
    uid, gid = ids
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


def client(path: Path, line: str, ids: tuple[int, int] | None, how: str = "client") -> dict:
    argv = [sys.executable, "-c", CLIENT, str(path), how, line]
    done = subprocess.run(
        as_uid(ids, *argv) if ids else argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    socket: Path
    record: Path
    log: Path

    def commands(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


def start_server(directory: Path, ids: tuple[int, int] | None) -> Server:
    path, record, log = directory / "control.sock", directory / "record", directory / "log"
    argv = [sys.executable, "-m", "tests.support.control", str(path), str(record)]
    with open(log, "wb") as err:
        process = subprocess.Popen(as_uid(ids, *argv) if ids else argv, cwd=REPO, stderr=err)
    server = Server(process, path, record, log)
    try:
        wait_for(lambda: path.exists() or process.poll() is not None, "the control socket")
        assert process.poll() is None, log.read_text()
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    return server


@pytest.fixture
def directory() -> Iterator[Path]:
    with socket_dir() as path:
        path.chmod(0o755)  # mkdtemp makes it 0700: let the other uids reach the socket
        yield path


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


def test_another_uid_is_refused_before_any_command_is_read(
    directory: Path, servers: list[Server]
) -> None:
    server = start_server(directory, None)  # as root
    servers.append(server)
    assert stat.S_IMODE(server.socket.lstat().st_mode) == 0o600

    # With the file's mode as made, the kernel refuses the other uid's connect.
    denied = client(server.socket, "show info", NOBODY)
    assert denied["client_error"] == "ControlPermissionDenied"
    assert "run this as the relay's user or as root" in denied["message"]

    # Opened to everyone, the file lets it connect; SO_PEERCRED refuses it.
    server.socket.chmod(0o666)
    raw = client(server.socket, "reload\nkill connection 1\n", NOBODY, how="raw")
    expected = "permission denied: uid 65534 may not use this control socket"
    assert raw == {
        "raw": json.dumps({"ok": False, "error": expected}, separators=(",", ":")) + "\n"
    }
    assert client(server.socket, "reload", NOBODY) == {"ok": False, "data": None, "error": expected}
    assert server.commands() == []  # nothing it sent was run

    # Root passes, and its command runs.
    assert client(server.socket, "show info", None) == {
        "ok": True,
        "data": {"uid": 0},
        "error": None,
    }
    assert server.commands() == ["show info"]

    assert server.stop() == 0
    assert not server.socket.exists()  # removed at exit
    assert "refused a connection from uid 65534" in server.log.read_text()


def test_the_relays_own_uid_and_root_pass_and_others_do_not(
    directory: Path, servers: list[Server]
) -> None:
    os.chown(directory, *NOBODY)  # the server runs as nobody and binds in here
    server = start_server(directory, NOBODY)
    servers.append(server)
    found = server.socket.lstat()
    assert (found.st_uid, stat.S_IMODE(found.st_mode)) == (NOBODY[0], 0o600)

    assert client(server.socket, "show routes", NOBODY) == {
        "ok": True,
        "data": {"uid": NOBODY[0]},
        "error": None,
    }
    assert client(server.socket, "show info", None)["ok"] is True  # root
    server.socket.chmod(0o666)
    stranger = client(server.socket, "reload", STRANGER)
    assert stranger["error"] == "permission denied: uid 65533 may not use this control socket"
    assert server.commands() == ["show routes", "show info"]
    assert server.stop() == 0
    assert not server.socket.exists()
