"""What happens on a connection before the flows start: PROXY protocol headers.

A client behind another proxy may start with a PROXY header that names the real client;
an upstream may want one from us. Both are a few dozen bytes, read and written in user
space; everything after the header is left in the kernel for the flows to splice.
"""

from __future__ import annotations

import _socket
import socket

import trio

from splicerelay.protocol.proxy_protocol import (
    ProxyHeader,
    ProxyHeaderError,
    decode,
    encode_v1,
    encode_v2,
)

# Enough for any v1 header (107 bytes) and a v2 header with a few TLVs; a longer v2
# header is read in further rounds.
PEEK_SIZE = 536

Endpoint = tuple[str, int]


class ProxyHeaderRejected(Exception):
    """The client's PROXY header was invalid, incomplete in time, or missing."""


async def receive_proxy_header(sock: _socket.socket, timeout: float) -> ProxyHeader:
    """Read exactly one PROXY header from `sock`, leaving the stream after it unread.

    Why peek: only the header's own bytes may be consumed, so that the payload after it
    stays in the socket for splice. While the header is incomplete, every byte available
    is part of it, so those bytes are consumed (else readiness would fire again at once
    for the same bytes, a busy loop) and the rest is peeked for again once more arrive.
    """
    received = bytearray()
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    peeked = sock.recv(PEEK_SIZE, socket.MSG_PEEK)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if not peeked:
                    raise ProxyHeaderRejected("connection closed before a complete PROXY header")
                result = decode(bytes(received) + peeked)
                if result is not None:
                    header, length = result
                    await _consume(sock, length - len(received))
                    return header
                await _consume(sock, len(peeked))
                received += peeked
    except trio.TooSlowError:
        raise ProxyHeaderRejected(f"no complete PROXY header within {timeout:g}s") from None
    except ProxyHeaderError as error:
        raise ProxyHeaderRejected(str(error)) from None
    except OSError as error:
        raise ProxyHeaderRejected(
            f"connection failed while reading the PROXY header: {error}"
        ) from None


async def _consume(sock: _socket.socket, count: int) -> None:
    """Take `count` bytes that an earlier peek showed are there."""
    while count:
        try:
            count -= len(sock.recv(count))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


def build_proxy_header(
    version: str, source: Endpoint | None, destination: Endpoint | None
) -> bytes:
    """The header to send upstream; without addresses (a unix client) it says so."""
    if source is not None and destination is not None:
        try:
            if version == "v1":
                return encode_v1(source, destination)
            return encode_v2(source, destination)
        except ValueError:
            pass  # an IPv4 source with an IPv6 destination cannot be expressed
    return encode_v1(None, None) if version == "v1" else encode_v2(None, None, local=True)


async def send_all(sock: _socket.socket, data: bytes) -> None:
    """Write all of `data` to a non-blocking socket (a handful of bytes, once)."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]
