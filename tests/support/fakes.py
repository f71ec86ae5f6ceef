"""Fakes and an in-process rig for component tests of the relay.

The relay runs in the test's own trio run (so trio's MockClock drives its timers), on
real loopback sockets. Only what cannot be produced for real on demand is faked:
accept() failures (`ScriptedListener`) and the fd count (pass `count_fds`).
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import functools
import os
import select
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import trio

from splicerelay.bench.procs import free_port
from splicerelay.config import parse_config
from splicerelay.datapath.session import Session
from splicerelay.datapath.stats import RelayStats, RouteStats
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.admission import SocketListener
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.listeners import ListenerSet
from splicerelay.relay.routes import RouteRuntime, prepare_routes

# How long a test waits for a state, on trio's clock: under an autojumping MockClock a
# wait that would never end fails at once instead of at the per-test timeout.
WAIT_BOUND = 4 * 3600.0

# ----- accept() failures --------------------------------------------------------------


class ScriptedListener:
    """A real listening socket whose accept() first raises the scripted errnos.

    Each call is recorded with trio's clock: (time, what happened), what being an
    errno name, "accepted", or "empty" (BlockingIOError: nobody waiting).
    """

    def __init__(self, sock: socket.socket, errnos: Iterable[int]) -> None:
        self._real = SocketListener(sock)
        self.family = self._real.family
        self.script = list(errnos)
        self.calls: list[tuple[float, str]] = []

    def accept(self) -> tuple[_socket.socket, object]:
        now = trio.current_time()
        if self.script:
            code = self.script.pop(0)
            self.calls.append((now, errno.errorcode[code]))
            raise OSError(code, os.strerror(code))
        try:
            client = self._real.accept()
        except BlockingIOError:
            self.calls.append((now, "empty"))
            raise
        self.calls.append((now, "accepted"))
        return client

    async def wait_readable(self) -> None:
        await self._real.wait_readable()


class ScriptedListeners:
    """`Admission.listener_for` that scripts every route's listener the same way."""

    def __init__(self, *errnos: int) -> None:
        self.errnos = errnos
        self.made: list[ScriptedListener] = []

    def __call__(self, sock: socket.socket) -> ScriptedListener:
        listener = ScriptedListener(sock, self.errnos)
        self.made.append(listener)
        return listener


# ----- the relay in process -----------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """One connection's end, as the relay's access hook saw it."""

    time: float
    route: str
    outcome: str
    started: float
    client: str
    tls_error: str | None = None  # on a listener that routes by TLS ClientHello


class OutcomeLog:
    """The relay's access hook: records each connection's end, and lets tests wait."""

    def __init__(self) -> None:
        self.finished: list[Finished] = []
        self._changed = trio.Event()

    def __call__(self, runtime: RouteRuntime, session: Session, outcome: Outcome) -> None:
        self.finished.append(
            Finished(
                trio.current_time(),
                runtime.route.name,
                outcome.value,
                session.started,
                session.client_address,
                session.tls_error,
            )
        )
        self._changed.set()

    async def wait_for(self, count: int, within: float = WAIT_BOUND) -> list[Finished]:
        """The first `count` ends, once there are that many (`within` seconds of trio's
        clock, or TooSlowError)."""
        with trio.fail_after(within):
            while len(self.finished) < count:
                self._changed = trio.Event()
                await self._changed.wait()
        return self.finished[:count]


def route_config(*routes: str, top: str = "") -> str:
    """A config with `routes` (each the YAML of one list item, indented by 4) under it."""
    return "shutdown_timeout: 1s\n" + top + "routes:\n" + "".join(routes)


def one_route(upstream_port: int, extra: str = "", name: str = "web") -> str:
    """One route item on a free loopback port, to one upstream."""
    return (
        f"  - name: {name}\n"
        f"    listen: 127.0.0.1:{free_port()}\n"
        f"    upstreams: [{{address: 127.0.0.1:{upstream_port}}}]\n"
        f"{extra}"
    )


def build_relay(config_text: str, **options: object) -> tuple[Relay, OutcomeLog]:
    """A Relay for `config_text` with its listeners bound (clients may connect at once:
    they wait in the backlog until it serves) and an OutcomeLog as its access hook."""
    config = parse_config(config_text, "component.yaml")
    stats = RelayStats()
    listeners = ListenerSet()
    runtimes = prepare_routes(config, stats, listeners)
    outcomes = OutcomeLog()
    relay = Relay(config, runtimes, stats, listeners, access=outcomes, **options)
    return relay, outcomes


@contextlib.asynccontextmanager
async def serving(relay: Relay) -> AsyncIterator[Relay]:
    """Serve `relay` for the body of the `with`; then stop it and wait until it has."""
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        try:
            yield relay
        finally:
            relay.begin_shutdown()
            relay.stop_all_sessions()
            close_clients()


def port_of(relay: Relay, route: str = "web") -> int:
    runtime = next(r for r in relay.runtimes if r.route.name == route)
    return int(runtime.listener.getsockname()[1])


def route_stats(relay: Relay, route: str = "web") -> RouteStats:
    return relay.stats.routes[route]


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


# ----- peers ----------------------------------------------------------------------------


class Backend:
    """A loopback upstream that echoes, and records how each of its connections ended:
    "eof" (a FIN) or "reset"."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self.endings: list[str] = []
        self._changed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> Backend:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1")
        )
        self.port = int(listeners[0].socket.getsockname()[1])
        return self

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self._notify()
        ending = "eof"
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            ending = "reset"
        finally:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.aclose()
            self.endings.append(ending)
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool], within: float = WAIT_BOUND) -> None:
        with trio.fail_after(within):
            while not condition():
                await self._changed.wait()


# Every client opened, so that `serving` can close those a failed test left open: a
# socket left to the garbage collector would warn during some later test instead.
_clients: list[trio.SocketStream] = []


async def open_client(port: int, source: str | None = None) -> trio.SocketStream:
    """A client connection to 127.0.0.1:`port`, from address `source` if given."""
    sock = trio.socket.socket()
    try:
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    _clients.append(stream)
    return stream


def close_clients() -> None:
    for stream in _clients:
        stream.socket.close()
    _clients.clear()


async def receive(stream: trio.SocketStream, within: float = WAIT_BOUND) -> bytes:
    """What arrives next on `stream` (b"" at EOF), within a bound on trio's clock."""
    with trio.fail_after(within):
        return await stream.receive_some(65536)


async def round_trip(stream: trio.SocketStream, payload: bytes) -> bytes:
    """Send `payload` and read back as many bytes (through an echoing upstream)."""
    await stream.send_all(payload)
    received = b""
    while len(received) < len(payload):
        data = await receive(stream)
        if not data:
            break
        received += data
    return received


async def ending_of(stream: trio.SocketStream) -> str:
    """Read to the end: "eof" for a FIN, "reset" for an RST."""
    try:
        while await receive(stream):
            pass
    except trio.BrokenResourceError:
        return "reset"
    return "eof"


def has_nothing_to_read(stream: trio.SocketStream) -> bool:
    """Neither a byte nor an EOF is waiting on `stream` (the relay has not served it)."""
    readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
    return not readable
