"""When the access log writes: a reactor round writes a full write's worth, the timer
the rest within FLUSH_INTERVAL (trio's MockClock), and close() what is left."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO

import pytest
import trio
import trio.testing

from splicerelay.ops.access_log import ROUND_FLUSH_BYTES, AccessLog
from splicerelay.ops.access_output import FLUSH_INTERVAL


@pytest.fixture
def stdout() -> Iterator[tuple[int, IO[str]]]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    stream = os.fdopen(write_fd, "w")
    yield read_fd, stream
    stream.close()
    os.close(read_fd)


def read_lines(fd: int) -> list[str]:
    try:
        return os.read(fd, 1 << 20).decode().splitlines()
    except BlockingIOError:
        return []


def write_one(log: AccessLog, n: int) -> None:
    log.write("web", f"127.0.0.1:{n}", "127.0.0.1:8000", n, n, 0.001, "completed")


def test_a_round_writes_only_once_a_full_write_is_waiting(
    stdout: tuple[int, IO[str]],
) -> None:
    read_fd, stream = stdout
    log = AccessLog()
    log.configure(True, "json", {}, stream=stream)
    try:
        write_one(log, 1)
        log.flush_round()
        assert read_lines(read_fd) == []  # one line: left to the timer
        count = 1
        while count * 200 < ROUND_FLUSH_BYTES:
            count += 1
            write_one(log, count)
        log.flush_round()
        assert len(read_lines(read_fd)) == count
    finally:
        log.close()


async def test_the_timer_writes_a_lone_line_within_the_flush_interval(
    autojump_clock: trio.testing.MockClock, stdout: tuple[int, IO[str]]
) -> None:
    read_fd, stream = stdout
    log = AccessLog()
    log.configure(True, "text", {}, stream=stream)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.keep_flushing)
            await trio.sleep(1)
            started = trio.current_time()
            write_one(log, 1)
            while not (lines := read_lines(read_fd)):
                await trio.sleep(0.001)
            assert trio.current_time() - started == pytest.approx(FLUSH_INTERVAL, abs=0.002)
            assert "route=web" in lines[0]
            nursery.cancel_scope.cancel()
    finally:
        log.close()


def test_close_writes_what_is_left(stdout: tuple[int, IO[str]]) -> None:
    read_fd, stream = stdout
    log = AccessLog()
    log.configure(True, "json", {}, stream=stream)
    write_one(log, 1)
    log.close()
    assert len(read_lines(read_fd)) == 1
    write_one(log, 2)  # after close: nowhere to go, and no error
    assert log.dropped == 0
