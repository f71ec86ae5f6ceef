"""The control socket's file: bound with mode 0600, replaced only when stale, removed when done.

`bind_control_socket` binds and listens at a path and returns a `ControlListener`, the one
owner that closes the socket and removes the file it made (and only that file). A socket
file that nobody answers on (a crashed relay's) is replaced; one that a live process
answers on is an error, as is any file that is not a socket. A name in the abstract
namespace (starting with a NUL byte) has no file at all. Every failure to get the socket
is a ControlSocketError, a startup error said for the operator.

Serving clients on the bound socket (peer checks, limits, replies) is
relay/control_socket.py's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

import trio

__all__ = [
    "LISTEN_BACKLOG",
    "SOCKET_MODE",
    "ControlListener",
    "ControlSocketError",
    "bind_control_socket",
]

SOCKET_MODE = 0o600
LISTEN_BACKLOG = 128


class ControlSocketError(Exception):
    """The control socket cannot be had: a startup error, said for the operator."""


class ControlListener:
    """The bound control socket, and the file it made; the one owner that closes both."""

    def __init__(self, sock: socket.socket, path: str, identity: tuple[int, int] | None) -> None:
        self.sock = sock
        self.path = path
        # (st_dev, st_ino) of the socket file as bind() made it. Why not fstat(sock):
        # a socket fd's inode is the socket's own (in sockfs), not the file bind()
        # created, so only lstat of the path right after bind() names that file.
        # None: a name in the abstract namespace, which has no file.
        self._identity = identity

    def close(self) -> None:
        """Close the socket and remove its file, if the file is still the one we made.

        Why compare: by now the path may name another relay's socket (an operator
        removed ours and started a new relay, or a restart bound it already after our
        listener stopped answering). Removing that would cut the new relay off."""
        if self.sock.fileno() < 0:
            return
        with contextlib.suppress(RuntimeError):  # outside trio: nothing registered
            trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        if self._identity is None:
            return
        try:
            found = os.lstat(self.path)
        except OSError:
            return
        if (found.st_dev, found.st_ino) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def bind_control_socket(path: str) -> ControlListener:
    """Bind and listen at `path`, mode 0600; raise ControlSocketError if it cannot be had.

    A socket file that nobody answers on (a crashed relay's) is replaced; one that a live
    process answers on, and any file that is not a socket, is an error.

    A `path` starting with a NUL byte is a name in the abstract namespace (a supervisor's
    private socket to a worker, when it has no directory for one: see
    workers/rendezvous.py); it has no file, hence no mode, and SO_PEERCRED alone decides
    who may use it."""
    if path.startswith("\0"):
        return _bind_abstract(path)
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ControlSocketError(
            f"cannot create the control socket {path}: the directory {parent} does not exist"
        )
    _remove_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Why fchmod before bind: Linux gives the file that bind() creates the mode of
        # the socket's own inode, less the umask, so the file never exists with a wider
        # mode, not even for a moment. (Connects would be refused until listen() anyway,
        # but a file that is never wider needs no such argument.) os.umask() instead
        # would change the mode of files that other threads create meanwhile.
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(path)
        found = os.lstat(path)
        mode = stat.S_IMODE(found.st_mode)
        if mode & ~SOCKET_MODE:  # a kernel that ignores the socket inode's mode
            os.unlink(path)
            raise ControlSocketError(
                f"cannot create the control socket {path} with mode 0600 (it got {mode:04o})"
            )
        if mode != SOCKET_MODE:
            # A umask wider than 0177 can only have taken bits away (0400, say, and
            # then our own user could not connect): give them back. Nothing widens here.
            os.chmod(path, SOCKET_MODE)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ControlSocketError(
            f"cannot create the control socket {path}: {error.strerror or error}"
        ) from None
    except BaseException:
        sock.close()
        raise
    return ControlListener(sock, path, (found.st_dev, found.st_ino))


def _bind_abstract(path: str) -> ControlListener:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Why no stale check: an abstract name vanishes with the last socket bound to
        # it, so EADDRINUSE here always means a live socket holds it.
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ControlSocketError(
            f"cannot create the control socket {path!r}: {error.strerror or error}"
        ) from None
    return ControlListener(sock, path, None)


def _remove_if_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise ControlSocketError(
            f"cannot use {path} as the control socket: {error.strerror}"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ControlSocketError(
            f"cannot use {path} as the control socket: a file that is not a socket is there"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Why this means stale: connecting to a unix socket file that no process
        # listens on fails at once with ECONNREFUSED. (Between this and bind() another
        # relay could take the path; the later of the two then fails with EADDRINUSE.)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return  # removed since lstat
    except BlockingIOError:
        # Why this means alive: a unix connect only fails with EAGAIN when the
        # listener's backlog is full, so something is listening.
        pass
    except OSError as error:
        raise ControlSocketError(
            f"cannot check whether the control socket {path} is in use: {error.strerror}"
        ) from None
    finally:
        probe.close()
    raise ControlSocketError(
        f"the control socket {path} is in use by another running relay (it answers"
        " connections); stop that relay first, or give this one another control.socket"
    )
