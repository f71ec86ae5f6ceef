"""Helpers for tests of the relay as a service: sd_notify, payload servers, downloads."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

from tests.support.harness import Relay, poll_until
from tests.support.peers import (
    Transfer,
    connect,
    receive_all,
    send_payload,
    start_server,
)


class NotifySocket:
    """A stand-in for the service manager's end of NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def next(self, timeout: float = 10) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        self.messages.append(message)
        return message

    def next_with(self, key: str, timeout: float = 10) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def connect_when_listening(port: int, host: str = "127.0.0.1") -> socket.socket:
    """Connect once the launcher has bound the port (it does so just after starting)."""
    connected: list[socket.socket] = []

    def attempt() -> bool:
        try:
            connected.append(socket.create_connection((host, port), timeout=5))
        except ConnectionRefusedError:
            return False
        return True

    poll_until(attempt, 10, f"{host}:{port} to listen")
    return connected[0]


async def start_payload_server(nursery: trio.Nursery, seed: int, size: int, tag: bytes) -> int:
    """An upstream that says `tag`, then sends `size` bytes and reads to EOF."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(tag)
            await send_payload(stream, seed=seed, total=size)
            await stream.send_eof()
            await receive_all(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # A probe that only checks whether the port still accepts leaves at once;
            # real downloads are checked byte for byte on the client's side.
            pass
        finally:
            await stream.aclose()

    return await start_server(nursery, handler)


async def download(port: int, tag_length: int, pace: float = 0.0) -> tuple[bytes, Transfer]:
    """Read the tag and then the payload; with `pace`, read slowly."""
    stream = await connect(port)
    tag = b""
    while len(tag) < tag_length:
        tag += await stream.receive_some(tag_length - len(tag))
    digest = hashlib.sha256()
    count = 0
    while data := await stream.receive_some(256 << 10):
        digest.update(data)
        count += len(data)
        if pace:
            await trio.sleep(pace)
    await stream.send_eof()
    await stream.aclose()
    return tag, Transfer(count, digest.hexdigest())


@contextlib.asynccontextmanager
async def downloads_in_flight(
    relay: Relay, listen_port: int, transfers: int, pace: float
) -> AsyncIterator[list[tuple[bytes, Transfer]]]:
    """Start `transfers` paced downloads through the relay and wait until it counts them
    all; the body runs while they flow, and the list holds their results on exit."""
    results: list[tuple[bytes, Transfer]] = []

    async def one() -> None:
        results.append(await download(listen_port, 3, pace=pace))

    async with trio.open_nursery() as clients:
        for _ in range(transfers):
            clients.start_soon(one)

        def all_flowing() -> bool:
            return relay.metrics().get("splicerelay_connections_active") == transfers

        await trio.to_thread.run_sync(poll_until, all_flowing, 10, "transfers in flight")
        yield results


async def sigterm_during_downloads(
    relay: Relay,
    listen_port: int,
    transfers: int,
    while_draining: Callable[[], None] = lambda: None,
) -> list[tuple[bytes, Transfer]]:
    """Start `transfers` slow downloads, send SIGTERM while they flow, and return their
    results; asserts that new clients are refused while the relay still runs, and calls
    `while_draining` (more checks) before the downloads end."""
    async with downloads_in_flight(relay, listen_port, transfers, pace=0.01) as results:
        relay.process.send_signal(signal.SIGTERM)

        def refusing() -> bool:
            return not can_connect(listen_port)

        await trio.to_thread.run_sync(poll_until, refusing, 5, "new connections to be refused")
        assert relay.process.poll() is None, "the relay must wait for the transfers"
        while_draining()
    return results
