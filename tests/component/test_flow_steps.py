"""One direction of a connection (Flow), stepped by hand over real sockets and pipes.

Nothing waits on epoll here: each test plays the reactor, calling `step()` in the order
it chooses, and looks at what the flow asks for next, what it holds, what the pool holds
and what the far end receives. The sockets are real loopback TCP pairs and the pipes are
real kernel pipes; only an fd shortage and a kernel that refuses splice are staged. The
tests are async only because closing a pipe goes through trio (notify_closing).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest

from splicerelay.datapath import flow as flow_module
from splicerelay.datapath.flow import (
    DONE,
    WANT_PIPE,
    WANT_READ,
    WANT_WRITE,
    Flow,
    PipePool,
    ReadError,
    WriteError,
    was_reset,
)
from splicerelay.datapath.stats import ByteCounter, PipeStats
from tests.support.scripted import readable, reset, send_until_full, tcp_pair, wait_readable

PIPE_SIZE = 64 << 10


class Bench:
    """client_app -> [client side | Flow | upstream side] -> upstream_app."""

    def __init__(self, *, rcvbuf: int | None = None, max_idle: int = 256) -> None:
        self.client_app, self.client_side = tcp_pair()
        self.upstream_side, self.upstream_app = tcp_pair(rcvbuf)
        if rcvbuf is not None:
            self.upstream_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.stats = PipeStats()
        self.pool = PipePool(self.stats, max_idle=max_idle)
        self.counter = ByteCounter()
        self.flow = Flow(self.client_side, self.upstream_side, self.pool, PIPE_SIZE, self.counter)

    def idle(self) -> list[object]:
        return self.pool.stack_for(PIPE_SIZE)

    def received(self, limit: int = 1 << 20) -> bytes:
        """What the upstream application can read now (b"" also when nothing waits)."""
        try:
            return self.upstream_app.recv(limit)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        self.flow.release_pipe()
        self.pool.close()
        for sock in (self.client_app, self.client_side, self.upstream_side, self.upstream_app):
            sock.close()


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    bench = Bench()
    yield bench
    bench.close()


@pytest.fixture
async def tight() -> AsyncIterator[Bench]:
    """A bench whose upstream path fills after a few KiB."""
    bench = Bench(rcvbuf=4096)
    yield bench
    bench.close()


async def test_a_chunk_passes_and_its_pipe_goes_back_to_the_pool(bench):
    bench.client_app.send(b"hello")
    wait_readable(bench.client_side)
    assert bench.flow.step(readable=True) == WANT_READ
    wait_readable(bench.upstream_app)
    assert bench.received() == b"hello"
    assert bench.counter.splice == 5 and bench.counter.copy == 0
    assert bench.flow.moved == 5
    assert bench.flow.pipe is None and bench.flow.held == 0
    assert len(bench.idle()) == 1 and bench.stats.created == 1


async def test_later_chunks_reuse_the_pooled_pipe(bench):
    for payload in (b"one", b"two", b"three"):
        bench.client_app.send(payload)
        wait_readable(bench.client_side)
        bench.flow.step(readable=True)
        wait_readable(bench.upstream_app)
        assert bench.received() == payload
    assert bench.stats.created == 1 and bench.stats.open == 1


async def test_an_empty_source_asks_to_read_and_keeps_no_pipe(bench):
    assert bench.flow.step() == WANT_READ
    assert bench.flow.pipe is None
    assert bench.received() == b""


async def test_a_full_destination_holds_the_bytes_in_the_pipe_and_asks_to_write(tight):
    data = os.urandom(1 << 20)
    sent = send_until_full(tight.client_app, data)
    wait_readable(tight.client_side)
    assert tight.flow.step(readable=True) == WANT_WRITE
    assert tight.flow.held > 0
    assert tight.flow.pipe is not None and tight.flow.pipe not in tight.idle()
    # Playing the reactor: the destination drains, writable, step again, until done.
    got = bytearray()
    for _ in range(10_000):
        got += tight.received()
        sent += send_until_full(tight.client_app, data[sent:])
        if len(got) == len(data):
            break
        tight.flow.step()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert tight.counter.splice == len(data)


async def test_eof_with_bytes_still_in_the_pipe_delivers_them_before_the_fin(tight):
    data = os.urandom(256 << 10)
    sent = send_until_full(tight.client_app, data)
    wait_readable(tight.client_side)
    assert tight.flow.step(readable=True) == WANT_WRITE
    got = bytearray()
    state = WANT_WRITE
    fin_seen = False
    for _ in range(10_000):
        sent += send_until_full(tight.client_app, data[sent:])
        if sent == len(data):
            # Why here: the client's FIN reaches the flow while bytes are still held.
            tight.client_app.shutdown(socket.SHUT_WR)
        try:
            chunk = tight.upstream_app.recv(1 << 20)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            fin_seen = True
            break
        if chunk:
            got += chunk
        if state != DONE:
            state = tight.flow.step()
    assert fin_seen and state == DONE
    assert len(got) == len(data)  # the FIN came after every byte, none truncated
    assert got == data


async def test_eof_on_an_idle_flow_shuts_the_destination_down(bench):
    bench.client_app.shutdown(socket.SHUT_WR)
    wait_readable(bench.client_side)
    assert bench.flow.step(readable=True) == DONE
    wait_readable(bench.upstream_app)
    assert bench.upstream_app.recv(10) == b""  # the FIN passed on
    assert len(bench.idle()) == 1  # the pipe it read EOF with is back


async def test_when_the_other_direction_is_done_eof_leaves_the_fin_to_close(bench):
    other = Flow(bench.upstream_side, bench.client_side, bench.pool, PIPE_SIZE, ByteCounter())
    other.state = DONE
    bench.flow.reverse = other
    bench.client_app.shutdown(socket.SHUT_WR)
    wait_readable(bench.client_side)
    assert bench.flow.step(readable=True) == DONE
    assert bench.received() == b""  # no FIN sent yet: the session's close sends it
    assert not readable(bench.upstream_app, 0.05)


async def test_a_reset_source_raises_read_error(bench):
    reset(bench.client_app)
    wait_readable(bench.client_side)
    with pytest.raises(ReadError):
        bench.flow.step(readable=True)
    assert bench.flow.pipe is None
    bench.client_app = socket.socket()  # closed above; a placeholder for close()


async def test_a_reset_destination_raises_write_error(bench):
    reset(bench.upstream_app)
    for _ in range(500):
        if was_reset(bench.upstream_side):
            break
        readable(bench.upstream_side, 0.01)
    assert was_reset(bench.upstream_side)
    bench.client_app.send(b"into the void")
    wait_readable(bench.client_side)
    with pytest.raises(WriteError) as raised:
        bench.flow.step(readable=True)
    assert raised.value.error.errno in (errno.ECONNRESET, errno.EPIPE)
    bench.upstream_app = socket.socket()


async def test_a_pipe_that_still_holds_bytes_is_closed_not_pooled(tight):
    send_until_full(tight.client_app, os.urandom(1 << 20))
    wait_readable(tight.client_side)
    assert tight.flow.step(readable=True) == WANT_WRITE
    pipe = tight.flow.pipe
    tight.flow.release_pipe()
    assert pipe not in tight.idle()
    assert tight.stats.closed == 1 and pipe.read_fd == -1
    assert tight.flow.held == 0 and tight.flow.pipe is None


async def test_releasing_an_empty_pipe_pools_it(bench):
    bench.client_app.send(b"x")
    wait_readable(bench.client_side)
    bench.flow.step(readable=True)
    bench.flow.release_pipe()  # nothing lent: nothing to do
    assert bench.stats.closed == 0 and len(bench.idle()) == 1


async def test_the_pool_keeps_no_more_idle_pipes_than_it_may():
    bench = Bench(max_idle=0)
    try:
        bench.client_app.send(b"x")
        wait_readable(bench.client_side)
        bench.flow.step(readable=True)
        assert bench.idle() == [] and bench.stats.closed == 1 and bench.stats.open == 0
    finally:
        bench.close()


async def test_without_splice_the_bytes_are_copied_and_counted_as_such(bench):
    bench.flow.use_splice = False
    bench.client_app.send(b"copied")
    wait_readable(bench.client_side)
    assert bench.flow.step(readable=True) == WANT_READ
    wait_readable(bench.upstream_app)
    assert bench.received() == b"copied"
    assert bench.counter.copy == 6 and bench.counter.splice == 0
    assert bench.stats.created == 0


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.ENOSYS])
async def test_a_first_splice_the_kernel_refuses_falls_back_to_copying(bench, monkeypatch, refusal):
    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "splice", refuse)
    bench.client_app.send(b"fallback")
    wait_readable(bench.client_side)
    assert bench.flow.step(readable=True) == WANT_READ
    wait_readable(bench.upstream_app)
    assert bench.received() == b"fallback"
    assert bench.flow.use_splice is False
    assert bench.counter.copy == 8 and bench.counter.splice == 0
    assert len(bench.idle()) == 1  # the pipe it tried with is back, empty


async def test_a_refusal_after_splice_has_worked_is_an_error_not_a_fallback(bench, monkeypatch):
    bench.client_app.send(b"first")
    wait_readable(bench.client_side)
    bench.flow.step(readable=True)

    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EINVAL, "refused")

    monkeypatch.setattr(os, "splice", refuse)
    bench.client_app.send(b"second")
    wait_readable(bench.client_side)
    with pytest.raises(ReadError):
        bench.flow.step(readable=True)
    assert bench.flow.use_splice is True


class NoFdsPool(PipePool):
    """A pool in a process out of fds: the kernel's EMFILE, staged."""

    out_of_fds = True

    def open(self, size: int):  # type: ignore[no-untyped-def]
        if self.out_of_fds:
            raise OSError(errno.EMFILE, "Too many open files")
        return super().open(size)


