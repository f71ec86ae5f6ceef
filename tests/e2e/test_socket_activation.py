"""Socket activation with systemd-socket-activate: the relay serves a passed socket only
where its config says, or by `listen: systemd:NAME`, says where it really listens, and
refuses to start on a socket that disagrees with its config or is not a listening stream
socket at all.

The passed sockets listen on 127.0.0.2 where a test needs an address other than the one
the config names (127.0.0.1): every 127/8 address is loopback on Linux.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.support.harness import Relay, RelayFactory, free_port, poll_until, relay_config
from tests.support.peers import connect, echo, start_server
from tests.support.service import can_connect, connect_when_listening

OTHER_LOOPBACK = "127.0.0.2"
EXIT_TIMEOUT = 15.0


def activate_command() -> str:
    path = shutil.which("systemd-socket-activate")
    if path is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    return path


def web_config(listen: str, upstream_port: int, workers: int = 1) -> str:
    """A route named web on `listen`, relaying to 127.0.0.1:`upstream_port`."""
    text = relay_config(1, upstream_port).replace("name: test", "name: web")
    text = text.replace("listen: 127.0.0.1:1\n", f"listen: {listen}\n")
    return f"workers: {workers}\n" + text


def run_refused(
    command: list[str],
    trigger: Callable[[], None],
    tmp_path: Path,
    config: str,
    pass_fds: tuple[int, ...] = (),
) -> tuple[int, str]:
    """Run `command` + `splicerelay run -c` on `config`, call `trigger` (the first
    connection that systemd-socket-activate waits for), and return the exit code and
    stderr of a relay that must refuse to start."""
    path = tmp_path / "relay.yaml"
    path.write_text(config.replace("{metrics_port}", str(free_port())))
    relay = [sys.executable, "-m", "splicerelay", "run", "-c", str(path)]
    with subprocess.Popen(
        command + relay,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    ) as process:
        try:
            trigger()
            _stdout, stderr = process.communicate(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            _stdout, stderr = process.communicate()
            pytest.fail(f"the relay did not refuse to start; it logged:\n{stderr}")
        finally:
            if process.poll() is None:
                process.kill()
    return process.returncode, stderr


def error_lines(stderr: str) -> list[str]:
    return [
        json.loads(line)["message"]
        for line in stderr.splitlines()
        if line.startswith("{") and json.loads(line)["level"] == "error"
    ]


def first_connection(port: int, host: str = OTHER_LOOPBACK) -> Callable[[], None]:
    def trigger() -> None:
        connect_when_listening(port, host).close()

    return trigger


def ready_routes(relay: Relay, message: str = "ready") -> dict[str, str]:
    for line in relay.stderr().splitlines():
        if line.startswith("{") and json.loads(line)["message"] == message:
            routes: dict[str, str] = json.loads(line)["routes"]
            return routes
    raise AssertionError(f"no {message!r} line in:\n{relay.stderr()}")


async def start_activated(
    relay_factory: RelayFactory, config: str, port: int, *extra: str
) -> tuple[Relay, socket.socket]:
    """The relay under systemd-socket-activate on 127.0.0.2:`port`, passed as "web",
    and the first connection, which started it."""
    first: list[socket.socket] = []
    relay = await relay_factory.astart(
        config,
        prefix=[activate_command(), "-l", f"{OTHER_LOOPBACK}:{port}", "--fdname=web", *extra],
        after_launch=lambda: first.append(connect_when_listening(port, OTHER_LOOPBACK)),
    )
    return relay, first[0]


async def exchange(stream: trio.SocketStream, message: bytes) -> None:
    await stream.send_all(message)
    await stream.send_eof()
    reply = b""
    while chunk := await stream.receive_some(100):
        reply += chunk
    await stream.aclose()
    assert reply == message


async def exchanges_through(port: int, first: socket.socket, count: int) -> None:
    await exchange(trio.SocketStream(trio.socket.from_stdlib_socket(first)), b"first")
    for index in range(count):
        await exchange(await connect(port, OTHER_LOOPBACK), b"exchange %d" % index)


def completed(relay: Relay) -> float:
    return relay.metrics().get(
        "splicerelay_connections_total", default=0.0, route="web", outcome="completed"
    )


# ----- refused at start -------------------------------------------------------------------


def test_a_passed_socket_bound_elsewhere_than_the_listen_is_refused(tmp_path: Path) -> None:
    """Before, the socket's name won: the relay served 127.0.0.2 and said 127.0.0.1."""
    port = free_port()
    code, stderr = run_refused(
        [activate_command(), "-l", f"{OTHER_LOOPBACK}:{port}", "--fdname=web"],
        first_connection(port),
        tmp_path,
        web_config(f"127.0.0.1:{port}", free_port()),
    )
    assert code == 1
    assert error_lines(stderr) == [
        f"route web: systemd passed the socket 'web' (fd 3) bound to {OTHER_LOOPBACK}:{port},"
        f" but the route's listen is 127.0.0.1:{port}; make them agree, or write"
        " `listen: systemd:web` to take whatever systemd passes as 'web'"
    ]
    assert "Traceback" not in stderr
    assert not can_connect(port)  # nor did it bind the configured address itself


