"""The control socket in process, over real unix sockets in a short temporary directory.

Timeouts run on trio's MockClock with autojump where the test is about a deadline: the
socket waits (in the kernel) count as blocked, so the clock jumps to the deadline and the
moment a client is cut off is exact. The peer check against another uid is in
tests/e2e/test_control_peercred.py; here the allowed uids are set to exclude ours.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import random
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from splicerelay.protocol.control import (
    HELP,
    MAX_LINE_LENGTH,
    Command,
    CommandError,
    CommandFailed,
    KillConnection,
    Reload,
    Reply,
    ShowConnections,
    ShowInfo,
    ShowRoutes,
    ShowUpstreams,
    error_reply,
    ok_reply,
)
from splicerelay.relay.control_client import (
    ControlClientError,
    ControlNotRunning,
    ControlTimeout,
    command_line,
    send_command,
    send_command_async,
)
from splicerelay.relay.control_socket import (
    ControlLimits,
    ControlServer,
    ControlSocketError,
    Handler,
    bind_control_socket,
    serve_control_socket,
)
from tests.support.control import (
    WAIT,
    Recorder,
    read_all,
    read_replies,
    read_reply,
    socket_dir,
)
from tests.support.fakes import open_fds


@pytest.fixture
def path() -> Iterator[str]:
    with socket_dir() as directory:
        yield str(directory / "control.sock")


@contextlib.asynccontextmanager
async def serving(
    path: str, handler: Handler | None = None, **options: Any
) -> AsyncIterator[ControlServer]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(serve_control_socket, path, handler or Recorder(), **options)
        )
        yield server
        nursery.cancel_scope.cancel()


async def ask(path: str, data: bytes) -> list[Reply]:
    """Send `data`, close our side, and read every reply until the server closes."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        try:
            await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            # A server that refuses a peer answers and closes before reading anything,
            # so our send may meet a closed socket: its reply is still there to read.
            pass
        return await read_replies(stream)