async def test_out_of_fds_for_a_pipe_waits_and_keeps_the_bytes_in_the_socket(bench):
    pool = NoFdsPool(bench.stats)
    flow = Flow(bench.client_side, bench.upstream_side, pool, PIPE_SIZE, bench.counter)
    bench.client_app.send(b"later")
    wait_readable(bench.client_side)
    assert flow.step(readable=True) == WANT_PIPE
    assert flow.is_dropping_bytes()  # unread at the source, not lost
    pool.out_of_fds = False
    assert flow.step() == WANT_READ
    wait_readable(bench.upstream_app)
    assert bench.received() == b"later"
    flow.release_pipe()
    pool.close()


async def test_one_busy_flow_yields_after_its_byte_budget(bench, monkeypatch):
    monkeypatch.setattr(flow_module, "YIELD_EVERY_BYTES", 1)
    data = os.urandom(PIPE_SIZE * 4)
    send_until_full(bench.client_app, data)
    wait_readable(bench.client_side)
    assert bench.flow.step(readable=True, eager=True) == WANT_READ
    first = bench.counter.splice
    assert 0 < first < len(data)  # it stopped for the others with bytes still waiting
    assert bench.flow.is_dropping_bytes()
    assert bench.flow.pipe is None


async def test_is_dropping_bytes_is_false_once_done(bench):
    assert not bench.flow.is_dropping_bytes()
    bench.client_app.send(b"x")
    wait_readable(bench.client_side)
    assert bench.flow.is_dropping_bytes()
    bench.client_app.shutdown(socket.SHUT_WR)
    while bench.flow.step(readable=True, eager=True) != DONE:
        pass
    assert not bench.flow.is_dropping_bytes()
