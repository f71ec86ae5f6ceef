"""`defer_accept` seen from outside a real relay process: with it on, a client that
connects and stays silent does not make the relay connect upstream, and one that sends
bytes gets through at once; with it off, even a silent client's upstream connection is
made at once. Also across SIGHUP reloads that keep the listener, and with workers; and
a socket passed by socket activation keeps what its unit set (DeferAcceptSec=).

How the looks are bounded: the relay sets TCP_DEFER_ACCEPT to 1 s, which the kernel
holds a silent connection for before it hands it over all the same (see
relay/listeners.py). So "not upstream" is a look of 0.5 s, well inside that second,
and "at once" is within 0.9 s of the connect, before the kernel's timer would have let
a silent client through anyway: a relay that deferred where it should not fails it.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.harness import Relay, RelayFactory, free_port, poll_until

SILENT_LOOK = 0.5  # well inside the kernel's 1 s of deferring
AT_ONCE = 0.9  # before the kernel would hand a silent connection over anyway
BOUND = 10.0


@pytest.fixture
def held() -> Iterator[ExitStack]:
    """Every socket the test opens (upstreams, clients, accepted), closed after it."""
    with ExitStack() as stack:
        yield stack


def upstream(held: ExitStack) -> socket.socket:
    sock = held.enter_context(socket.socket())
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def route(name: str, listen_port: int, upstream_sock: socket.socket, defer: bool | None) -> str:
    setting = "" if defer is None else f"    defer_accept: {str(defer).lower()}\n"
    return (
        f"  - name: {name}\n"
        f"    listen: 127.0.0.1:{listen_port}\n"
        f"    upstreams: [{{address: 127.0.0.1:{port(upstream_sock)}}}]\n"
        f"{setting}"
    )


def relay_config(*routes: str, workers: int = 1) -> str:
    return (
        f"workers: {workers}\n"
        "metrics: {listen: 127.0.0.1:{metrics_port}}\n"
        "log: {level: info, format: json, access_log: true}\n"
        "shutdown_timeout: 5s\n"
        "routes:\n" + "".join(routes)
    )


def connect(held: ExitStack, listen_port: int) -> socket.socket:
    return held.enter_context(socket.create_connection(("127.0.0.1", listen_port), timeout=BOUND))


def accepted_within(
    listener: socket.socket, seconds: float, held: ExitStack
) -> socket.socket | None:
    """The connection the relay made to upstream `listener` within `seconds`, or None."""
    ready, _, _ = select.select([listener], [], [], max(0.0, seconds))
    if not ready:
        return None
    return held.enter_context(listener.accept()[0])


def is_paired(conn: socket.socket, client: socket.socket, token: bytes) -> bool:
    """Whether upstream connection `conn` is `client`'s: a token sent on it comes out
    of the client (not of an earlier client the kernel let through late)."""
    conn.sendall(token)
    return client.recv(len(token)) == token


def silent_clients_are_held_back(
    held: ExitStack, listen_port: int, up: socket.socket, count: int = 1
) -> None:
    """`count` silent clients do not reach the upstream within the look; the kernel
    still hands each of them to the relay later (about a second after its handshake),
    and those connections are taken here, so that the next look starts clean."""
    for _ in range(count):
        connect(held, listen_port)
    assert accepted_within(up, SILENT_LOOK, held) is None, "a silent client reached the upstream"
    for index in range(count):
        arrived = accepted_within(up, BOUND, held)
        assert arrived is not None, f"silent client {index} was never let through"


def speaking_client_gets_through_at_once(
    held: ExitStack, listen_port: int, up: socket.socket
) -> None:
    started = time.monotonic()
    client = connect(held, listen_port)
    client.sendall(b"PING\r\n")
    conn = accepted_within(up, started + AT_ONCE - time.monotonic(), held)
    assert conn is not None, "a client that spoke was not relayed at once"
    assert conn.recv(6) == b"PING\r\n"
    assert is_paired(conn, client, b"+PONG\r\n")


def silent_client_gets_through_at_once(
    held: ExitStack, listen_port: int, up: socket.socket
) -> None:
    started = time.monotonic()
    client = connect(held, listen_port)
    conn = accepted_within(up, started + AT_ONCE - time.monotonic(), held)
    assert conn is not None, "a silent client was held back"
    assert is_paired(conn, client, b"banner\r\n")


def reload(relay: Relay, text: str, count: int) -> None:
    relay.config_path.write_text(text.replace("{metrics_port}", str(relay.metrics_port)))
    relay.process.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        return relay.metrics().get("splicerelay_config_reloads_total", result="success") == count

    poll_until(reloaded, BOUND, f"reload number {count}")


def test_a_silent_client_reaches_the_upstream_only_where_defer_accept_is_off(
    relay_factory: RelayFactory, held: ExitStack
) -> None:
    deferred_up, plain_up = upstream(held), upstream(held)
    deferred, plain = free_port(), free_port()
    relay_factory.start(
        relay_config(
            route("deferred", deferred, deferred_up, True),
            route("plain", plain, plain_up, None),
        )
    )
    silent_clients_are_held_back(held, deferred, deferred_up)
    speaking_client_gets_through_at_once(held, deferred, deferred_up)
    silent_client_gets_through_at_once(held, plain, plain_up)
    held.close()


def test_a_reload_turns_it_on_and_off_on_the_kept_listener(
    relay_factory: RelayFactory, held: ExitStack
) -> None:
    up, listen = upstream(held), free_port()
    relay = relay_factory.start(relay_config(route("web", listen, up, None)))
    silent_client_gets_through_at_once(held, listen, up)
    reload(relay, relay_config(route("web", listen, up, True)), 1)
    silent_clients_are_held_back(held, listen, up)
    speaking_client_gets_through_at_once(held, listen, up)
    reload(relay, relay_config(route("web", listen, up, False)), 2)
    silent_client_gets_through_at_once(held, listen, up)
    held.close()


def test_every_worker_defers_on_shared_listeners_and_on_ones_a_reload_adds(
    relay_factory: RelayFactory, held: ExitStack
) -> None:
    """With workers: 2 the supervisor binds the listener and every worker accepts from
    that one socket; a listener a reload adds is one SO_REUSEPORT socket per worker, and
    the kernel spreads clients over them by a hash, so several clients reach both."""
    up, added_up = upstream(held), upstream(held)
    listen, added = free_port(), free_port()
    first = route("web", listen, up, True)
    relay = relay_factory.start(relay_config(first, workers=2))
    silent_clients_are_held_back(held, listen, up, count=6)
    speaking_client_gets_through_at_once(held, listen, up)
    reload(relay, relay_config(first, route("added", added, added_up, True), workers=2), 1)
    silent_clients_are_held_back(held, added, added_up, count=6)
    speaking_client_gets_through_at_once(held, added, added_up)
    held.close()


# ----- a socket passed by socket activation ----------------------------------------------

# Puts the socket at fd 3, names itself in LISTEN_PID and becomes the relay, as systemd
# does; systemd-socket-activate cannot set DeferAcceptSec=, so the test sets it itself.
LAUNCHER = (
    "import os, sys;"
    "os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1]));"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='web');"
    "os.execv(sys.executable, [sys.executable, '-m', 'splicerelay', 'run', '-c', sys.argv[2]])"
)


def activated(
    held: ExitStack, tmp_path: Path, sock: socket.socket, text: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """The relay started on `text` with `sock` passed to it, its config and its stderr."""
    config, stderr_path = tmp_path / "relay.yaml", tmp_path / "relay.err"
    config.write_text(text.replace("{metrics_port}", str(free_port())))
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(sock.fileno()), str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=(sock.fileno(),),
        )
    held.callback(stop, process)
    return process, config, stderr_path


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=BOUND)


def log_lines(stderr_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr_path.read_text().splitlines() if line[:1] == "{"]


def logged(stderr_path: Path, message: str) -> list[dict[str, object]]:
    return [line for line in log_lines(stderr_path) if line["message"] == message]


def logged_errors(stderr_path: Path) -> list[dict[str, object]]:
    return [line for line in log_lines(stderr_path) if line["level"] == "error"]


def passed_listener(held: ExitStack, defer_accept_seconds: int) -> socket.socket:
    sock = upstream(held)  # a listening socket on loopback, as a socket unit makes one
    if defer_accept_seconds:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept_seconds)
    return sock


def test_a_passed_socket_keeps_the_deferral_its_unit_set(held: ExitStack, tmp_path: Path) -> None:
    """DeferAcceptSec=5 in the unit (the kernel reads back 7): a route that says off,
    and a reload to on, leave it so."""
    sock, up = passed_listener(held, 5), upstream(held)
    text = relay_config(route("web", port(sock), up, False))
    process, config, stderr_path = activated(held, tmp_path, sock, text)
    poll_until(lambda: bool(logged(stderr_path, "ready")), BOUND, "the relay to be ready")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 7
    config.write_text(config.read_text().replace("defer_accept: false", "defer_accept: true"))
    process.send_signal(signal.SIGHUP)
    poll_until(lambda: bool(logged(stderr_path, "config reloaded")), BOUND, "the reload")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 7
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=BOUND) == 0


def test_on_for_a_passed_socket_its_unit_did_not_defer_is_refused(
    held: ExitStack, tmp_path: Path
) -> None:
    sock, up = passed_listener(held, 0), upstream(held)
    text = relay_config(route("web", port(sock), up, True))
    process, _, stderr_path = activated(held, tmp_path, sock, text)
    assert process.wait(timeout=BOUND) == 1
    errors = [line["message"] for line in logged_errors(stderr_path)]
    assert errors == [
        f"route web: defer_accept is true, but the socket systemd passed for"
        f" 127.0.0.1:{port(sock)} does not defer accept: set DeferAcceptSec= in its socket"
        " unit (the relay leaves a passed socket's options as the unit set them), or"
        " defer_accept: false"
    ]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
