"""Helpers for the access-log tests: relays whose stdout is a pipe, crowds of clients,
and readers of what the relay wrote.

The access log is written after each reactor round, in batches, without blocking; what
the output does not take waits in a bounded buffer (splicerelay/ops/access_output.py).
To see lines that wait there, a test gives the relay a pipe as its stdout and reads it
only when it chooses: a regular file takes every write at once and would hide them.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.support.harness import (
    STARTUP_TIMEOUT,
    Relay,
    RelayFactory,
    free_port,
    poll_until,
)

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
WAIT = 10.0  # bound on every wait for the relay to show a state
FIELDS = (
    "time",
    "level",
    "message",
    "route",
    "client",
    "upstream",
    "bytes_in",
    "bytes_out",
    "duration_seconds",
    "outcome",
)


def access_config(
    listen_port: int,
    upstream_port: int,
    *,
    route: str = "test",
    format: str = "json",
    workers: int | None = None,
    extra: str = "",
) -> str:
    """A one-route config with the access log on, `{metrics_port}` left to the harness."""
    return (
        (f"workers: {workers}\n" if workers is not None else "") + "metrics:\n"
        "  listen: 127.0.0.1:{metrics_port}\n"
        f"log: {{level: info, format: {format}, access_log: true}}\n"
        "shutdown_timeout: 5s\n"
        "routes:\n"
        f"  - name: {route}\n"
        f"    listen: 127.0.0.1:{listen_port}\n"
        "    upstreams:\n"
        f"      - address: 127.0.0.1:{upstream_port}\n"
        f"{extra}"
    )


class StdoutPipe:
    """A pipe (or, with `stream_socket`, a unix stream socket such as journald's) to be a
    relay's stdout. The test holds the read end and reads only from `start_reading` on;
    until then the relay's writes fill it and stop.

    `size`: how much it holds, about (a pipe's F_SETPIPE_SZ; a socket's SO_SNDBUF, which
    the kernel doubles), e.g. one page, so that a few lines fill it and the rest wait in
    the relay.
    """

    def __init__(self, size: int | None = None, stream_socket: bool = False) -> None:
        if stream_socket:
            near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            if size is not None:
                far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            self.read_fd, self.write_fd = near.detach(), far.detach()
        else:
            self.read_fd, self.write_fd = os.pipe()
            if size is not None:
                fcntl.fcntl(self.write_fd, F_SETPIPE_SZ, size)
        self._data = bytearray()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def handed_over(self) -> None:
        """The relay has its copy of the write end: ours would keep EOF from ever coming."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def start_reading(self, slowly: bool = False) -> None:
        """Read to EOF in a thread of its own, which then closes the read end.

        `slowly`: a reader that falls behind (a busy journald), taking a KiB at a time
        with a pause between, so that the writer keeps finding its output full.
        """
        assert self._thread is None, "already reading"
        self._thread = threading.Thread(target=self._read, args=(self.read_fd, slowly), daemon=True)
        self.read_fd = -1  # the thread's now
        self._thread.start()

    def _read(self, fd: int, slowly: bool) -> None:
        try:
            while chunk := os.read(fd, 1024 if slowly else 1 << 16):
                with self._lock:
                    self._data += chunk
                if slowly:
                    time.sleep(0.0005)
        finally:
            os.close(fd)

    def unread(self) -> int:
        """Bytes written and not read yet (before `start_reading`)."""
        return int.from_bytes(
            fcntl.ioctl(self.read_fd, termios.FIONREAD, b"\0" * 4), sys.byteorder, signed=True
        )

    @property
    def data(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    def wait_eof(self, timeout: float = WAIT) -> bytes:
        """Everything written, once every writer has closed its end."""
        assert self._thread is not None, "not reading"
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the relay's stdout did not end"
        return self.data

    def close(self) -> None:
        """Our ends; a reading thread closes its own at EOF."""
        self.handed_over()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1


def start_relay(
    factory: RelayFactory, config_text: str, stdout: StdoutPipe, env: dict[str, str] | None = None
) -> Relay:
    """`splicerelay run -c` on `config_text` as RelayFactory.start does, with its stdout on
    `stdout`'s pipe (stderr still goes to a file). The factory stops it after the test.

    The Relay's `stdout_path` names no file: its stdout is read from the pipe.
    """
    index = len(factory.relays)
    metrics_port = free_port()
    config_path = factory.tmp_path / f"relay{index}.yaml"
    config_path.write_text(config_text.replace("{metrics_port}", str(metrics_port)))
    stderr_path = factory.tmp_path / f"relay{index}.err"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "splicerelay", "run", "-c", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=stdout.write_fd,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
    stdout.handed_over()
    relay = Relay(process, config_path, metrics_port, Path("/nonexistent/stdout"), stderr_path)
    factory.relays.append(relay)
    wait_ready(relay)
    relay.baseline_fds = relay.fds() - 2 * int(
        relay.metrics().get("splicerelay_pipes", state="idle")
    )
    return relay


def wait_ready(relay: Relay) -> None:
    def ready() -> bool:
        if relay.process.poll() is not None:
            raise AssertionError(f"relay exited with {relay.process.returncode}: {relay.stderr()}")
        log = relay.stderr()
        return '"message": "ready"' in log or " info ready " in log

    poll_until(ready, STARTUP_TIMEOUT, "the relay to log that it is ready")


# ----- clients ------------------------------------------------------------------------


async def exchange(port: int, payload: bytes) -> int:
    """One connection through the relay to an echo upstream: send `payload`, half-close,
    read the echo to EOF. Returns the client's own port."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        own = int(stream.socket.getsockname()[1])
        await stream.send_all(payload)
        await stream.send_eof()
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
        assert reply == payload, f"echo through the relay gave {reply!r}"
        return own
    finally:
        await stream.aclose()


async def crowd(port: int, count: int, parallel: int = 16, payload: bytes = b"hello") -> list[int]:
    """`count` exchanges, `parallel` at a time; the clients' ports."""
    ports: list[int] = []
    remaining = iter(range(count))

    async def client_loop() -> None:
        for _ in remaining:
            ports.append(await exchange(port, payload))

    async with trio.open_nursery() as nursery:
        for _ in range(min(parallel, count)):
            nursery.start_soon(client_loop)
    return ports


# ----- what the relay wrote -----------------------------------------------------------


def whole_lines(data: bytes) -> list[str]:
    """Lines of `data`, which must end with a newline (no line cut short)."""
    text = data.decode()
    assert not text or text.endswith("\n"), f"a partial last line: {text[-200:]!r}"
    return text.splitlines()


def json_entries(lines: list[str]) -> list[dict[str, Any]]:
    """Access lines as JSON objects; every line must be one."""
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise AssertionError(f"not a JSON line ({error}): {line!r}") from None
        assert isinstance(entry, dict) and entry.get("message") == "connection", line
        entries.append(entry)
    return entries


def port_of(client: str) -> int:
    return int(client.rsplit(":", 1)[1])


def ports_logged(entries: list[dict[str, Any]]) -> Counter[int]:
    """How many lines name each client port."""
    return Counter(port_of(str(entry["client"])) for entry in entries)


def stderr_entries(relay: Relay) -> list[dict[str, Any]]:
    """The relay's JSON diagnostics on stderr."""
    return [json.loads(line) for line in relay.stderr().splitlines() if line.startswith("{")]


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """`poll_until` for trio tests: polls without blocking the test's own peers."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def exit_code(relay: Relay, timeout: float = 30.0) -> int:
    """Wait for the relay to exit, letting the test's peers serve meanwhile."""
    return await trio.to_thread.run_sync(lambda: relay.process.wait(timeout=timeout))
