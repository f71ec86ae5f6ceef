"""Signals for a select() loop: each one handled arrives as a byte on a socket."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def signal_wakeup(handled: Iterable[signal.Signals]) -> Iterator[socket.socket]:
    """Deliver the `handled` signals as bytes to read from the socket it yields; the
    previous handlers come back afterwards.

    Why a wakeup fd: a Python signal handler only runs between bytecodes, and select()
    restarts itself after EINTR (PEP 475); the C-level handler writes the signal number
    to this socket instead, which wakes select() at once.
    """
    wakeup_read, wakeup_write = socket.socketpair()
    wakeup_read.setblocking(False)
    wakeup_write.setblocking(False)
    handled = tuple(handled)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    old_wakeup = signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
    try:
        for signum in handled:
            signal.signal(signum, _ignore)
        yield wakeup_read
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        wakeup_read.close()
        wakeup_write.close()


def received(wakeup: socket.socket) -> Iterator[int]:
    """The signal numbers waiting on the wakeup socket."""
    while True:
        try:
            data = wakeup.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return
        yield from data


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler: the wakeup fd carries the signal to the loop."""
