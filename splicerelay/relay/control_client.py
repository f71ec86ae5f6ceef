"""Clients of the control socket: one command, one reply, within a deadline.

`send_command` blocks (for `splicerelay ctl` and `splicerelay reload`);
`send_command_async` is the same on trio (for a supervisor asking its workers). Both
connect, send one line, read one reply line and close. What went wrong on the way is
said for a person: no socket (is the relay running?), permission denied, no reply in
time. A reply with `ok` false is a Reply, not an exception: the relay answered.
"""

from __future__ import annotations

import contextlib
import errno
import math
import socket
import time

import trio

from splicerelay.protocol.control import (
    MAX_LINE_LENGTH,
    MAX_REPLY_LENGTH,
    Command,
    Reply,
    ReplyError,
    decode_reply,
    format_command,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ControlClientError",
    "ControlNotRunning",
    "ControlPermissionDenied",
    "ControlTimeout",
    "command_line",
    "send_command",
    "send_command_async",
]

# Long enough for a reload of a big config; a `show` answers at once.
DEFAULT_TIMEOUT = 30.0
_RECEIVE_SIZE = 64 << 10


class ControlClientError(Exception):
    """No reply could be had from the control socket."""


class ControlNotRunning(ControlClientError):
    """Nothing listens at the path: no socket file, or nobody answers on it."""


class ControlPermissionDenied(ControlClientError):
    """The socket file is not ours to connect to."""


class ControlTimeout(ControlClientError):
    """No reply within the deadline."""


def command_line(command: str | Command) -> bytes:
    """The line to send for `command` (text as typed, or a Command), with its "\\n".

    Raises ValueError for text that holds a line break or is too long to be a line; the
    relay judges everything else and answers with an error."""
    text = command if isinstance(command, str) else format_command(command)
    if "\n" in text or "\r" in text:
        raise ValueError("one command per line: the command holds a line break")
    line = text.encode("utf-8", "surrogateescape") + b"\n"
    if len(line) > MAX_LINE_LENGTH:
        raise ValueError(f"the command is longer than {MAX_LINE_LENGTH} bytes")
    return line


def send_command(path: str, command: str | Command, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Send one command to the control socket at `path`; block until its reply.

    `timeout` bounds everything: connect, send and the whole reply."""
    line = command_line(command)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(_left(deadline, path, timeout))
            sock.connect(path)
            sock.settimeout(_left(deadline, path, timeout))
            # Why read on after a failed send: the relay may have answered and closed
            # before reading (a refused uid, a busy relay); its reply waits in our
            # receive queue.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(line, socket.MSG_NOSIGNAL)
            received = bytearray()
            while True:
                end = received.find(b"\n")
                if end >= 0:
                    return _decode(received[: end + 1], path)
                _check_size(received, path)
                sock.settimeout(_left(deadline, path, timeout))
                data = sock.recv(_RECEIVE_SIZE)
                if not data:
                    raise _closed(path)
                received += data
        except TimeoutError:
            raise _timed_out(path, timeout) from None
        except OSError as error:
            raise _failure(path, error) from None


async def send_command_async(
    path: str, command: str | Command, timeout: float = DEFAULT_TIMEOUT
) -> Reply:
    """`send_command` on trio: the same errors, and cancellable."""
    line = command_line(command)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(path)
            async with stream:
                # As in send_command: an answer may be waiting all the same.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(line)
                received = bytearray()
                while True:
                    end = received.find(b"\n")
                    if end >= 0:
                        return _decode(received[: end + 1], path)
                    _check_size(received, path)
                    data = await stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        raise _closed(path)
                    received += data
    except trio.TooSlowError:
        raise _timed_out(path, timeout) from None
    except trio.BrokenResourceError as error:
        cause = error.__cause__
        if isinstance(cause, OSError):
            raise _failure(path, cause) from None
        raise ControlClientError(f"the connection to {path} broke: {error}") from None
    except OSError as error:
        raise _failure(path, error) from None


def _left(deadline: float, path: str, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0 or math.isnan(left):
        raise _timed_out(path, timeout)
    return left


def _check_size(received: bytearray, path: str) -> None:
    if len(received) > MAX_REPLY_LENGTH:
        raise ControlClientError(
            f"{path} sent a reply longer than {MAX_REPLY_LENGTH} bytes: not a relay's reply"
        )


def _decode(line: bytes | bytearray, path: str) -> Reply:
    try:
        return decode_reply(bytes(line))
    except ReplyError as error:
        raise ControlClientError(
            f"{path} answered something that is not a reply: {error}"
        ) from None


def _closed(path: str) -> ControlClientError:
    return ControlClientError(f"{path} closed the connection without a reply")


def _timed_out(path: str, timeout: float) -> ControlTimeout:
    return ControlTimeout(f"no reply from the control socket {path} within {timeout:g}s")


def _failure(path: str, error: OSError) -> ControlClientError:
    """The OSError of a connect, send or receive, said for a person."""
    if error.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
        return ControlNotRunning(
            f"no relay answers at the control socket {path}: is the relay running, and is"
            " this its control.socket? (" + (error.strerror or str(error)) + ")"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return ControlPermissionDenied(
            f"permission denied on the control socket {path}: run this as the relay's user"
            " or as root"
        )
    if error.errno in (errno.ECONNRESET, errno.EPIPE):
        return ControlClientError(f"{path} closed the connection without a reply")
    return ControlClientError(f"control socket {path}: {error.strerror or error}")
