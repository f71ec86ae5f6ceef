"""The access log's buffer and writes: bounded, never blocking, whole lines, all written.

Real pipes and socketpairs stand for stdout, filled on purpose to stand for a stalled
journald or a reader that went away.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Iterator

import pytest

from splicerelay.ops.access_output import PIPE_BUF, AccessOutput, Output


def line(n: int, size: int = 100) -> str:
    text = f"line {n} "
    return text + "x" * (size - len(text) - 1) + "\n"


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    # The smallest pipe the kernel makes (one page): filled in a few writes.
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_lines_are_written_at_flush_not_before(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    buffer = AccessOutput(Output(write_fd))
    buffer.add(line(1))
    buffer.add(line(2))
    assert read_available(read_fd) == b""
    buffer.flush()
    assert read_available(read_fd) == (line(1) + line(2)).encode()
    assert buffer.pending == 0
    buffer.close()


def test_a_pipe_gets_its_own_non_blocking_description(pipe: tuple[int, int]) -> None:
    _read_fd, write_fd = pipe
    output = Output(write_fd)
    try:
        assert output.fd != write_fd
        assert os.get_blocking(write_fd)  # the shared stdout is left as it was
        assert not os.get_blocking(output.fd)
        assert stat.S_ISFIFO(os.fstat(output.fd).st_mode)
        assert output.chunk == PIPE_BUF
    finally:
        output.close()


def test_a_full_pipe_neither_blocks_nor_loses_lines_under_the_bound(
    pipe: tuple[int, int],
) -> None:
    read_fd, write_fd = pipe
    buffer = AccessOutput(Output(write_fd), limit=64 * 1024)
    sent = [line(n) for n in range(200)]  # 20 KB into a 4 KiB pipe
    for text in sent:
        buffer.add(text)
    buffer.flush()  # returns although the pipe is full
    assert 0 < buffer.pending < 20_000
    received = b""
    for _ in range(100):
        received += read_available(read_fd)
        buffer.flush()
        if not buffer.pending:
            break
    received += read_available(read_fd)
    assert received.decode() == "".join(sent)
    assert buffer.dropped == 0
    buffer.close()


def test_writes_to_a_pipe_are_whole_lines_of_at_most_pipe_buf(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe

    class Recording(Output):
        def __init__(self) -> None:
            super().__init__(write_fd)
            self.writes: list[bytes] = []

        def write(self, data: memoryview) -> int:
            taken = super().write(data)
            if taken:
                self.writes.append(bytes(data[:taken]))
            return taken

    output = Recording()
    buffer = AccessOutput(output)
    for n in range(30):
        buffer.add(line(n, 300))
    for _ in range(100):
        buffer.flush()
        read_available(read_fd)
        if not buffer.pending:
            break
    assert buffer.pending == 0
    assert len(output.writes) >= 3
    for write in output.writes:
        assert len(write) <= PIPE_BUF
        assert write.endswith(b"\n")
    buffer.close()


def test_past_the_bound_lines_are_dropped_counted_and_said_once_per_burst(
    pipe: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    read_fd, write_fd = pipe
    buffer = AccessOutput(Output(write_fd), limit=10_000)
    caplog.set_level(logging.WARNING, logger="splicerelay")
    for n in range(300):  # 30 KB: the pipe takes 4 KiB, the buffer 10 KB
        buffer.add(line(n))
        buffer.flush()
    assert buffer.pending <= 10_000
    assert buffer.dropped > 150
    dropping = [r for r in caplog.records if "not taking lines" in r.getMessage()]
    assert len(dropping) == 1
    dropped_in_burst = buffer.dropped

    # The reader catches up: the burst ends, said once with its count.
    for _ in range(100):
        read_available(read_fd)
        buffer.flush()
        if not buffer.pending:
            break
    ended = [r for r in caplog.records if "takes lines again" in r.getMessage()]
    assert len(ended) == 1
    assert ended[0].fields == {"dropped": dropped_in_burst}  # type: ignore[attr-defined]

    # A second burst is said again.
    for n in range(300):
        buffer.add(line(n))
        buffer.flush()
    dropping = [r for r in caplog.records if "not taking lines" in r.getMessage()]
    assert len(dropping) == 2
    buffer.close(timeout=0)


def test_a_reader_that_went_away_costs_the_lines_not_an_error(
    pipe: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    read_fd, write_fd = pipe
    buffer = AccessOutput(Output(write_fd))
    os.close(read_fd)
    caplog.set_level(logging.WARNING, logger="splicerelay")
    for n in range(3):
        buffer.add(line(n))
    buffer.flush()  # EPIPE: no exception
    buffer.add(line(4))
    buffer.flush()
    assert buffer.dropped == 4
    said = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(said) == 1
    buffer.close()


def test_close_waits_a_bounded_time_for_a_stalled_output(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    buffer = AccessOutput(Output(write_fd))
    for n in range(100):  # 10 KB into a 4 KiB pipe nobody reads
        buffer.add(line(n))
    now = [0.0]

    def clock() -> float:
        now[0] += 0.01
        return now[0]

    buffer.close(timeout=0.05, clock=clock)
    assert 0 < buffer.dropped < 100
    written = read_available(read_fd).decode()
    assert written.count("\n") + buffer.dropped == 100


def test_close_writes_everything_to_an_output_that_keeps_up(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    buffer = AccessOutput(Output(write_fd))
    for n in range(1000):
        buffer.add(line(n))
    buffer.close()
    assert read_available(read_fd).decode() == "".join(line(n) for n in range(1000))
    assert buffer.dropped == 0


def test_a_socket_is_written_with_msg_dontwait_and_left_blocking() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        buffer = AccessOutput(Output(ours.fileno()), limit=1 << 20)
        for n in range(2000):  # 200 KB: far more than the socket buffers hold
            buffer.add(line(n))
        buffer.flush()  # would block forever on a blocking send
        assert ours.getblocking()
        assert buffer.pending > 0
        theirs.setblocking(False)
        received = b""
        for _ in range(1000):
            with contextlib.suppress(BlockingIOError):
                received += theirs.recv(1 << 16)
            buffer.flush()
            if not buffer.pending:
                break
        theirs.setblocking(True)
        buffer.close()
        while received.count(b"\n") < 2000:
            received += theirs.recv(1 << 16)
        assert received.decode() == "".join(line(n) for n in range(2000))


def test_a_regular_file_is_appended_to(tmp_path: pytest.TempPathFactory) -> None:
    path = os.path.join(str(tmp_path), "access.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        buffer = AccessOutput(Output(fd))
        buffer.add(line(1))
        buffer.flush()
        buffer.add(line(2))
        buffer.close()
    finally:
        os.close(fd)
    with open(path) as file:
        assert file.read() == line(1) + line(2)


def test_epipe_is_what_a_gone_reader_gives() -> None:
    # (The premise of the test above: Python ignores SIGPIPE, so a write gets EPIPE.)
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with pytest.raises(OSError) as raised:
        os.write(write_fd, b"x")
    os.close(write_fd)
    assert raised.value.errno == errno.EPIPE
