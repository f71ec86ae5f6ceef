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
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    ProxyHeader,
    ProxyHeaderError,
    decode,
    encode_v1,
    encode_v2,
    v2_length,
)

Endpoint = tuple[str, int]


class ProxyHeaderRejected(Exception):
    """The client's PROXY header was invalid, too long, incomplete in time, or missing."""


async def receive_proxy_header(
    sock: _socket.socket, timeout: float, max_length: int = MAX_V2_LENGTH
) -> ProxyHeader:
    """Read exactly one PROXY header from `sock`, leaving the stream after it unread.

    Why peek: only the header's own bytes may be consumed, so that the payload after it
    stays in the socket for splice. The first look is at most MAX_V1_LENGTH bytes, which
    holds any v1 line and the 16 fixed bytes of v2, whose length field then says exactly
    how far the header goes; a v2 header longer than `max_length` is refused there,
    without its rest being read. Once a complete header is in view, one recv() takes
    exactly its bytes. While the header is incomplete, every byte available is part of
    it, so those bytes are consumed (else readiness would fire again at once for the
    same bytes, a busy loop), and the next look starts after them. The bytes land in
    one buffer, sized once the header's length is known: nothing is rebuilt per look.
    """
    view = memoryview(bytearray(MAX_V1_LENGTH))
    taken = 0  # header bytes consumed so far, at the start of `view`
    limit = MAX_V1_LENGTH  # how far the header may reach, as far as is known
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    count = sock.recv_into(view[taken:limit], limit - taken, socket.MSG_PEEK)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if not count:
                    raise ProxyHeaderRejected("connection closed before a complete PROXY header")
                seen = taken + count
                result = decode(view[:seen], max_length=max_length)
                if result is not None:
                    header, length = result
                    await _consume(sock, view[taken:length])
                    return header
                # Incomplete: `seen` < `limit`, and every byte seen is the header's.
                total = v2_length(view[:seen])
                if total is not None and total != limit:
                    # Now known exactly (and within max_length, or decode had refused).
                    looked_up_to, limit = limit, total
                    if limit > len(view):
                        grown = memoryview(bytearray(limit))
                        grown[:taken] = view[:taken]
                        view = grown
                    if seen == looked_up_to < limit:
                        continue  # the rest may be waiting already: look again, further
                await _consume(sock, view[taken:seen])
                taken = seen
    except trio.TooSlowError:
        raise ProxyHeaderRejected(f"no complete PROXY header within {timeout:g}s") from None
    except ProxyHeaderError as error:
        raise ProxyHeaderRejected(str(error)) from None
    except OSError as error:
        raise ProxyHeaderRejected(
            f"connection failed while reading the PROXY header: {error}"
        ) from None


async def _consume(sock: _socket.socket, into: memoryview) -> None:
    """Take the bytes that an earlier peek showed are there, into `into` (same bytes)."""
    while into:
        try:
            count = sock.recv_into(into)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not count:  # (the peek saw them: only a kernel surprise gets here)
            raise ProxyHeaderRejected("connection closed inside the PROXY header")
        into = into[count:]


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
