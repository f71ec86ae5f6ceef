"""Peeking at a client's TLS ClientHello without reading it.

A listener that routes by SNI must see the ClientHello before it knows the route, but
the hello is the first part of the TLS stream the upstream must get. C proxies read it
into a buffer and copy it on; here it is looked at with MSG_PEEK and left in the socket,
so that every byte of the connection, the hello included, is spliced like any other
(`path="copy"` stays 0).

Why waiting for the rest needs care: readiness is level-triggered, and a socket that
holds part of a hello is readable, so waiting for "readable" again would return at once
for the same bytes, a busy loop, since a peek consumes nothing. The PROXY header reader
consumes what it has seen instead; here nothing may be consumed. So before waiting, the
socket's SO_RCVLOWAT is set to the bytes the parser still needs: TCP's poll then reports
the socket readable only once that many bytes are queued (or on EOF or an error), and a
client that trickles its hello wakes the relay once, when it is whole. SO_RCVLOWAT is put
back to 1 before the socket goes to the data path, which needs every byte's readiness.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import select
import socket

import trio

from splicerelay.protocol.outcome import InspectFailure
from splicerelay.protocol.tls_hello import (
    ClientHello,
    Malformed,
    NeedMore,
    NotTls,
    TooLarge,
    parse_client_hello,
)

# Why a pause where readiness brought no new byte and no EOF: TCP's poll also reports a
# socket readable below SO_RCVLOWAT under receive-memory pressure or when its receive
# window has shrunk to one segment. Looking again at once could spin for as long as that
# lasts; a short sleep bounds the looks to a few dozen a second, within the inspect timeout.
NO_PROGRESS_PAUSE_SECONDS = 0.02


class InspectFailed(Exception):
    """No valid ClientHello came: `reason` says why, `detail` says it for people."""

    def __init__(self, reason: InspectFailure, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def peek_at_once(sock: _socket.socket, max_size: int) -> ClientHello | None:
    """The ClientHello if it is all in the socket already (left unread), else None:
    one look, without waiting. Raises InspectFailed when the bytes there already show
    there will be no valid hello, OSError when the connection failed."""
    try:
        data = sock.recv(max_size, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    if not data:
        raise InspectFailed(InspectFailure.TRUNCATED, "the client closed before sending a byte")
    result = parse_client_hello(data, max_size)
    if isinstance(result, ClientHello):
        return result
    if isinstance(result, NeedMore):
        return None
    raise _failure(result)


async def peek_client_hello(sock: _socket.socket, timeout: float, max_size: int) -> ClientHello:
    """The ClientHello at the head of `sock`'s stream, left unread in the socket.

    Raises InspectFailed, or OSError when the connection fails (a reset) meanwhile.
    """
    buffer = memoryview(bytearray(max_size))
    seen = 0  # bytes the last look saw
    low_water = 1
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    count = sock.recv_into(buffer, max_size, socket.MSG_PEEK)
                except BlockingIOError:
                    count = seen  # nothing queued: the first look, before any byte
                else:
                    if not count:
                        raise InspectFailed(
                            InspectFailure.TRUNCATED, "the client closed before sending a byte"
                        )
                    result = parse_client_hello(buffer[:count], max_size)
                    if isinstance(result, ClientHello):
                        return result
                    if not isinstance(result, NeedMore):
                        raise _failure(result)
                    if count == seen and await _peer_finished(sock):
                        raise InspectFailed(
                            InspectFailure.TRUNCATED,
                            f"the client closed after {count} bytes of its ClientHello",
                        )
                    if result.needed != low_water:
                        low_water = result.needed
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
                seen = count
                await trio.lowlevel.wait_readable(sock)
    except trio.TooSlowError:
        raise InspectFailed(
            InspectFailure.TIMEOUT, f"no complete ClientHello within {timeout:g}s"
        ) from None
    finally:
        if low_water != 1:
            # (An error means the connection is gone; whoever goes on finds out.)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


async def _peer_finished(sock: _socket.socket) -> bool:
    """Whether the client has shut down its side, asked after a wake with no new byte.

    Why poll(POLLRDHUP): a peek shows the bytes queued but not the FIN behind them, and
    a FIN makes the socket readable whatever SO_RCVLOWAT says. Without a FIN (see
    NO_PROGRESS_PAUSE_SECONDS) this pauses before the next look instead.
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    for _fd, events in poller.poll(0):
        if events & select.POLLERR:
            # A reset: the peek still shows the bytes queued before it, so the error
            # is only in SO_ERROR (reading it clears it).
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
        return True
    await trio.sleep(NO_PROGRESS_PAUSE_SECONDS)
    return False


def _failure(result: NotTls | Malformed | TooLarge) -> InspectFailed:
    if isinstance(result, NotTls):
        return InspectFailed(InspectFailure.NOT_TLS, f"not a TLS ClientHello: {result.reason}")
    if isinstance(result, TooLarge):
        return InspectFailed(
            InspectFailure.TOO_LARGE,
            f"the ClientHello would take {result.needed} bytes, over tls_max_client_hello",
        )
    return InspectFailed(InspectFailure.MALFORMED, f"malformed ClientHello: {result.reason}")
