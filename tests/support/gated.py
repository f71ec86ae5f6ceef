"""Upstreams that hold long transfers open until the test lets them finish.

Tests of reload and drain need transfers that are certainly in flight while they act,
without guessing at speeds: each upstream here names itself first (its tag), and a long
transfer then sends half of a known payload, waits for the test to open the gate, and
sends the rest. The client checks count and sha256, and which upstream served it.

A client says what it wants in its first byte: `S` (short: the tag, then EOF) or `L`
(long: the tag, then the gated payload).
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field

import trio

from tests.support.peers import Handler, Transfer, connect, receive_all, start_server

SHORT = b"S"
LONG = b"L"
TAG_LENGTH = 2
PAYLOAD_SIZE = 8 << 20
_PAYLOAD = random.Random(1313).randbytes(PAYLOAD_SIZE)
PAYLOAD_DIGEST = hashlib.sha256(_PAYLOAD).hexdigest()


def expected_payload() -> Transfer:
    return Transfer(PAYLOAD_SIZE, PAYLOAD_DIGEST)


@dataclass
class GatedUpstreams:
    """Upstream servers on 127.0.0.1, one tag each (`u0`, `u1`, ...), sharing one gate."""

    gate: trio.Event = field(default_factory=trio.Event)
    ports: dict[bytes, int] = field(default_factory=dict)
    # (tag, kind) of every connection each server accepted, with its monotonic time.
    accepted: list[tuple[bytes, bytes, float]] = field(default_factory=list)

    async def start(self, nursery: trio.Nursery, count: int) -> list[int]:
        for index in range(count):
            tag = f"u{index}".encode()
            assert len(tag) == TAG_LENGTH
            self.ports[tag] = await start_server(nursery, self._handler(tag))
        return list(self.ports.values())

    def tag_of(self, port: int) -> bytes:
        (tag,) = (tag for tag, each in self.ports.items() if each == port)
        return tag

    def _handler(self, tag: bytes) -> Handler:
        async def handle(stream: trio.SocketStream) -> None:
            try:
                kind = await stream.receive_some(1)
                self.accepted.append((tag, kind, time.monotonic()))
                await stream.send_all(tag)
                if kind == LONG:
                    half = PAYLOAD_SIZE // 2
                    await stream.send_all(_PAYLOAD[:half])
                    await self.gate.wait()
                    await stream.send_all(_PAYLOAD[half:])
                await stream.send_eof()
                await receive_all(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client's side checks what it got
            finally:
                await stream.aclose()

        return handle


async def read_tag(stream: trio.SocketStream) -> bytes:
    tag = b""
    while len(tag) < TAG_LENGTH:
        data = await stream.receive_some(TAG_LENGTH - len(tag))
        if not data:
            raise AssertionError(f"closed after {tag!r}, before the upstream's tag")
        tag += data
    return tag


async def short_visit(port: int) -> bytes:
    """One short connection through the relay at `port`: which upstream answered."""
    stream = await connect(port)
    async with stream:
        await stream.send_all(SHORT)
        await stream.send_eof()
        tag = await read_tag(stream)
        rest = await receive_all(stream)
        assert rest.count == 0, f"{tag!r} sent {rest.count} bytes after its tag"
        return tag


@dataclass
class LongTransfer:
    """A gated transfer through the relay: its upstream once known, its result once done."""

    tag: bytes = b""
    result: Transfer | None = None
    started: trio.Event = field(default_factory=trio.Event)

    async def run(self, port: int) -> None:
        stream = await connect(port)
        async with stream:
            await stream.send_all(LONG)
            await stream.send_eof()
            self.tag = await read_tag(stream)
            self.started.set()
            self.result = await receive_all(stream)
