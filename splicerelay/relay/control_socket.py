"""The control socket: a unix stream socket that only the relay's own user and root may use.

`serve_control_socket` binds it (mode 0600 from the start), answers one command per line
with one JSON reply (protocol/control.py), and removes the file when it ends. Binding the
file, the stale-socket check and removing the file are relay/control_listener.py's; this
module serves clients on the bound socket (`ControlServer`). What a command does is the
`handler`'s business; this module only keeps the socket safe to leave open: abuse of it
must not change anything for the data path, which shares the event loop. Hence every
connection is bounded:

- its peer's uid (`SO_PEERCRED`) must be ours or root's, checked before reading a byte;
- at most `max_clients` are served at a time; one more gets a "busy" reply and is closed
  at once, so a flood costs one accept, one small send and one close per connection and
  never holds an fd (waiting in the backlog instead would leave a `ctl` hanging with no
  word of why);
- a line is at most MAX_LINE_LENGTH bytes, so no connection holds more than that;
- each complete line must arrive within `line_timeout` from when the previous reply was
  sent (or from accept): a total deadline per line, so a client that trickles one byte
  a second is cut off as surely as one that sends nothing;
- a reply not taken within `write_timeout` (a client that never reads) closes it.

The handler itself is not bounded here: a `reload` takes as long as the reload does,
and the handler must bound its own waits (on workers, say).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import trio

from splicerelay.ops.ratelimit import RateLimit
from splicerelay.protocol.control import (
    HELP,
    MAX_LINE_LENGTH,
    Command,
    CommandError,
    CommandFailed,
    Help,
    KillConnection,
    Reload,
    Reply,
    SetUpstreamState,
    SetUpstreamWeight,
    encode_reply,
    error_reply,
    format_command,
    ok_reply,
    parse_command,
)
from splicerelay.relay.control_listener import (
    ControlListener,
    ControlSocketError,
    bind_control_socket,
)

# ControlListener, ControlSocketError and bind_control_socket are control_listener.py's,
# named here too: a caller of serve_control_socket meets them, and may import all from here.
__all__ = [
    "ControlLimits",
    "ControlListener",
    "ControlServer",
    "ControlSocketError",
    "ControlStatistics",
    "Handler",
    "PeerCredentials",
    "bind_control_socket",
    "peer_credentials",
    "serve_control_socket",
]

log = logging.getLogger("splicerelay")

Handler = Callable[[Command], Awaitable[object]]

# Accept errors that mean "out of a resource right now": wait and try again, as trio's
# serve_listeners does, instead of ending the control socket.
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.1
# struct ucred: pid_t pid; uid_t uid; gid_t gid (int, unsigned int, unsigned int).
_UCRED = struct.Struct("iII")
# Commands that change something are logged with who sent them.
_CHANGES = (SetUpstreamState, SetUpstreamWeight, KillConnection, Reload)
_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class ControlLimits:
    """The bounds on each control connection (see the module docstring)."""

    line_timeout: float = 10.0
    write_timeout: float = 10.0
    max_clients: int = 16


@dataclass(frozen=True)
class ControlStatistics:
    """Counts since the socket was bound."""

    clients: int  # being served now
    peak_clients: int  # the most served at once
    accepted: int  # every connection accepted, refused ones included
    refused_peers: int  # a uid that is neither ours nor root
    refused_busy: int  # max_clients were being served already
    timed_out: int  # no complete line, or a reply not taken, in time
    too_long: int  # a line over MAX_LINE_LENGTH
    commands: int  # lines answered, errors included
    internal_errors: int  # the handler raised something it should not have


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Who is at the other end of a connected unix socket.

    Why SO_PEERCRED: the kernel records the peer's pid and effective uid and gid when it
    calls connect() (or socketpair()), so they say who opened the connection however the
    fd was passed on later, and the peer cannot claim anything else. The ids are those of
    our user namespace; a uid with no mapping in it reads as the overflow uid (65534)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


class _LineTooLong(Exception):
    pass


class ControlServer:
    """Serves a bound ControlListener: accepts, checks peers, answers commands."""

    def __init__(
        self,
        listener: ControlListener,
        handler: Handler,
        limits: ControlLimits = ControlLimits(),
        allowed_uids: frozenset[int] | None = None,
    ) -> None:
        self.listener = listener
        self._handler = handler
        self._limits = limits
        # Why the effective uid: SO_PEERCRED reports the peer's effective uid, and the
        # socket file belongs to ours.
        self._allowed = allowed_uids if allowed_uids is not None else frozenset({os.geteuid(), 0})
        self._log_limit: RateLimit[str] = RateLimit(_LOG_INTERVAL)
        self._clients = 0
        self._counts = dict.fromkeys(
            (
                "peak_clients",
                "accepted",
                "refused_peers",
                "refused_busy",
                "timed_out",
                "too_long",
                "commands",
                "internal_errors",
            ),
            0,
        )

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(clients=self._clients, **self._counts)

    async def serve(
        self, *, task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        sock = self.listener.sock
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError as error:
                    if error.errno in _ACCEPT_RESOURCE_ERRORS:
                        self._warn("accept", "control socket: cannot accept: %s", error.strerror)
                        await trio.sleep(ACCEPT_BACKOFF)
                        continue
                    if error.errno == errno.ECONNABORTED:
                        continue
                    raise
                self._counts["accepted"] += 1
                self._admit(nursery, conn)  # owns conn from here, with no await before
                # A flood of connects, always ready, must not starve the rest of the loop.
                await trio.lowlevel.checkpoint()

    def _admit(self, nursery: trio.Nursery, conn: socket.socket) -> None:
        """Refuse `conn`, or hand it to a task of its own; either way, it is not ours after."""
        try:
            conn.setblocking(False)
            peer = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        if peer.uid not in self._allowed:
            self._counts["refused_peers"] += 1
            self._warn(
                f"uid {peer.uid}",
                "control socket: refused a connection from uid %d (pid %d): only uids %s may"
                " use it",
                peer.uid,
                peer.pid,
                ", ".join(map(str, sorted(self._allowed))),
            )
            _reply_and_close(
                conn,
                error_reply(f"permission denied: uid {peer.uid} may not use this control socket"),
            )
            return
        if self._clients >= self._limits.max_clients:
            self._counts["refused_busy"] += 1
            self._warn("busy", "control socket: busy, refused a client (%d served)", self._clients)
            _reply_and_close(
                conn,
                error_reply(f"busy: {self._clients} control clients are being served; try again"),
            )
            return
        self._clients += 1
        self._counts["peak_clients"] = max(self._counts["peak_clients"], self._clients)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        nursery.start_soon(self._serve_client, stream, peer)

    async def _serve_client(self, stream: trio.SocketStream, peer: PeerCredentials) -> None:
        buffer = bytearray()
        try:
            while True:
                line: bytes | None = None
                too_long = False
                with trio.move_on_after(self._limits.line_timeout) as waiting:
                    try:
                        line = await _next_line(stream, buffer)
                    except _LineTooLong:
                        too_long = True
                if too_long:
                    self._counts["too_long"] += 1
                    message = f"line too long: more than {MAX_LINE_LENGTH} bytes; closing"
                    await self._send(stream, encode_reply(error_reply(message)))
                    return
                if waiting.cancelled_caught:
                    self._counts["timed_out"] += 1
                    message = f"no complete command within {self._limits.line_timeout:g}s; closing"
                    await self._send(stream, encode_reply(error_reply(message)))
                    return
                if line is None:
                    return
                if not await self._send(stream, await self._answer(line, peer)):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            # A bug here must end this one connection, not the control socket (nor the
            # relay whose event loop it shares).
            self._counts["internal_errors"] += 1
            log.exception("control socket: a client's connection failed")
        finally:
            self._clients -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _answer(self, line: bytes, peer: PeerCredentials) -> bytes:
        """The encoded reply to one line."""
        self._counts["commands"] += 1
        try:
            command = parse_command(line)
        except CommandError as error:
            return encode_reply(error_reply(str(error)))
        if isinstance(command, Help):
            return encode_reply(ok_reply(list(HELP)))
        if isinstance(command, _CHANGES):
            log.info(
                "control socket: %s (from pid %d, uid %d)",
                format_command(command),
                peer.pid,
                peer.uid,
            )
        try:
            reply = ok_reply(await self._handler(command))
        except CommandFailed as failure:
            reply = error_reply(failure.message or "failed", failure.data)
        except CommandError as failure:
            reply = error_reply(str(failure) or "refused")
        except Exception:
            return self._internal_error(command, "failed")
        try:
            return encode_reply(reply)
        except (TypeError, ValueError, RecursionError):
            return self._internal_error(command, "answered with data that is not JSON")

    def _internal_error(self, command: Command, what: str) -> bytes:
        """The relay's own bug: logged with its traceback, never a peer's doing."""
        self._counts["internal_errors"] += 1
        log.exception("control socket: the command %r %s", format_command(command), what)
        return encode_reply(error_reply("internal error: the relay's log has the details"))

    async def _send(self, stream: trio.SocketStream, data: bytes) -> bool:
        """Send one reply; False when the client did not take it in time."""
        with trio.move_on_after(self._limits.write_timeout):
            await stream.send_all(data)
            return True
        self._counts["timed_out"] += 1
        return False

    def _warn(self, key: str, message: str, *args: object) -> None:
        held_back = self._log_limit.admit(key)
        if held_back is None:
            return
        if held_back:
            message += " (%d more like this not logged)"
            args = (*args, held_back)
        log.warning(message, *args)


async def _next_line(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """The next line, "\\n" included; at end of input the rest (if any), then None.

    `buffer` keeps what came after the line for the next call; it never grows past
    MAX_LINE_LENGTH, since we read no more than what a line may still need."""
    while True:
        end = buffer.find(b"\n", 0, MAX_LINE_LENGTH)
        if end >= 0:
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            return line
        if len(buffer) >= MAX_LINE_LENGTH:
            raise _LineTooLong
        data = await stream.receive_some(MAX_LINE_LENGTH - len(buffer))
        if not data:
            if not buffer:
                return None
            line = bytes(buffer)
            buffer.clear()
            return line
        buffer += data


def _reply_and_close(conn: socket.socket, reply: Reply) -> None:
    """Say why, without waiting, and close: a new socket's send buffer has room for one
    short line, and a peer that is gone makes send fail, which changes nothing."""
    with contextlib.suppress(OSError):
        conn.send(encode_reply(reply), socket.MSG_NOSIGNAL)
    conn.close()


async def serve_control_socket(
    path: str,
    handler: Handler,
    *,
    limits: ControlLimits = ControlLimits(),
    allowed_uids: frozenset[int] | None = None,
    task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the control socket at `path` until cancelled, then remove its file.

    `nursery.start(serve_control_socket, path, handler)` returns the ControlServer once
    the socket is bound and listening (its `statistics()`), or raises ControlSocketError
    when the socket cannot be had. `handler` runs each command but `help`; it returns the
    reply's data (JSON data) or raises CommandFailed for an error reply. Any other
    exception becomes "internal error", logged with its traceback. `allowed_uids`
    replaces "our effective uid and root", for tests."""
    listener = bind_control_socket(path)
    try:
        server = ControlServer(listener, handler, limits, allowed_uids)
        await server.serve(task_status=task_status)
    finally:
        listener.close()
