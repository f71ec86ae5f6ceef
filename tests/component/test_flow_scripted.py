"""One direction of a connection (Flow) under scripted readiness, beyond the basic steps.

The test plays the reactor: it makes the kernel do something to real sockets (loopback
TCP pairs, unix socketpairs) and calls `step()` when it chooses. These tests look at
what the basic ones in test_flow_steps.py do not: that a flow waiting for a full
destination leaves its source alone, that its counter counts delivered bytes, a reset
whose error another call already took, the copy path under back-pressure and at EOF,
every refusal errno (one of them from the real kernel, under seccomp), unix sockets,
and the two directions of one connection counted apart.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from splicerelay.datapath.flow import (
    DONE,
    WANT_READ,
    WANT_WRITE,
    Flow,
    PipePool,
    ReadError,
    WriteError,
)
from splicerelay.datapath.stats import ByteCounter, PipeStats
from tests.support import without_splice
from tests.support.scripted import (
    at_eof,
    read_exactly,
    read_to_eof,
    readable,
    receive_available,
    reset,
    send_until_full,
    shrink_send_buffer,
    tcp_pair,
    unix_pair,
    unread_bytes,
    wait_readable,
    wait_reset_seen,
)

PIPE_SIZE = 64 << 10
MiB = 1 << 20


class Line:
    """app -> [near | Flow | far] -> sink, on real sockets.

    `tight`: both sides are unix socketpairs and `far` has a small send buffer, so the
    destination is full after a few KiB, and stays exactly as full until the sink reads
    (a unix socket frees its send buffer only when the peer reads; TCP frees it on ACKs,
    which delayed ACKs make arrive later, so "full" would not hold still).
    """

    def __init__(self, *, tight: bool = False, unix: bool = False, use_splice: bool = True):
        if unix or tight:
            self.app, self.near = unix_pair()
            self.far, self.sink = unix_pair()
            if tight:
                shrink_send_buffer(self.far)
        else:
            self.app, self.near = tcp_pair()
            self.far, self.sink = tcp_pair()
        self.stats = PipeStats()
        self.pool = PipePool(self.stats)
        self.counter = ByteCounter()
        self.flow = Flow(self.near, self.far, self.pool, PIPE_SIZE, self.counter, use_splice)

    def pump(
        self, data: bytes, *, fin: bool = False, sent: int = 0, expect: int | None = None
    ) -> bytes:
        """Send `data` from offset `sent` on (then a FIN), step while there is something
        to do, and return what the sink got: `expect` bytes (all of `data`), or up to
        the FIN."""
        expect = len(data) if expect is None else expect
        got = bytearray()
        for _ in range(20_000):
            if sent < len(data):
                sent += send_until_full(self.app, data[sent:])
                if sent == len(data) and fin:
                    self.app.shutdown(socket.SHUT_WR)
            got += receive_available(self.sink)
            if self.flow.state == DONE or (not fin and len(got) == expect):
                break
            self.flow.step(readable=True)
        return bytes(got)

    def close(self) -> None:
        self.flow.release_pipe()
        self.pool.close()
        for sock in (self.app, self.near, self.far, self.sink):
            sock.close()


@pytest.fixture
async def line() -> AsyncIterator[Line]:
    line = Line()
    yield line
    line.close()


@pytest.fixture
async def tight() -> AsyncIterator[Line]:
    line = Line(tight=True)
    yield line
    line.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_flow_waiting_for_a_full_destination_leaves_its_source_alone(tight: Line):
    send_until_full(tight.app, os.urandom(MiB))
    wait_readable(tight.near)
    assert tight.flow.step(readable=True) == WANT_WRITE
    held, unread, delivered = tight.flow.held, unread_bytes(tight.near), tight.counter.splice
    assert held > 0 and unread > 0  # bytes both in the pipe and still in the source
    # The reactor calls again (the destination has not drained): nothing may move.
    for _ in range(3):
        assert tight.flow.step(readable=True) == WANT_WRITE
    assert tight.flow.held == held
    assert unread_bytes(tight.near) == unread  # not one more byte read into the pipe
    assert tight.counter.splice == delivered


async def test_the_counter_counts_bytes_delivered_not_bytes_read(tight: Line):
    data = os.urandom(MiB)
    send_until_full(tight.app, data)
    wait_readable(tight.near)
    assert tight.flow.step(readable=True) == WANT_WRITE
    # Without another step, the sink can read exactly what the flow says it delivered.
    got = receive_available(tight.sink)
    assert len(got) == tight.counter.splice == tight.flow.moved > 0
    assert got == data[: len(got)]
    assert tight.flow.held > 0  # and the rest is still held, not counted


async def test_a_full_pipe_reads_on_in_the_same_step_while_the_destination_takes_it(line: Line):
    data = os.urandom(4 * PIPE_SIZE)
    send_until_full(line.app, data)
    wait_readable(line.near)
    # A read that fills the pipe is likely not the last: the step reads on after it.
    assert line.flow.step(readable=True) == WANT_READ
    assert line.counter.splice > PIPE_SIZE  # more than one pipe's worth in one step
    assert line.flow.pipe is None and line.stats.created == 1
    got = receive_available(line.sink)
    assert got == data[: len(got)]
    rest = line.pump(data, sent=len(data), expect=len(data) - len(got))
    assert digest(got + rest) == digest(data)


async def test_a_short_read_leaves_the_eof_behind_it_to_an_eager_step(line: Line):
    line.app.send(b"last words")
    line.app.shutdown(socket.SHUT_WR)
    wait_readable(line.near)
    assert line.flow.step(readable=True) == WANT_READ  # a short read: no second look
    wait_readable(line.sink)
    assert receive_available(line.sink) == b"last words"
    assert not readable(line.sink)  # no FIN yet
    # Told the peer's FIN is waiting (EPOLLRDHUP), the flow reads on to it.
    assert line.flow.step(eager=True, readable=True) == DONE
    wait_readable(line.sink)
    assert at_eof(line.sink)


async def test_a_fin_known_while_the_destination_is_full_waits_behind_the_held_bytes(
    tight: Line,
):
    data = os.urandom(150 << 10)
    assert send_until_full(tight.app, data) == len(data)
    tight.app.shutdown(socket.SHUT_WR)
    # Told the FIN is waiting, the flow reads eagerly; the destination fills first.
    assert tight.flow.step(eager=True, readable=True) == WANT_WRITE
    assert tight.flow.held > 0
    assert not at_eof(tight.sink)  # the FIN has not overtaken the held bytes
    got = bytearray()
    for _ in range(20_000):
        got += receive_available(tight.sink)
        if tight.flow.step(eager=True) == DONE:
            break
    got += read_to_eof(tight.sink)
    assert digest(bytes(got)) == digest(data)


async def test_a_reset_whose_error_was_already_taken_is_not_passed_on_as_a_fin(line: Line):
    line.app.send(b"partial")
    wait_readable(line.near)
    reset(line.app)
    wait_reset_seen(line.near)
    # Another call took the socket's error first (a reset reports it once); from here a
    # read sees only "no more data", exactly like a FIN.
    assert line.near.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
    # What arrived before the reset is still delivered...
    assert line.flow.step(readable=True) == WANT_READ
    wait_readable(line.sink)
    assert receive_available(line.sink) == b"partial"
    # ...and then the end of the stream is known for a reset, not passed on as a FIN.
    with pytest.raises(ReadError) as raised:
        line.flow.step(readable=True)
    assert raised.value.error.errno == errno.ECONNRESET
    assert not readable(line.sink)  # the far side saw no FIN: the stream is not complete
    assert line.flow.state != DONE
    line.app = socket.socket()  # closed by the reset; a stand-in for close()


async def test_a_destination_gone_with_bytes_held_keeps_them_out_of_the_pool(tight: Line):
    send_until_full(tight.app, os.urandom(MiB))
    wait_readable(tight.near)
    assert tight.flow.step(readable=True) == WANT_WRITE
    pipe = tight.flow.pipe
    tight.sink.close()  # a unix peer going away: the next write says EPIPE
    with pytest.raises(WriteError) as raised:
        tight.flow.step()
    assert raised.value.error.errno == errno.EPIPE
    assert tight.flow.held > 0 and tight.flow.pipe is pipe  # still its own, still full
    tight.flow.release_pipe()
    assert pipe is not None and pipe.read_fd == -1
    assert (tight.stats.closed, tight.stats.idle, tight.stats.open) == (1, 0, 0)
    tight.sink = socket.socket()


async def test_a_tcp_urgent_mark_is_stepped_over_by_one_copy_and_splicing_goes_on(line: Line):
    # Why: splice(2) from TCP stops at an urgent (MSG_OOB) mark and says EAGAIN while the
    # socket still polls readable; without stepping over it the stream would stall.
    line.app.send(b"abc")
    line.app.send(b"!", socket.MSG_OOB)  # the urgent byte itself leaves the stream
    line.app.send(b"def")
    wait_readable(line.near)
    assert line.flow.step(readable=True) == WANT_READ  # splices up to the mark
    assert readable(line.near)  # the bytes behind the mark are waiting
    assert line.flow.step(readable=readable(line.near)) == WANT_READ
    assert not readable(line.near)
    line.app.send(b"ghi")
    wait_readable(line.near)
    assert line.flow.step(readable=True) == WANT_READ
    wait_readable(line.sink)
    assert read_exactly(line.sink, 9) == b"abcdefghi"
    assert (line.counter.splice, line.counter.copy) == (6, 3)  # only the chunk at the mark
    assert line.flow.use_splice is True


async def test_unix_stream_sockets_are_spliced_not_copied():
    # Why it matters: unix listeners and upstreams take the same data path, and the
    # kernel splices AF_UNIX stream sockets both ways.
    line = Line(unix=True)
    try:
        data = os.urandom(300_000)
        assert digest(line.pump(data)) == digest(data)
        assert line.counter.splice == len(data) and line.counter.copy == 0
        assert line.flow.use_splice is True
    finally:
        line.close()


async def test_the_copy_path_keeps_the_unsent_tail_and_asks_to_write():
    line = Line(tight=True, use_splice=False)
    try:
        data = os.urandom(MiB)
        send_until_full(line.app, data)
        wait_readable(line.near)
        assert line.flow.step(readable=True) == WANT_WRITE
        pending, unread, sent = line.flow.pending, unread_bytes(line.near), line.counter.copy
        assert pending and sent > 0  # the tail the destination would not take
        # Still full: the tail stays as it is, and nothing more is read from the source.
        assert line.flow.step() == WANT_WRITE
        assert line.flow.pending == pending and unread_bytes(line.near) == unread
        assert line.counter.copy == sent
        # What was counted is exactly what was sent: the sink can read that much now.
        got = receive_available(line.sink)
        assert got == data[:sent]
    finally:
        line.close()


async def test_the_copy_path_delivers_a_whole_stream_and_then_the_fin():
    line = Line(tight=True, use_splice=False)
    try:
        data = os.urandom(512 << 10)
        got = line.pump(data, fin=True)
        assert line.flow.state == DONE
        got += read_to_eof(line.sink)  # fails if the FIN does not come
        assert digest(got) == digest(data)  # every byte, in order, before the FIN
        assert line.counter.copy == len(data) and line.counter.splice == 0
        assert line.stats.created == 0  # the copy path never takes a pipe
    finally:
        line.close()


async def test_an_unsupported_operation_falls_back_once_for_the_whole_connection(
    line: Line, monkeypatch: pytest.MonkeyPatch
):
    calls = []

    def refuse(*args: object, **kwargs: object) -> int:
        calls.append(args)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "splice", refuse)
    for chunk in (b"first", b"second", b"third"):
        line.app.send(chunk)
        wait_readable(line.near)
        assert line.flow.step(readable=True) == WANT_READ
        wait_readable(line.sink)
        assert receive_available(line.sink) == chunk
    assert len(calls) == 1  # asked once; after that the connection copies
    assert line.counter.copy == len(b"firstsecondthird") and line.counter.splice == 0
    assert line.flow.use_splice is False


@pytest.mark.skipif(not without_splice.supported(), reason="no seccomp filter for this machine")
async def test_a_kernel_that_refuses_splice_really_falls_back_to_copying(tmp_path: Path):
    # Why a child process: the seccomp filter that makes splice(2) fail with ENOSYS
    # cannot be taken off again, so it goes on a process of its own. Inside it the
    # flow sees the real kernel's refusal rather than a patched function.
    script = tmp_path / "refused.py"
    script.write_text(
        "import os, socket, trio\n"
        "from splicerelay.datapath.flow import Flow, PipePool\n"
        "from splicerelay.datapath.stats import ByteCounter, PipeStats\n"
        "async def main():\n"
        "    app, near = socket.socketpair()\n"
        "    far, sink = socket.socketpair()\n"
        "    for s in (near, far): s.setblocking(False)\n"
        "    stats, counter = PipeStats(), ByteCounter()\n"
        "    flow = Flow(near, far, PipePool(stats), 65536, counter)\n"
        "    app.sendall(b'x' * 1000)\n"
        "    flow.step(readable=True)\n"
        "    got = sink.recv(4096)\n"
        "    try:\n"
        "        os.splice(near.fileno(), os.pipe()[1], 1)\n"
        "    except OSError as error:\n"
        "        refusal = error.errno\n"
        "    print(len(got), counter.copy, counter.splice, flow.use_splice, refusal)\n"
        "trio.run(main)\n"
    )
    child = subprocess.run(
        [sys.executable, "-m", "tests.support.without_splice", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["1000", "1000", "0", "False", str(errno.ENOSYS)]


async def test_the_two_directions_of_a_connection_count_apart():
    client_app, client_side = tcp_pair()
    upstream_side, upstream_app = tcp_pair()
    stats = PipeStats()
    pool = PipePool(stats)
    to_upstream, to_client = ByteCounter(), ByteCounter()
    outbound = Flow(client_side, upstream_side, pool, PIPE_SIZE, to_upstream)
    inbound = Flow(upstream_side, client_side, pool, PIPE_SIZE, to_client)
    outbound.reverse, inbound.reverse = inbound, outbound
    try:
        client_app.send(b"GET / HTTP/1.0\r\n\r\n")
        wait_readable(client_side)
        outbound.step(readable=True)
        wait_readable(upstream_app)
        assert receive_available(upstream_app) == b"GET / HTTP/1.0\r\n\r\n"
        upstream_app.send(b"HTTP/1.0 200 OK\r\n\r\nhello")
        wait_readable(upstream_side)
        inbound.step(readable=True)
        wait_readable(client_app)
        assert receive_available(client_app) == b"HTTP/1.0 200 OK\r\n\r\nhello"
        assert (to_upstream.splice, to_client.splice) == (18, 24)
        assert (outbound.moved, inbound.moved) == (18, 24)
        assert to_upstream.copy == to_client.copy == 0
        assert stats.created == 1  # one pipe served both directions in turn
    finally:
        outbound.release_pipe()
        inbound.release_pipe()
        pool.close()
        for sock in (client_app, client_side, upstream_side, upstream_app):
            sock.close()
