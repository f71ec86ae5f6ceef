"""The zero-copy data path: kernel pipes, their pool, and one-direction flows.

A flow moves the bytes of one direction of a connection, socket -> pipe -> socket,
with splice(2), so the payload never enters user space. The rules it follows were
learned the hard way by Go's net package and by HAProxy:

* Every call is tried first and only on EAGAIN do we wait for readiness (the reactor
  does the waiting); waiting first would cost an epoll round trip for every chunk.
* EAGAIN from splice(socket -> pipe) is ambiguous: the socket may be empty, or the pipe
  may be full. We remove the ambiguity by only filling an *empty* pipe and then pumping
  *all* of it out before reading again, so EAGAIN on the read side always means "socket
  empty" and EAGAIN on the write side always means "destination full".
* On EOF the pipe is always empty (see above) before the destination's write side is
  shut down; shutting down with bytes still in the pipe would truncate the stream.
* A pipe is borrowed from a pool only while bytes are in flight, so an idle connection
  holds just its two sockets.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import fcntl
import os
import socket

import trio

from splicerelay.datapath.stats import ByteCounter, PipeStats

# Why only SPLICE_F_NONBLOCK: it makes the *pipe* side non-blocking (the socket side
# follows the socket's own O_NONBLOCK). SPLICE_F_MOVE is a no-op in the kernel, and
# SPLICE_F_MORE acts like TCP_CORK on the output socket, which delays small messages.
SPLICE_FLAGS = os.SPLICE_F_NONBLOCK

# errnos that mean "splice is not supported for this pair of files", not a broken peer.
SPLICE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

# Yield to the scheduler after this many bytes moved without blocking, so one fast
# connection cannot starve the others (every wait is already a checkpoint).
YIELD_EVERY_BYTES = 8 << 20

COPY_BUFFER_SIZE = 64 << 10


def close_fd(fd: int) -> None:
    """Close `fd`, first waking any task that waits on it (trio requires this order)."""
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


def close_socket(sock: _socket.socket, tracked: bool = True) -> None:
    """Close a socket; safe to call twice.

    `tracked`: trio may have waited on it, so it goes through trio's notify-then-close
    protocol. Sockets only the reactor has seen skip that (and its epoll_ctl).
    """
    if sock.fileno() >= 0:
        if tracked:
            trio.lowlevel.notify_closing(sock)
        sock.close()


def abort_socket(sock: _socket.socket, tracked: bool = True) -> None:
    """Close with a TCP RST instead of a FIN, to pass a reset on to the other peer."""
    if sock.fileno() < 0:
        return
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Why: SO_LINGER with a zero timeout makes close() discard unsent data and send
        # RST. A reset on one side must not look like a clean EOF on the other.
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
    close_socket(sock, tracked)


class Pipe:
    """One kernel pipe: a read end, a write end and the capacity the kernel granted."""

    __slots__ = ("capacity", "read_fd", "write_fd")

    def __init__(self, read_fd: int, write_fd: int, capacity: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.capacity = capacity

    def close(self) -> None:
        close_fd(self.read_fd)
        close_fd(self.write_fd)
        self.read_fd = self.write_fd = -1


def open_pipe(size: int, stats: PipeStats) -> Pipe:
    """Create a non-blocking pipe and try to grow it to `size` bytes.

    Growing can fail: an unprivileged user past `fs.pipe-user-pages-soft` gets EPERM
    and a pipe of only a page or two, and sizes above `fs.pipe-max-size` are refused.
    A small pipe still works, just with more syscalls per byte, so we keep what the
    kernel gave and count the refusal.
    """
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    capacity = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
    if size > capacity:
        try:
            capacity = fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            stats.resize_failures += 1
    stats.created += 1
    return Pipe(read_fd, write_fd, capacity)


class PipePool:
    """Empty pipes kept for reuse, one stack per requested size.

    A pipe comes back here only when it is empty. One that still holds bytes (its
    connection died mid-chunk) is closed, since its contents belong to nobody.

    Why flows pop and push a stack themselves (`stack_for`): a pipe is lent and given
    back a few times per connection, and a list operation is the cheapest way to do it.
    """

    def __init__(self, stats: PipeStats, max_idle: int = 256) -> None:
        self._stats = stats
        self.max_idle = max_idle  # per size
        self._stacks = stats.idle_stacks

    def stack_for(self, size: int) -> list[Pipe]:
        """The idle pipes of `size`: pop one to borrow it, push it back empty."""
        stack = self._stacks.get(size)
        if stack is None:
            stack = self._stacks[size] = []
        return stack

    def open(self, size: int) -> Pipe:
        """A new pipe, for when the stack of `size` is empty; raises OSError."""
        return open_pipe(size, self._stats)

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe instead of keeping it: one with bytes in it, or one too many."""
        pipe.close()
        self._stats.closed += 1

    def close(self) -> None:
        """Close every idle pipe (at shutdown)."""
        for stack in self._stacks.values():
            for pipe in stack:
                self.discard(pipe)
            stack.clear()


