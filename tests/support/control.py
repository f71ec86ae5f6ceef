"""Helpers for the control socket's tests: a short socket directory, a recording handler,
raw clients that read what the server sends until it closes, and a server process.

Run as a program (`python -m tests.support.control PATH RECORD`), it serves a control
socket at PATH whose handler appends each command it runs to the file RECORD, for tests
that need the server in a process of its own (another uid, say).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from splicerelay.protocol.control import Command, Reply, decode_reply, format_command

# Bound on every wait in these tests, in seconds of trio's clock (real or mock).
WAIT = 10.0


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A new directory with a short path: a unix socket path must fit in 108 bytes,
    which pytest's tmp_path with a long test name does not always."""
    path = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Recorder:
    """A handler that records the commands it runs and answers each with its line."""

    def __init__(self) -> None:
        self.commands: list[Command] = []

    async def __call__(self, command: Command) -> object:
        self.commands.append(command)
        return {"ran": format_command(command)}


async def read_replies(stream: trio.abc.ReceiveStream, within: float = WAIT) -> list[Reply]:
    """Every reply line until the server closes (EOF or reset), within a bound."""
    return [decode_reply(line) for line in (await read_all(stream, within)).splitlines()]


async def read_all(stream: trio.abc.ReceiveStream, within: float = WAIT) -> bytes:
    """Every byte until the server closes; a reset after the data counts as a close
    (a unix socket closed with unread input resets its peer after the queued bytes)."""
    received = bytearray()
    with trio.fail_after(within):
        try:
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass
    return bytes(received)


async def read_reply(stream: trio.abc.ReceiveStream, within: float = WAIT) -> Reply:
    """The next reply line (the stream is read one byte at a time past it: never)."""
    line = bytearray()
    with trio.fail_after(within):
        while not line.endswith(b"\n"):
            data = await stream.receive_some(1)
            if not data:
                raise AssertionError(f"closed after {bytes(line)!r}, before a whole reply")
            line += data
    return decode_reply(bytes(line))


def ask_raw(path: str, data: bytes, timeout: float = WAIT) -> bytes:
    """Blocking: connect, send `data` (even if the server closed already), return every
    byte the server sends until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        return bytes(received)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll `condition` with a bound (blocking)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


async def main(path: str, record: str) -> None:
    """Serve until SIGTERM or SIGINT, then remove the socket file and return."""
    import signal

    from splicerelay.relay.control_socket import serve_control_socket

    async def handler(command: Command) -> object:
        with open(record, "a") as out:
            out.write(format_command(command) + "\n")
        return {"uid": os.geteuid()}

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control_socket, path, handler)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