def dead_socket_file(path: str) -> None:
    """What a crashed relay leaves: a socket file that nothing listens on any more."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(path)
        gone.listen()


# -- the socket file ------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o177, 0o277])
def test_the_socket_file_is_mode_0600_whatever_the_umask(path: str, umask: int) -> None:
    old = os.umask(umask)
    try:
        listener = bind_control_socket(path)
    finally:
        os.umask(old)
    try:
        found = os.lstat(path)
        assert stat.S_ISSOCK(found.st_mode)
        assert stat.S_IMODE(found.st_mode) == 0o600
        assert found.st_uid == os.geteuid()
    finally:
        listener.close()
    assert not os.path.exists(path)


async def test_a_stale_socket_file_is_replaced(path: str) -> None:
    dead_socket_file(path)
    os.link(path, path + ".old")  # holds the inode, so that a new file has another
    stale = os.lstat(path).st_ino
    async with serving(path):
        assert os.lstat(path).st_ino != stale
        assert await ask(path, b"show info\n") == [ok_reply({"ran": "show info"})]


async def test_a_live_control_socket_is_not_stolen(path: str) -> None:
    recorder = Recorder()
    async with serving(path, recorder), trio.open_nursery() as nursery:
        mine = os.lstat(path).st_ino
        with pytest.raises(ControlSocketError, match="is in use by another running relay"):
            await nursery.start(serve_control_socket, path, Recorder())
        assert os.lstat(path).st_ino == mine
        assert await ask(path, b"show routes\n") == [ok_reply({"ran": "show routes"})]
    assert recorder.commands == [ShowRoutes()]


def test_a_listener_with_a_full_backlog_is_live_too(path: str) -> None:
    # A unix connect fails with EAGAIN, not ECONNREFUSED, when the backlog is full.
    with contextlib.ExitStack() as stack:
        other = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        other.bind(path)
        other.listen(0)
        for _ in range(64):
            filler = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            filler.setblocking(False)
            try:
                filler.connect(path)
            except BlockingIOError:
                break
        else:
            raise AssertionError("the backlog never filled")
        with pytest.raises(ControlSocketError, match="in use by another running relay"):
            bind_control_socket(path)
        assert os.path.exists(path)


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_something_that_is_not_a_socket_is_an_error_and_left_alone(path: str, kind: str) -> None:
    if kind == "file":
        with open(path, "w") as out:
            out.write("keep me")
    elif kind == "directory":
        os.mkdir(path)
    else:
        dead_socket_file(path + ".real")
        os.symlink(path + ".real", path)
    with pytest.raises(ControlSocketError, match="a file that is not a socket is there"):
        bind_control_socket(path)
    assert os.path.lexists(path)
    if kind == "file":
        with open(path) as kept:
            assert kept.read() == "keep me"


def test_the_directory_must_exist(path: str) -> None:
    missing = os.path.join(os.path.dirname(path), "missing", "control.sock")
    with pytest.raises(ControlSocketError, match="does not exist"):
        bind_control_socket(missing)


def test_a_path_too_long_for_a_unix_socket_is_an_error(path: str) -> None:
    with pytest.raises(ControlSocketError, match="cannot create the control socket"):
        bind_control_socket(os.path.join(os.path.dirname(path), "x" * 120))


async def test_the_file_is_removed_at_exit_but_only_while_it_is_ours(path: str) -> None:
    async with serving(path):
        pass
    assert not os.path.lexists(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newer:
        async with serving(path):
            os.unlink(path)
            newer.bind(path)  # another relay took the path meanwhile
            theirs = os.lstat(path).st_ino
        assert os.lstat(path).st_ino == theirs


# -- lines and replies ----------------------------------------------------------------


async def test_every_line_gets_one_reply_in_order(path: str) -> None:
    recorder = Recorder()
    async with serving(path, recorder):
        replies = await ask(path, b"show info\nbogus\n\nhelp\r\nshow upstreams web")
    assert [reply.ok for reply in replies] == [True, False, False, True, True]
    assert replies[0].data == {"ran": "show info"}
    assert "unknown command 'bogus'" in (replies[1].error or "")
    assert "empty command" in (replies[2].error or "")
    assert replies[3].data == list(HELP)  # answered by the socket itself
    assert replies[4].data == {"ran": "show upstreams web"}  # the last line, without "\n"
    assert recorder.commands == [ShowInfo(), ShowUpstreams("web")]


async def test_a_line_of_exactly_max_line_length_is_a_command(path: str) -> None:
    head = b"show upstreams "
    line = head + b"r" * (MAX_LINE_LENGTH - len(head) - 1) + b"\n"
    recorder = Recorder()
    async with serving(path, recorder):
        replies = await ask(path, line + b"show info\n")
    assert [reply.ok for reply in replies] == [True, True]
    assert recorder.commands[0] == ShowUpstreams("r" * (MAX_LINE_LENGTH - len(head) - 1))


@pytest.mark.parametrize("then", [b"", b"\nshow info\n"], ids=["no-newline", "newline-after"])
async def test_a_line_over_max_line_length_gets_an_error_and_is_closed(
    path: str, then: bytes
) -> None:
    recorder = Recorder()
    async with serving(path, recorder) as server:
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(b"show upstreams " + b"x" * MAX_LINE_LENGTH + then)
            replies = await read_replies(stream)  # no send_eof: the server closes
    assert replies == [error_reply(f"line too long: more than {MAX_LINE_LENGTH} bytes; closing")]
    assert recorder.commands == []
    assert server.statistics().too_long == 1


async def test_garbage_gets_error_replies_and_the_connection_stays_usable(path: str) -> None:
    async with serving(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            for garbage in [b"\xff\xfe\x00\n", b"\x1b[2J\x07\n", b"show\tinfo\x00\r\n", b"\r\n"]:
                await stream.send_all(garbage)
                reply = await read_reply(stream)
                assert not reply.ok
            await stream.send_all(b"show info\n")
            assert await read_reply(stream) == ok_reply({"ran": "show info"})


async def test_random_bytes_get_one_reply_per_line(path: str) -> None:
    generator = random.Random(13)
    lines = [
        generator.randbytes(generator.randrange(200)).replace(b"\n", b"") + b"\n"
        for _ in range(300)
    ]
    async with serving(path) as server:
        replies = await ask(path, b"".join(lines))
        assert len(replies) == len(lines)
        assert server.statistics().internal_errors == 0
        assert await ask(path, b"show info\n") == [ok_reply({"ran": "show info"})]


# -- timeouts -------------------------------------------------------------------------


async def test_a_silent_client_is_cut_off_after_the_line_timeout(
    path: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(path) as server:
        stream = await trio.open_unix_socket(path)
        async with stream:
            start = trio.current_time()
            replies = await read_replies(stream, within=6 * WAIT)
            waited = trio.current_time() - start
        assert server.statistics().timed_out == 1
    assert replies == [error_reply("no complete command within 10s; closing")]
    assert 10.0 <= waited < 10.0 + 1e-6


async def test_a_client_trickling_one_byte_a_second_is_cut_off_by_the_same_deadline(
    path: str, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = Recorder()
    async with serving(path, recorder), trio.open_nursery() as nursery:
        stream = await trio.open_unix_socket(path)

        async def trickle() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for byte in b"show upstreams " + b"w" * 100:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(1)

        start = trio.current_time()
        nursery.start_soon(trickle)
        replies = await read_replies(stream, within=6 * WAIT)
        waited = trio.current_time() - start
        nursery.cancel_scope.cancel()
        await stream.aclose()
    assert replies == [error_reply("no complete command within 10s; closing")]
    assert 10.0 <= waited < 10.0 + 1e-6
    assert recorder.commands == []


async def test_the_deadline_is_for_each_line(
    path: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            for _ in range(3):  # 27 s in all, each line within its 10 s
                await trio.sleep(9)
                await stream.send_all(b"show info\n")
                assert (await read_reply(stream)).ok
            start = trio.current_time()
            replies = await read_replies(stream, within=6 * WAIT)
            assert trio.current_time() - start == pytest.approx(10.0)
    assert replies == [error_reply("no complete command within 10s; closing")]


async def test_a_client_that_does_not_read_its_replies_is_cut_off(
    path: str, autojump_clock: trio.testing.MockClock
) -> None:
    async def big(command: Command) -> object:
        return "x" * (1 << 20)  # more than a unix socket's buffers hold

    async with serving(path, big) as server:
        stream = await trio.open_unix_socket(path)
        async with stream:
            start = trio.current_time()
            await stream.send_all(b"show info\n" * 3)
            with trio.fail_after(6 * WAIT):
                while not server.statistics().timed_out:
                    await trio.sleep(0.5)
            assert 10.0 <= trio.current_time() - start <= 10.5
            assert server.statistics().clients == 0


# -- many clients ---------------------------------------------------------------------


async def test_100_clients_at_once_are_bounded_and_the_loop_stays_free(path: str) -> None:
    release = trio.Event()
    running = peak = 0

    async def slow(command: Command) -> object:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
            return "done"
        finally:
            running -= 1

    async def client() -> None:
        stream = await trio.open_unix_socket(path)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # busy: closed already
                await stream.send_all(b"show info\n")
                await stream.send_eof()
            replies.extend(await read_replies(stream))

    async def echo_meanwhile() -> None:
        # Other work on the same event loop, as the relay's data path is: it keeps
        # being served while the clients come and are held.
        left, right = trio.testing.memory_stream_pair()
        for _ in range(50):
            with trio.fail_after(2):
                await left.send_all(b"ping")
                assert await right.receive_some(4) == b"ping"
            await trio.sleep(0.005)

    replies: list[Reply] = []
    before = open_fds()
    async with serving(path, slow, limits=ControlLimits(max_clients=16)) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_meanwhile)
            for _ in range(100):
                nursery.start_soon(client)
            with trio.fail_after(WAIT):
                while not (running == 16 and len(replies) == 84):
                    await trio.sleep(0.01)
            release.set()
        statistics = server.statistics()
    assert peak == 16
    assert statistics.peak_clients == 16
    assert statistics.refused_busy == 84
    assert statistics.clients == 0
    busy = [reply for reply in replies if not reply.ok]
    assert len(busy) == 84
    assert all((reply.error or "").startswith("busy: 16 control clients") for reply in busy)
    assert [reply for reply in replies if reply.ok] == [ok_reply("done")] * 16
    assert open_fds() == before


async def test_accept_out_of_fds_backs_off_and_goes_on(
    path: str,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class OutOfFds:
        """The listener, with accept failing EMFILE the first `failures` times."""

        def __init__(self, real: socket.socket, failures: int) -> None:
            self.real, self.failures = real, failures

        def accept(self) -> tuple[socket.socket, Any]:
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return self.real.accept()

        def fileno(self) -> int:
            return self.real.fileno()

    listener = bind_control_socket(path)
    real = listener.sock
    listener.sock = OutOfFds(real, failures=3)  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="splicerelay"):
        monkeypatch.setattr(logging.getLogger("splicerelay"), "propagate", True)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(ControlServer(listener, Recorder()).serve)
                start = trio.current_time()
                assert await ask(path, b"show info\n") == [ok_reply({"ran": "show info"})]
                assert trio.current_time() - start == pytest.approx(0.3)
                nursery.cancel_scope.cancel()
        finally:
            listener.sock = real
            listener.close()
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["control socket: cannot accept: Too many open files"]  # once


# -- peers and handlers ---------------------------------------------------------------


async def test_a_uid_not_allowed_is_refused_before_anything_is_read(
    path: str,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    other = frozenset({os.geteuid() + 1})
    monkeypatch.setattr(logging.getLogger("splicerelay"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="splicerelay"):
        async with serving(path, recorder, allowed_uids=other) as server:
            start = trio.current_time()
            silent = await trio.open_unix_socket(path)
            async with silent:  # refused at once, without waiting for a line
                assert await read_all(silent) == (
                    b'{"ok":false,"error":"permission denied: uid %d may not use this'
                    b' control socket"}\n' % os.geteuid()
                )
            assert trio.current_time() == start
            replies = await ask(path, b"reload\nkill connection 1\n")
            assert server.statistics().refused_peers == 2
    assert [reply.error for reply in replies] == [
        f"permission denied: uid {os.geteuid()} may not use this control socket"
    ]
    assert recorder.commands == []
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1  # the second is held back by the rate limit
    assert f"refused a connection from uid {os.geteuid()} (pid {os.getpid()})" in warnings[0]


async def test_handler_errors_become_error_replies_and_the_server_goes_on(
    path: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def handler(command: Command) -> object:
        match command:
            case ShowUpstreams(route="nope"):
                raise CommandFailed("no route 'nope'; the routes are: web", {"routes": ["web"]})
            case KillConnection():
                raise RuntimeError("a bug in the handler")
            case ShowRoutes():
                return {"not json": object()}
            case ShowConnections():
                raise CommandFailed("refused, with data that is not JSON", {1.5j})
            case Reload():
                raise CommandError("refused by the handler")
            case _:
                return "fine"

    monkeypatch.setattr(logging.getLogger("splicerelay"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="splicerelay"):
        async with serving(path, handler) as server:
            replies = await ask(
                path,
                b"show upstreams nope\nkill connection 7\nshow routes\nshow connections\n"
                b"reload\nshow info\n",
            )
            assert server.statistics().internal_errors == 3
            assert await ask(path, b"show info\n") == [ok_reply("fine")]
    internal = error_reply("internal error: the relay's log has the details")
    assert replies == [
        error_reply("no route 'nope'; the routes are: web", {"routes": ["web"]}),
        internal,
        internal,
        internal,
        error_reply("refused by the handler"),
        ok_reply("fine"),
    ]
    failures = [record for record in caplog.records if record.exc_info]
    assert [record.getMessage() for record in failures] == [
        "control socket: the command 'kill connection 7' failed",
        "control socket: the command 'show routes' answered with data that is not JSON",
        "control socket: the command 'show connections' answered with data that is not JSON",
    ]
    changes = [record.getMessage() for record in caplog.records if not record.exc_info]
    assert changes == [
        f"control socket: kill connection 7 (from pid {os.getpid()}, uid {os.geteuid()})",
        f"control socket: reload (from pid {os.getpid()}, uid {os.geteuid()})",
    ]


# -- the clients ----------------------------------------------------------------------


async def test_the_clients_send_a_command_and_return_its_reply(path: str) -> None:
    async def handler(command: Command) -> object:
        if isinstance(command, Reload):
            raise CommandFailed("config refused", {"workers": {"1": "refused"}})
        return {"ran": type(command).__name__}

    async with serving(path, handler):
        assert await trio.to_thread.run_sync(send_command, path, "show info", WAIT) == ok_reply(
            {"ran": "ShowInfo"}
        )
        assert await send_command_async(path, KillConnection(3), WAIT) == ok_reply(
            {"ran": "KillConnection"}
        )
        refused = error_reply("config refused", {"workers": {"1": "refused"}})
        assert await trio.to_thread.run_sync(send_command, path, Reload(), WAIT) == refused
        assert await send_command_async(path, "reload", WAIT) == refused
        bad = await send_command_async(path, "show nothing")
        assert not bad.ok
        assert "unknown command 'show nothing'" in (bad.error or "")


async def test_the_clients_say_when_no_relay_answers(path: str) -> None:
    for where in (path, "/nonexistent/control.sock"):
        with pytest.raises(ControlNotRunning, match="is the relay running"):
            await send_command_async(where, "show info", WAIT)
        with pytest.raises(ControlNotRunning, match="is the relay running"):
            send_command(where, "show info", WAIT)
    dead_socket_file(path)
    with pytest.raises(ControlNotRunning, match="Connection refused"):
        send_command(path, "show info", WAIT)


async def test_the_async_client_times_out(
    path: str, autojump_clock: trio.testing.MockClock
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(path)
        mute.listen()  # connects succeed into the backlog; nobody ever answers
        start = trio.current_time()
        with pytest.raises(ControlTimeout, match="within 30s"):
            await send_command_async(path, "show info", 30)
        assert trio.current_time() - start == pytest.approx(30)


def test_the_blocking_client_times_out(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(path)
        mute.listen()
        with pytest.raises(ControlTimeout, match=r"within 0\.2s"):
            send_command(path, "show info", 0.2)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", "closed the connection without a reply"),
        (b'{"ok":tr', "closed the connection without a reply"),
        (b"hello\n", "answered something that is not a reply"),
    ],
)
async def test_the_clients_refuse_what_is_not_a_reply(
    path: str, answer: bytes, message: str
) -> None:
    async def serve_once(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        await stream.send_all(answer)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen()
        nursery.start_soon(trio.serve_listeners, serve_once, [trio.SocketListener(listener)])
        with pytest.raises(ControlClientError, match=message):
            await send_command_async(path, "show info", WAIT)
        with pytest.raises(ControlClientError, match=message):
            await trio.to_thread.run_sync(send_command, path, "show info", WAIT)
        nursery.cancel_scope.cancel()


def test_command_line_refuses_what_cannot_be_one_line() -> None:
    assert command_line("show info") == b"show info\n"
    assert command_line(ShowUpstreams("web")) == b"show upstreams web\n"
    with pytest.raises(ValueError, match="one command per line"):
        command_line("show info\nreload")
    with pytest.raises(ValueError, match="longer than"):
        command_line("x" * MAX_LINE_LENGTH)
