"""Where access-log lines go: a bounded buffer, written in batches without ever blocking.

Lines are kept in memory and written out together: after a reactor round that leaves
a full write's worth (PIPE_BUF), else within FLUSH_INTERVAL (ops/access_log.py says
when). Every write is non-blocking.
When the output does not keep up (a stalled journald, a full pipe nobody reads), lines
wait in the buffer up to BUFFER_LIMIT; past it, new lines are dropped and counted, and
the data path never waits on the log. At exit the rest is written with a bounded wait.

How a write is made non-blocking without touching anyone else's stdout: O_NONBLOCK is a
flag of the open file description, which stdout shares with the shell, the terminal or
the other workers, and setting it there would make *their* writes fail with EAGAIN.
- a socket (journald's stream): send() with MSG_DONTWAIT, a per-call flag, of whole
  lines in sends that the kernel takes whole (see atomic_send_size);
- a pipe, FIFO or terminal: a description of our own, opened through /proc/self/fd/N
  with O_NONBLOCK (for a pipe this opens the same pipe, like a FIFO's path would);
- a regular file: plain write(), which does not wait for readers.
If /proc cannot be had, the write blocks like print() would, and the log says so at
start.

Why whole lines in writes of at most PIPE_BUF bytes to a pipe: workers share stdout,
and the kernel keeps a pipe write of up to PIPE_BUF bytes in one piece, so lines of two
workers never interleave. A non-blocking write that size is all or nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable

log = logging.getLogger("splicerelay")

BUFFER_LIMIT = 1 << 20  # bytes of lines held while the output is blocked; past it, drop
FLUSH_INTERVAL = 0.05  # seconds: the longest a line waits while its output takes lines
CLOSE_TIMEOUT = 5.0  # seconds to wait at exit for a blocked output to take the rest
PIPE_BUF = select.PIPE_BUF
SOCKET_CHUNK = 1 << 16


def atomic_send_size(sock: socket.socket) -> int:
    """The most a non-blocking send() on `sock` takes whole or not at all.

    Why: a stream socket's send may take part of what it is given when its buffer is
    nearly full, cutting a line; workers sharing journald's socket would then interleave
    their halves. A unix stream socket queues a send of up to SO_SNDBUF/2 - 64 bytes as
    one buffer, allocated whole or not at all (net/unix/af_unix.c).
    """
    try:
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return PIPE_BUF
    return max(1, min(SOCKET_CHUNK, sndbuf // 2 - 64))


class Output:
    """One fd written without blocking; `write` returns how much was taken (0: full)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd  # the fd to wait on for writability
        self.chunk = SOCKET_CHUNK
        self._own_fd: int | None = None
        self._socket: socket.socket | None = None
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            self._socket = socket.socket(fileno=os.dup(fd))
            self.chunk = atomic_send_size(self._socket)
        elif stat.S_ISREG(mode):
            pass
        else:
            if stat.S_ISFIFO(mode):
                self.chunk = PIPE_BUF
            try:
                own = os.open(
                    f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_APPEND
                )
            except OSError as error:
                log.warning(
                    "access log: stdout cannot be written without blocking"
                    f" ({error.strerror or error}); if it stalls, relaying stalls with it"
                )
            else:
                self._own_fd = self.fd = own

    def write(self, data: memoryview) -> int:
        try:
            if self._socket is not None:
                return self._socket.send(data, socket.MSG_DONTWAIT)
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        if self._own_fd is not None:
            os.close(self._own_fd)


class AccessOutput:
    """The buffer of access-log lines and the writes that empty it.

    `add` is what a finished connection calls; it never blocks and never raises.
    `flush` writes what the output takes now. `dropped` counts lines lost for good:
    past the bound while the output was blocked, or written to an output that is gone.
    """

    def __init__(self, output: Output, limit: int = BUFFER_LIMIT) -> None:
        self.output = output
        self.limit = limit
        self.dropped = 0
        self._lines: list[str] = []
        # What waits to be written: characters in _lines and bytes in _unsent.
        self.pending = 0
        self._unsent = b""  # what a write left over, whole lines
        self._dropping = False  # in a burst of drops: said once, at its start
        self._burst_dropped = 0
        self._gone = False

    def add(self, line: str) -> None:
        size = len(line)
        if self.pending + size > self.limit or self._gone:
            self.dropped += 1
            self._burst_dropped += 1
            if not self._dropping:
                self._dropping = True
                if not self._gone:
                    log.warning(
                        "access log: the output is not taking lines; dropping them until"
                        " it does (splicerelay_access_log_dropped_total counts them)",
                        extra={"fields": {"buffered_bytes": self.pending}},
                    )
            return
        self._lines.append(line)
        self.pending += size

    def flush(self) -> None:
        """Write what the output takes without waiting; keep the rest for later."""
        if self._lines:
            self._unsent += "".join(self._lines).encode("utf-8", "backslashreplace")
            self._lines.clear()
        if not self._unsent:
            return
        sent = self._write_some(self._unsent)
        self._unsent = self._unsent[sent:]
        self.pending = len(self._unsent)
        if not self._unsent and self._dropping:
            self._end_burst()

    def _write_some(self, data: bytes) -> int:
        view = memoryview(data)
        chunk = self.output.chunk
        done = 0
        total = len(data)
        while done < total:
            end = min(done + chunk, total)
            if end < total:
                # Whole lines only: up to the last newline inside the chunk (a line
                # longer than a chunk goes out on its own).
                cut = data.rfind(b"\n", done, end)
                end = cut + 1 if cut >= done else data.find(b"\n", end) + 1 or total
            try:
                taken = self.output.write(view[done:end])
            except OSError as error:
                self._lose_output(error, data[done:])
                return total
            if not taken:
                break
            done += taken
            if done < end:
                break  # a partial write: the output is full now
        return done

    def _lose_output(self, error: OSError, unsent: bytes) -> None:
        """The output is gone (EPIPE: no reader) or broken: what is left is dropped."""
        lost = unsent.count(b"\n")
        self.dropped += lost
        if not self._gone:
            self._gone = True
            reason = "no one reads it" if error.errno == errno.EPIPE else str(error)
            log.warning(
                f"access log: cannot write to its output ({reason}); access lines are dropped",
                extra={"fields": {"dropped": lost}},
            )

    def _end_burst(self) -> None:
        log.warning(
            "access log: the output takes lines again",
            extra={"fields": {"dropped": self._burst_dropped}},
        )
        self._dropping = False
        self._burst_dropped = 0

    def close(
        self, timeout: float = CLOSE_TIMEOUT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Write the rest, waiting for the output at most `timeout`; then let go of it."""
        deadline = clock() + timeout
        self.flush()
        while self._unsent and not self._gone:
            remaining = deadline - clock()
            if remaining <= 0:
                break
            poller = select.poll()
            poller.register(self.output.fd, select.POLLOUT)
            poller.poll(remaining * 1000)
            self.flush()
        if self._unsent:
            lost = self._unsent.count(b"\n")
            self.dropped += lost
            log.warning(
                "access log: the output did not take the last lines before exit",
                extra={"fields": {"dropped": lost}},
            )
            self._unsent = b""
            self.pending = 0
        self.output.close()
