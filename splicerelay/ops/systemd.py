"""systemd integration in plain Python: sd_notify, the watchdog, and socket activation.

No libsystemd: the notify protocol is one datagram per message on the AF_UNIX socket
named by NOTIFY_SOCKET, and socket activation is a few environment variables naming
file descriptors that start at 3. Without those variables everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


class Notifier:
    """Sends sd_notify messages; silent when the service manager did not ask for them."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        self._socket: socket.socket | None = None
        if address:
            # Why the translation: an address starting with "@" names a socket in the
            # abstract namespace, which the socket API spells with a leading NUL byte.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *assignments: str) -> None:
        """Send `KEY=VALUE` lines as one datagram; failures are never fatal."""
        if self._socket is None or self._address is None:
            return
        # The manager may have gone away; the relay must keep relaying regardless.
        with contextlib.suppress(OSError):
            self._socket.sendto("\n".join(assignments).encode(), self._address)

    def ready(self, status: str, *extra: str) -> None:
        self.send("READY=1", f"STATUS={status}", *extra)

    def reloading(self) -> None:
        # Why MONOTONIC_USEC: with Type=notify-reload, systemd matches this message to the
        # reload it asked for by the CLOCK_MONOTONIC timestamp.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


# What one message may hold; sd_notify messages are a few short lines.
NOTIFY_MESSAGE_SIZE = 4096
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class NotifyMessage:
    """One sd_notify datagram, and the process that sent it."""

    pid: int
    fields: dict[str, str]


def parse_notify(data: bytes) -> dict[str, str]:
    """`KEY=VALUE` lines as a dict; lines without `=` are ignored, as systemd does."""
    text = data.decode("utf-8", errors="replace")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


class NotifyReceiver:
    """The service manager's end of NOTIFY_SOCKET, for a supervisor of worker processes.

    A non-blocking AF_UNIX datagram socket bound at `path` (a leading NUL byte: a name
    in the abstract namespace). Why SO_PASSCRED: like systemd,
    it tells senders apart by the pid the kernel attaches to each datagram, which a
    sender cannot forge, instead of trusting what the message says.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._socket.bind(path)
        except OSError:
            self._socket.close()
            raise
        self._socket.setblocking(False)

    def fileno(self) -> int:
        return self._socket.fileno()

    def receive(self) -> NotifyMessage | None:
        """The next message, or None when none is waiting."""
        while True:
            try:
                data, ancillary, _flags, _address = self._socket.recvmsg(
                    NOTIFY_MESSAGE_SIZE, socket.CMSG_SPACE(_CREDENTIALS.size)
                )
            except (BlockingIOError, InterruptedError):
                return None
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
            if pid:
                return NotifyMessage(pid, parse_notify(data))
            # No credentials: cannot tell who sent it; drop it, as systemd does.

    def close(self) -> None:
        self._socket.close()
        if not self.path.startswith("\0"):  # a name in the abstract namespace has no file
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when off."""
    environ = environ if environ is not None else dict(os.environ)
    usec = environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process
    return int(usec) / 1e6 / 2


@dataclass(frozen=True)
class PassedSocket:
    """A listening socket handed over by the service manager."""

    sock: socket.socket
    name: str  # from LISTEN_FDNAMES; "unknown" when unnamed
    # Kept open when no route uses it (the service manager owns it and may pass it again);
    # False for a worker's copy of a listener that its supervisor bound for a route.
    kept: bool = True


@dataclass(frozen=True)
class RefusedFd:
    """A passed file descriptor that is not a listening stream socket: the relay refuses
    to start with it, as a daemon checking its fds with sd_is_socket() does."""

    fd: int
    name: str
    what: str  # what it is instead: "a pipe", "a datagram socket (AF_INET)", ...

    def __str__(self) -> str:
        return (
            f"fd {self.fd} passed by systemd as {self.name!r} is {self.what}, not a"
            " listening stream socket (AF_INET, AF_INET6 or AF_UNIX); check the socket"
            " unit: ListenStream= and Accept=no"
        )


# The families a route can listen on.
LISTEN_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
_FILE_KINDS = (
    (stat.S_ISFIFO, "a pipe"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
_SOCKET_TYPES: dict[int, str] = {
    socket.SOCK_DGRAM: "a datagram socket",
    socket.SOCK_SEQPACKET: "a seqpacket socket",
    socket.SOCK_RAW: "a raw socket",
}


def listening_socket(fd: int) -> socket.socket | str:
    """The listening stream socket open at `fd`, or what `fd` is instead.

    The checks of sd_is_socket(fd, family, SOCK_STREAM, 1): a socket (fstat), of type
    SOCK_STREAM (SO_TYPE), listening (SO_ACCEPTCONN), of a family a route can listen on.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        return f"not usable ({error.strerror})"
    if not stat.S_ISSOCK(mode):
        return next((what for is_kind, what in _FILE_KINDS if is_kind(mode)), "not a socket")
    try:
        # Why this way: with fileno alone Python asks the kernel for the family and type
        # (getsockname, SO_TYPE), so the object describes the socket as it really is.
        sock = socket.socket(fileno=fd)
    except OSError as error:
        return f"a socket that cannot be used ({error.strerror})"
    family = _family_name(sock.family)
    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    what = None
    if sock.family not in LISTEN_FAMILIES:
        what = f"a socket of family {family}"
    elif kind != socket.SOCK_STREAM:
        what = f"{_SOCKET_TYPES.get(kind, f'a socket of type {kind}')} ({family})"
    elif not listening:
        what = f"a stream socket ({family}) that is not listening"
    if what is None:
        return sock
    sock.detach()  # Why: not ours to close; the relay refuses to start instead.
    return what


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"family {family}"


def passed_sockets(
    environ: dict[str, str] | None = None, unset: bool = True
) -> list[PassedSocket | RefusedFd]:
    """The sockets of socket activation (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES).

    Only honoured when LISTEN_PID is this process, as sd_listen_fds() does. The
    variables are then removed (with `unset`) so that child processes do not take the
    same descriptors for theirs. An fd that is not a listening stream socket comes back
    as a RefusedFd, which the listeners refuse to start with.
    """
    environ_view = environ if environ is not None else os.environ
    count_text = environ_view.get("LISTEN_FDS", "")
    pid_text = environ_view.get("LISTEN_PID", "")
    if not count_text.isdigit() or pid_text != str(os.getpid()):
        return []
    names = environ_view.get("LISTEN_FDNAMES", "").split(":")
    sockets: list[PassedSocket | RefusedFd] = []
    for offset in range(int(count_text)):
        fd = LISTEN_FDS_START + offset
        name = names[offset] if offset < len(names) and names[offset] else "unknown"
        checked = listening_socket(fd)
        if isinstance(checked, str):
            sockets.append(RefusedFd(fd, name, checked))
            continue
        os.set_inheritable(fd, False)
        sockets.append(PassedSocket(checked, name))
    if unset and environ is None:
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    return sockets
