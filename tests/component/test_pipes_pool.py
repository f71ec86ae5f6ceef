"""Kernel pipes and their pool: sizes, refusals, the idle stacks and the gauges.

Real pipes throughout. The one staged thing is EPERM from F_SETPIPE_SZ: it comes from
`fs.pipe-user-pages-soft`, which a process with CAP_SYS_RESOURCE (root, as the tests may
run) never meets. The kernel's own refusal of a size it cannot round is real.
Async only because closing a pipe goes through trio (notify_closing).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket

import pytest

from splicerelay.datapath.flow import DONE, WANT_READ, WANT_WRITE, Flow, PipePool, open_pipe
from splicerelay.datapath.stats import ByteCounter, PipeStats
from tests.support.scripted import (
    fd_is_open,
    receive_available,
    send_until_full,
    shrink_send_buffer,
    tcp_pair,
    wait_readable,
)

KiB = 1 << 10
MiB = 1 << 20


async def test_a_new_pipe_is_grown_to_the_size_asked_for():
    stats = PipeStats()
    pipe = open_pipe(MiB, stats)
    try:
        assert pipe.capacity == MiB
        assert fcntl.fcntl(pipe.write_fd, fcntl.F_GETPIPE_SZ) == MiB
        # Non-blocking both ends: a flow must never block on its own pipe.
        assert os.get_blocking(pipe.read_fd) is False
        assert os.get_blocking(pipe.write_fd) is False
        assert (stats.created, stats.closed, stats.resize_failures) == (1, 0, 0)
    finally:
        pipe.close()


async def test_a_size_the_kernel_refuses_keeps_the_default_pipe_and_is_counted():
    stats = PipeStats()
    # Why this size: the kernel cannot round anything past 2 GiB to a page count and
    # says EINVAL, whoever asks (a real refusal, unlike EPERM, which root never sees).
    pipe = open_pipe((1 << 31) + 1, stats)
    try:
        default = fcntl.fcntl(pipe.write_fd, fcntl.F_GETPIPE_SZ)
        assert pipe.capacity == default < MiB
        assert stats.resize_failures == 1 and stats.created == 1
        os.write(pipe.write_fd, b"still a pipe")
        assert os.read(pipe.read_fd, 100) == b"still a pipe"
    finally:
        pipe.close()


@pytest.fixture
def past_the_soft_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """New pipes behave as past `fs.pipe-user-pages-soft`: two pages, and EPERM on
    F_SETPIPE_SZ. The pipes are real; only the kernel's verdict is staged."""
    tiny = 2 * os.sysconf("SC_PAGE_SIZE")
    real_pipe2, real_fcntl = os.pipe2, fcntl.fcntl

    def pipe2(flags: int) -> tuple[int, int]:
        read_fd, write_fd = real_pipe2(flags)
        real_fcntl(write_fd, fcntl.F_SETPIPE_SZ, tiny)
        return read_fd, write_fd

    def refusing_fcntl(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETPIPE_SZ:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(os, "pipe2", pipe2)
    monkeypatch.setattr(fcntl, "fcntl", refusing_fcntl)
    return tiny


async def test_past_the_soft_limit_a_tiny_pipe_still_carries_the_whole_stream(
    past_the_soft_limit: int,
):
    stats = PipeStats()
    pool = PipePool(stats)
    counter = ByteCounter()
    client_app, client_side = tcp_pair()
    upstream_side, upstream_app = tcp_pair()
    flow = Flow(client_side, upstream_side, pool, MiB, counter)
    data = os.urandom(256 * KiB)
    sent = 0
    got = bytearray()
    try:
        for _ in range(10_000):
            if sent < len(data):
                sent += send_until_full(client_app, data[sent:])
                if sent == len(data):
                    client_app.shutdown(socket.SHUT_WR)  # the FIN follows the last byte
            state = flow.step(eager=True, readable=True)
            got += receive_available(upstream_app)
            if state == DONE:
                break
        got += receive_available(upstream_app)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
        assert stats.resize_failures == 1 and stats.created == 1
        [pipe] = pool.stack_for(MiB)
        assert pipe.capacity == past_the_soft_limit
        assert counter.splice == len(data) and counter.copy == 0
    finally:
        flow.release_pipe()
        pool.close()
        for sock in (client_app, client_side, upstream_side, upstream_app):
            sock.close()


async def test_a_smaller_size_than_the_default_is_not_shrunk_to():
    stats = PipeStats()
    pipe = open_pipe(4 * KiB, stats)
    try:
        assert pipe.capacity == fcntl.fcntl(pipe.write_fd, fcntl.F_GETPIPE_SZ) >= 4 * KiB
        assert stats.resize_failures == 0
    finally:
        pipe.close()


async def test_the_gauges_follow_a_pipe_lent_and_given_back():
    """splicerelay_pipes{state} comes from these: open, idle and in_use."""
    stats = PipeStats()
    pool = PipePool(stats)
    stack = pool.stack_for(64 * KiB)
    pipe = pool.open(64 * KiB)
    assert (stats.open, stats.idle, stats.in_use) == (1, 0, 1)  # lent to a flow
    stack.append(pipe)
    assert (stats.open, stats.idle, stats.in_use) == (1, 1, 0)  # back, empty
    borrowed = stack.pop()
    assert borrowed is pipe and (stats.idle, stats.in_use) == (0, 1)
    pool.discard(borrowed)
    assert (stats.created, stats.closed, stats.open, stats.idle, stats.in_use) == (1, 1, 0, 0, 0)


async def test_each_pipe_size_has_a_stack_of_its_own():
    stats = PipeStats()
    pool = PipePool(stats)
    small, large = pool.stack_for(64 * KiB), pool.stack_for(MiB)
    assert small is not large
    assert pool.stack_for(64 * KiB) is small  # the same stack every time
    small.append(pool.open(64 * KiB))
    assert large == [] and stats.idle == 1
    assert stats.idle_stacks == {64 * KiB: small, MiB: large}  # what the collector reads
    pool.close()


async def test_a_discarded_pipe_has_both_ends_closed_and_forgotten():
    stats = PipeStats()
    pool = PipePool(stats)
    pipe = pool.open(64 * KiB)
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    pool.discard(pipe)
    assert not fd_is_open(read_fd) and not fd_is_open(write_fd)
    assert pipe.read_fd == pipe.write_fd == -1  # never closed twice by number
    assert stats.closed == 1


async def test_closing_the_pool_closes_every_idle_pipe_once():
    stats = PipeStats()
    pool = PipePool(stats)
    pipes = [pool.open(size) for size in (64 * KiB, 64 * KiB, MiB)]
    for pipe in pipes:
        pool.stack_for(pipe.capacity).append(pipe)
    fds = [fd for pipe in pipes for fd in (pipe.read_fd, pipe.write_fd)]
    pool.close()
    assert not any(fd_is_open(fd) for fd in fds)
    assert (stats.created, stats.closed, stats.open, stats.idle) == (3, 3, 0, 0)
    # A second close (shutdown after a failed start, say) finds nothing to close.
    reused = os.pipe()  # may take the numbers just freed: they must stay open
    pool.close()
    assert stats.closed == 3 and all(fd_is_open(fd) for fd in reused)
    for fd in reused:
        os.close(fd)


async def test_the_pool_caps_its_idle_pipes_per_size():
    """Room for one idle pipe: of two flows that each held one, the second closes its own."""
    stats = PipeStats()
    pool = PipePool(stats, max_idle=1)
    clients = [tcp_pair() for _ in range(2)]
    upstreams = [tcp_pair(rcvbuf=4096) for _ in range(2)]
    flows = []
    for (_, client_side), (upstream_side, _) in zip(clients, upstreams, strict=True):
        shrink_send_buffer(upstream_side)
        flows.append(Flow(client_side, upstream_side, pool, 64 * KiB, ByteCounter()))
    try:
        sent = []
        for (client_app, client_side), flow in zip(clients, flows, strict=True):
            sent.append(send_until_full(client_app, os.urandom(MiB)))
            wait_readable(client_side)
            assert flow.step(readable=True) == WANT_WRITE  # holding bytes in its own pipe
        assert (stats.created, stats.in_use, stats.idle) == (2, 2, 0)
        for flow, (_, upstream_app), total in zip(flows, upstreams, sent, strict=True):
            got = 0
            for _ in range(10_000):
                got += len(receive_available(upstream_app))
                if flow.step() == WANT_READ and got + flow.held == total:
                    break
            assert flow.pipe is None
        assert len(pool.stack_for(64 * KiB)) == 1
        assert (stats.created, stats.closed, stats.open, stats.idle) == (2, 1, 1, 1)
    finally:
        pool.close()
        for pair in (*clients, *upstreams):
            for sock in pair:
                sock.close()
