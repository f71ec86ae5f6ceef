"""Loopback peers for data-path tests: payload streams with sha256 on both ends."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

CHUNK = 256 << 10


@dataclass
class Transfer:
    """What one end saw: how many bytes and their sha256."""

    count: int
    digest: str


def payload_chunks(seed: int, total: int, chunk: int = CHUNK) -> list[int]:
    """Chunk sizes summing to `total`, varied so boundaries never line up by luck."""
    rng = random.Random(seed)
    sizes = []
    left = total
    while left:
        size = min(left, rng.randint(1, chunk))
        sizes.append(size)
        left -= size
    return sizes


def block_size(total: int) -> int:
    """Random bytes to draw slices from: up to 4 MiB, never less than one chunk."""
    return min(4 << 20, max(total, CHUNK))


async def send_payload(stream: trio.abc.SendStream, seed: int, total: int) -> Transfer:
    """Send `total` pseudo-random bytes (from `seed`); return their count and sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    block = rng.randbytes(block_size(total))
    sent = 0
    for size in payload_chunks(seed, total):
        start = rng.randrange(0, len(block) - size + 1)
        piece = block[start : start + size]
        digest.update(piece)
        await stream.send_all(piece)
        sent += size
    return Transfer(sent, digest.hexdigest())


async def receive_all(stream: trio.abc.ReceiveStream, chunk: int = CHUNK) -> Transfer:
    """Read to EOF; return the count and sha256 of what arrived."""
    digest = hashlib.sha256()
    count = 0
    while True:
        data = await stream.receive_some(chunk)
        if not data:
            return Transfer(count, digest.hexdigest())
        digest.update(data)
        count += len(data)


def expected_transfer(seed: int, total: int) -> Transfer:
    """What `send_payload(seed, total)` sends, computed without a socket."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    block = rng.randbytes(block_size(total))
    for size in payload_chunks(seed, total):
        start = rng.randrange(0, len(block) - size + 1)
        digest.update(block[start : start + size])
    return Transfer(total, digest.hexdigest())


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def start_server(nursery: trio.Nursery, handler: Handler) -> int:
    """Serve `handler` on 127.0.0.1 (a free port); return the port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def connect(port: int, host: str = "127.0.0.1") -> trio.SocketStream:
    return await trio.open_tcp_stream(host, port)


def reset(stream: trio.SocketStream) -> None:
    """Close with RST: SO_LINGER with a zero timeout discards unsent data."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


def blackholed_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A port that never answers SYNs: listen(0) with its queue already full.

    Linux drops SYNs for a listener whose accept queue is full, so connects to it hang
    until their own timeout, like a firewalled host, without leaving loopback.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    return listener, fillers


def close_blackhole(listener: socket.socket, fillers: list[socket.socket]) -> None:
    for filler in fillers:
        filler.close()
    listener.close()


async def echo(stream: trio.SocketStream) -> None:
    # A reset is a legitimate end here: the relay aborts both sides of a connection it
    # ends early (max_duration, kill), and the server task must not fail the test.
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def round_trip(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    stream = await connect(port, host)
    try:
        await stream.send_all(payload)
        await stream.send_eof()
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
        return reply
    finally:
        await stream.aclose()