def test_a_datagram_socket_is_refused(tmp_path: Path) -> None:
    port = free_port()

    def udp_port_taken() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return True
        return False

    def datagram() -> None:
        # A datagram sent before the launcher binds the port would be lost.
        poll_until(udp_port_taken, 10, f"UDP port {port} to be bound")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"wake up", ("127.0.0.1", port))

    code, stderr = run_refused(
        [activate_command(), "--datagram", "-l", f"127.0.0.1:{port}", "--fdname=web"],
        datagram,
        tmp_path,
        web_config(f"127.0.0.1:{port}", free_port()),
    )
    assert code == 1
    assert error_lines(stderr) == [
        "route web: fd 3 passed by systemd as 'web' is a datagram socket (AF_INET), not a"
        " listening stream socket (AF_INET, AF_INET6 or AF_UNIX); check the socket unit:"
        " ListenStream= and Accept=no"
    ]
    assert "Traceback" not in stderr


def test_a_pipe_passed_as_a_socket_is_refused(tmp_path: Path) -> None:
    """LISTEN_FDS naming a pipe (a broken launcher): before, Python's socket() raised."""
    read_end, write_end = os.pipe()
    # This launcher puts the pipe at fd 3, names itself in LISTEN_PID and becomes the relay.
    launcher = (
        "import os, sys;"
        "os.dup2(int(sys.argv[1]), 3);"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='web');"
        "os.execv(sys.argv[2], sys.argv[2:])"
    )
    try:
        code, stderr = run_refused(
            [sys.executable, "-c", launcher, str(read_end)],
            lambda: None,
            tmp_path,
            web_config("systemd:web", free_port()),
            pass_fds=(read_end,),
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert code == 1
    assert error_lines(stderr) == [
        "route web: fd 3 passed by systemd as 'web' is a pipe, not a listening stream socket"
        " (AF_INET, AF_INET6 or AF_UNIX); check the socket unit: ListenStream= and Accept=no"
    ]
    assert "Traceback" not in stderr


def test_a_systemd_listen_without_a_passed_socket_is_refused(tmp_path: Path) -> None:
    code, stderr = run_refused([], lambda: None, tmp_path, web_config("systemd:web", free_port()))
    assert code == 1
    assert error_lines(stderr) == [
        "route web: listen is systemd:web, but systemd passed no socket (LISTEN_FDS is not"
        " set for this process); name the socket with FileDescriptorName=web in its socket unit"
    ]


# ----- serving ----------------------------------------------------------------------------


async def test_listen_systemd_serves_the_passed_socket_and_says_where(
    relay_factory: RelayFactory,
) -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        relay, first = await start_activated(
            relay_factory, web_config("systemd:web", upstream_port), port
        )
        assert ready_routes(relay) == {"web": f"{OTHER_LOOPBACK}:{port} (systemd:web)"}
        await exchanges_through(port, first, 5)
        nursery.cancel_scope.cancel()
    poll_until(lambda: completed(relay) == 6, 10, "6 completed connections")
    assert not can_connect(port)  # only 127.0.0.2, where systemd bound it


async def test_a_passed_socket_on_the_listen_address_serves(relay_factory: RelayFactory) -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        relay, first = await start_activated(
            relay_factory, web_config(f"{OTHER_LOOPBACK}:{port}", upstream_port), port
        )
        assert ready_routes(relay) == {"web": f"{OTHER_LOOPBACK}:{port}"}
        await exchanges_through(port, first, 3)
        nursery.cancel_scope.cancel()
    poll_until(lambda: completed(relay) == 4, 10, "4 completed connections")


async def test_workers_serve_a_systemd_listen(relay_factory: RelayFactory) -> None:
    """The supervisor hands the socket on under its systemd name, and each worker takes
    it by that name as the supervisor did."""
    port = free_port()
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        relay, first = await start_activated(
            relay_factory, web_config("systemd:web", upstream_port, workers=2), port
        )

        def both_workers_ready() -> bool:
            return relay.stderr().count('"message": "worker ready"') == 2

        await trio.to_thread.run_sync(poll_until, both_workers_ready, 15, "2 workers ready")
        where = {"web": f"{OTHER_LOOPBACK}:{port} (systemd:web)"}
        assert ready_routes(relay, "worker ready") == where
        # The supervisor's own "ready" line comes once both workers are ready.
        await trio.to_thread.run_sync(
            poll_until, lambda: '"message": "ready"' in relay.stderr(), 10, "ready"
        )
        assert ready_routes(relay) == where
        await exchanges_through(port, first, 6)
        nursery.cancel_scope.cancel()
    poll_until(lambda: completed(relay) == 7, 10, "7 completed connections")


# ----- reloads ----------------------------------------------------------------------------


async def test_a_reload_that_moves_an_activated_route_is_refused(
    relay_factory: RelayFactory,
) -> None:
    """Before, the reload bound the new address and left systemd's socket listening with
    nobody accepting on it."""
    port, new_port = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen = f"{OTHER_LOOPBACK}:{port}"
        relay, first = await start_activated(relay_factory, web_config(listen, upstream_port), port)
        relay.config_path.write_text(
            relay.config_path.read_text().replace(
                f"listen: {listen}", f"listen: 127.0.0.1:{new_port}"
            )
        )
        relay.process.send_signal(signal.SIGHUP)

        def refused() -> bool:
            metrics = relay.metrics()
            return metrics.get("splicerelay_config_reloads_total", result="failure") == 1

        await trio.to_thread.run_sync(poll_until, refused, 10, "the refused reload")
        assert "a reload cannot change that to 127.0.0.1:" in relay.stderr()
        assert not can_connect(new_port)
        await exchanges_through(port, first, 2)
        nursery.cancel_scope.cancel()
    poll_until(lambda: completed(relay) == 3, 10, "3 completed connections")