# TCP states, from include/net/tcp_states.h.
TCP_ESTABLISHED = 1
TCP_CLOSE = 7
SIOCATMARK = 0x8905  # include/uapi/asm-generic/sockios.h: sockatmark(3)
FIONREAD = 0x541B  # include/uapi/asm-generic/ioctls.h: bytes waiting to be read


def at_urgent_mark(fd: int) -> bool:
    """Is the next byte to read from socket `fd` TCP urgent data (see _splice_step)?"""
    try:
        answer = fcntl.ioctl(fd, SIOCATMARK, b"\0\0\0\0")
    except OSError:
        return False  # not a TCP socket
    return answer != b"\0\0\0\0"


def was_reset(sock: _socket.socket) -> bool:
    """Is a read of 0 from `sock` a reset rather than the peer's FIN?

    Why: a reset socket reports its error once. When the other flow's call took it
    first, this read sees only "no more data", exactly like EOF. The TCP state tells
    them apart while we have not sent our own FIN: after the peer's FIN the socket is
    in CLOSE_WAIT, after a reset in CLOSE. Passing a reset on as a FIN would make a
    truncated stream look complete.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return info[0] == TCP_CLOSE


class ReadError(Exception):
    """The source socket failed (its peer reset, for instance)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class WriteError(Exception):
    """The destination socket failed (its peer reset or went away)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


# What a flow needs before it can go on; the session turns these into epoll interest.
WANT_READ = 1  # the source socket is empty
WANT_WRITE = 2  # the destination socket is full and bytes are held
WANT_PIPE = 3  # the process is out of fds for a pipe; retried on a timer
DONE = 4  # EOF passed on: the destination's write side is shut down


class Flow:
    """Moves one direction of a connection, as far as it can without blocking.

    `step()` never waits: it moves bytes until the source is empty or the destination
    is full, and returns what it needs next (WANT_READ, WANT_WRITE, WANT_PIPE), or DONE
    once EOF has been passed on with `shutdown(SHUT_WR)`. It raises ReadError or
    WriteError when a side fails. Who calls it again, and when, is the reactor's
    business; a flow holds no task, so an idle connection costs only its objects.
    """

    __slots__ = (
        "_counter",
        "_dst",
        "_idle_pipes",
        "_pipe_size",
        "_pool",
        "_src",
        "dst_fd",
        "held",
        "moved",
        "pending",
        "pipe",
        "reverse",
        "src_fd",
        "started",
        "state",
        "use_splice",
    )

    def __init__(
        self,
        src: _socket.socket,
        dst: _socket.socket,
        pool: PipePool,
        pipe_size: int,
        counter: ByteCounter,
        use_splice: bool = True,
    ) -> None:
        self._src = src
        self._dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self._pool = pool
        self._pipe_size = pipe_size
        self._idle_pipes = pool.stack_for(pipe_size)
        self._counter = counter
        self.use_splice = use_splice
        self.state = WANT_READ
        self.moved = 0  # bytes delivered to the destination, for idle detection and logs
        self.pipe: Pipe | None = None  # borrowed only while bytes are in flight
        self.held = 0  # bytes in `pipe` not yet delivered
        self.pending = b""  # copy path: bytes received but not yet sent
        self.started = False  # a first chunk has moved (splice is known to work)
        self.reverse: Flow | None = None  # the other direction of the same connection

    def step(self, eager: bool = False, readable: bool = False) -> int:
        """Move what can be moved now. `eager`: read on until EAGAIN or EOF even after a
        read that did not fill the pipe (the peer's FIN is known to be waiting).
        `readable`: epoll has just said the source is readable."""
        if self.use_splice:
            self.state = self._splice_step(eager, readable)
        else:
            self.state = self._copy_step(eager)
        return self.state

    def is_dropping_bytes(self) -> bool:
        """Would ending now drop bytes of this direction (held, or unread at the source)?"""
        if self.state == DONE:
            return False
        if self.held or self.pending:
            return True
        try:
            waiting = fcntl.ioctl(self.src_fd, FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return waiting != b"\0\0\0\0"

    def release_pipe(self) -> None:
        """Give back a pipe held at teardown; one with bytes in it is closed."""
        pipe = self.pipe
        if pipe is not None:
            if self.held:
                self.pipe = None
                self._pool.discard(pipe)  # its bytes belong to nobody now
            else:
                self._give_back(pipe)
            self.held = 0

    def _end_of_stream(self) -> int:
        reverse = self.reverse
        if reverse is not None and reverse.state == DONE:
            # Why no shutdown: both directions are now done, so the session closes both
            # sockets at once, and close() sends the FIN itself. Both receive queues are
            # empty (each side's EOF was read), so close() cannot turn into a reset.
            return DONE
        if was_reset(self._src):
            raise ReadError(ConnectionResetError(errno.ECONNRESET, "reset"))
        try:
            self._dst.shutdown(socket.SHUT_WR)
        except OSError as error:
            # ENOTCONN: the destination is already gone; that is its failure, not ours.
            raise WriteError(error) from None
        return DONE

    def _splice_step(self, eager: bool, readable: bool) -> int:
        if self.pending and not self._send_pending():
            return WANT_WRITE  # bytes a copy step (below) could not send yet
        pool = self._pool
        idle = self._idle_pipes
        counter = self._counter
        splice = os.splice
        pipe = self.pipe
        held = self.held
        budget = YIELD_EVERY_BYTES
        filled = True  # bytes held from an earlier step: deliver them, then read on
        while True:
            if not held:
                if pipe is None:
                    if idle:
                        pipe = idle.pop()
                    else:
                        try:
                            pipe = pool.open(self._pipe_size)
                        except OSError as error:
                            if error.errno in (errno.EMFILE, errno.ENFILE):
                                # Why wait rather than fail: running out of fds passes
                                # (connections end, idle pipes close); the bytes are
                                # safe in the socket meanwhile.
                                return WANT_PIPE
                            raise ReadError(error) from None
                try:
                    held = splice(self.src_fd, pipe.write_fd, pipe.capacity, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    # The pipe is empty, so EAGAIN means the socket is: give the pipe back.
                    self._give_back(pipe)
                    if readable and at_urgent_mark(self.src_fd):
                        # Why: splice(2) from TCP stops at an urgent (MSG_OOB) mark and
                        # says EAGAIN while the socket still polls readable, which would
                        # stall the stream and spin the loop. recv() steps over the mark
                        # (dropping the urgent byte, as every recv-based proxy does).
                        return self._copy_step(eager)
                    return WANT_READ
                except OSError as error:
                    self._give_back(pipe)
                    if not self.started and error.errno in SPLICE_UNSUPPORTED:
                        self.use_splice = False
                        return self._copy_step(eager)
                    raise ReadError(error) from None
                if held == 0:
                    self._give_back(pipe)
                    return self._end_of_stream()  # EOF, and the pipe is empty
                self.started = True
                self.pipe = pipe
                # Why note a full read: a read that did not fill the pipe almost always
                # emptied the socket, and level-triggered epoll will say if it did not.
                # Skipping the retry saves the EAGAIN syscall on every small message.
                filled = eager or held == pipe.capacity
            assert pipe is not None
            while held:
                try:
                    moved = splice(pipe.read_fd, self.dst_fd, held, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    self.held = held
                    return WANT_WRITE
                except OSError as error:
                    self.held = held
                    raise WriteError(error) from None
                held -= moved
                counter.splice += moved
                self.moved += moved
                budget -= moved
            self.held = 0
            if not filled or budget <= 0:
                # The pipe is empty: it goes back to the pool until the next chunk.
                # Fairness: after YIELD_EVERY_BYTES the other connections get their turn;
                # level-triggered epoll brings this one back.
                self._give_back(pipe)
                return WANT_READ
            # Reading on: the empty pipe stays lent for the next chunk.

    def _give_back(self, pipe: Pipe) -> None:
        """Return this flow's pipe, now empty, to the pool."""
        self.pipe = None
        idle = self._idle_pipes
        if len(idle) < self._pool.max_idle:
            idle.append(pipe)
        else:
            self._pool.discard(pipe)

    def _copy_step(self, eager: bool) -> int:
        """The user-space fallback for files the kernel will not splice."""
        src = self._src
        dst = self._dst
        counter = self._counter
        if self.pending and not self._send_pending():
            return WANT_WRITE
        buffer = _shared_copy_buffer
        budget = YIELD_EVERY_BYTES
        while True:
            try:
                received = src.recv_into(buffer)
            except BlockingIOError:
                return WANT_READ
            except OSError as error:
                raise ReadError(error) from None
            if received == 0:
                return self._end_of_stream()
            self.started = True
            try:
                sent = dst.send(memoryview(buffer)[:received])
            except BlockingIOError:
                sent = 0
            except OSError as error:
                raise WriteError(error) from None
            counter.copy += sent
            self.moved += sent
            budget -= sent
            if sent < received:
                # Only the unsent tail is kept per connection; the buffer is shared.
                self.pending = bytes(buffer[sent:received])
                return WANT_WRITE
            if (received < len(buffer) and not eager) or budget <= 0:
                return WANT_READ  # as in _splice_step: epoll says if more is waiting

    def _send_pending(self) -> bool:
        """Send what the copy path holds; True once all of it is gone."""
        try:
            sent = self._dst.send(self.pending)
        except BlockingIOError:
            return False
        except OSError as error:
            raise WriteError(error) from None
        self._counter.copy += sent
        self.moved += sent
        self.pending = self.pending[sent:]
        return not self.pending


# One buffer for every copy-path flow: flows run one at a time, and a flow that cannot
# send all of a chunk keeps only the unsent tail.
_shared_copy_buffer = bytearray(COPY_BUFFER_SIZE)
