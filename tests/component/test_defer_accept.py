"""TCP_DEFER_ACCEPT on the real listening sockets, read back with getsockopt: on where
a route's `defer_accept` says so, off where it does not, across reloads that keep the
listener, on a worker's copy of its supervisor's listener, and never changed on a
socket the service manager passed.

The relay runs in process on loopback; the passed sockets are real listening sockets
standing for what systemd passes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from splicerelay.bench.procs import free_port
from splicerelay.config import parse_config
from splicerelay.datapath.stats import RelayStats
from splicerelay.ops.systemd import PassedSocket
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.listeners import (
    DEFER_ACCEPT_SECONDS,
    ListenerSet,
    Role,
    defer_accept_of,
    set_defer_accept,
)
from splicerelay.relay.routes import RouteRuntime, StartupError, prepare_routes
from tests.support.fakes import build_relay, route_config, serving

UPSTREAM = "    upstreams: [{address: 127.0.0.1:9}]\n"


def route(name: str, listen: str, defer_accept: bool | None = None) -> str:
    setting = "" if defer_accept is None else f"    defer_accept: {str(defer_accept).lower()}\n"
    return f"  - name: {name}\n    listen: {listen}\n{UPSTREAM}{setting}"


def listener_of(relay: Relay | list[RouteRuntime], name: str) -> socket.socket:
    runtimes = relay.runtimes if isinstance(relay, Relay) else relay
    return next(runtime.listener for runtime in runtimes if runtime.route.name == name)


def close(sock: socket.socket) -> None:
    sock.close()


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    """Sockets the test made (passed ones, a busy port), closed after it."""
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def tcp_listener(held: list[socket.socket], *, defer_accept: int = 0) -> socket.socket:
    sock = socket.socket()
    held.append(sock)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    if defer_accept:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
    return sock


def test_the_kernel_rounds_the_seconds_to_syn_ack_retransmissions(
    held: list[socket.socket],
) -> None:
    """What DEFER_ACCEPT_SECONDS's comment says: 1 reads back 1, 5 reads back 7."""
    sock = tcp_listener(held)
    set_defer_accept(sock, True)
    assert defer_accept_of(sock) == DEFER_ACCEPT_SECONDS == 1
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
    assert defer_accept_of(sock) == 7
    set_defer_accept(sock, False)
    assert defer_accept_of(sock) == 0


async def test_on_where_the_config_says_and_off_where_it_does_not(tmp_path: Path) -> None:
    text = route_config(
        route("deferred", f"127.0.0.1:{free_port()}", True),
        route("plain", f"127.0.0.1:{free_port()}", False),
        route("unset", f"127.0.0.1:{free_port()}"),
        route("v6", f"'[::1]:{free_port()}'", True),
        route("local", f"unix:{tmp_path}/local.sock", False),
    )
    relay, _ = build_relay(text)
    async with serving(relay):
        assert defer_accept_of(listener_of(relay, "deferred")) == DEFER_ACCEPT_SECONDS
        assert defer_accept_of(listener_of(relay, "plain")) == 0
        assert defer_accept_of(listener_of(relay, "unset")) == 0
        assert defer_accept_of(listener_of(relay, "v6")) == DEFER_ACCEPT_SECONDS
        assert listener_of(relay, "local").family == socket.AF_UNIX


async def test_defaults_turn_it_on_and_a_route_turns_it_off() -> None:
    text = route_config(
        route("web", f"127.0.0.1:{free_port()}"),
        route("ssh", f"127.0.0.1:{free_port()}", False),
        top="defaults: {defer_accept: true}\n",
    )
    relay, _ = build_relay(text)
    async with serving(relay):
        assert defer_accept_of(listener_of(relay, "web")) == DEFER_ACCEPT_SECONDS
        assert defer_accept_of(listener_of(relay, "ssh")) == 0


async def test_a_reload_that_keeps_the_listener_turns_it_on_and_off_again() -> None:
    listen = f"127.0.0.1:{free_port()}"
    relay, _ = build_relay(route_config(route("web", listen)))
    async with serving(relay):
        kept = listener_of(relay, "web")
        assert defer_accept_of(kept) == 0
        for on in (True, False, True):
            await relay.reload(parse_config(route_config(route("web", listen, on)), "r.yaml"))
            assert listener_of(relay, "web") is kept
            assert defer_accept_of(kept) == (DEFER_ACCEPT_SECONDS if on else 0)
        # Leaving the key out of the file turns it off too: the default is off.
        await relay.reload(parse_config(route_config(route("web", listen)), "r.yaml"))
        assert defer_accept_of(kept) == 0


async def test_a_refused_reload_leaves_the_kept_listeners_as_they_were(
    held: list[socket.socket],
) -> None:
    """The reload turns it on for a kept listener, but a later route's port is taken:
    the running config (off) still holds on the socket."""
    listen = f"127.0.0.1:{free_port()}"
    busy = tcp_listener(held).getsockname()[1]
    relay, _ = build_relay(route_config(route("web", listen)))
    async with serving(relay):
        kept = listener_of(relay, "web")
        text = route_config(route("web", listen, True), route("busy", f"127.0.0.1:{busy}"))
        with pytest.raises(StartupError, match="route busy: cannot listen"):
            await relay.reload(parse_config(text, "r.yaml"))
        assert listener_of(relay, "web") is kept
        assert defer_accept_of(kept) == 0


def test_a_worker_sets_it_on_the_listener_its_supervisor_bound(
    held: list[socket.socket],
) -> None:
    """A worker's copy is the supervisor's socket (not `kept`): the worker sets it, and
    every other copy of the socket sees the value, as the sibling workers' do."""
    sock = tcp_listener(held)
    sibling = socket.socket(fileno=socket.dup(sock.fileno()))
    held.append(sibling)
    listen = f"127.0.0.1:{sock.getsockname()[1]}"
    listeners = ListenerSet([PassedSocket(sock, "web", kept=False)], role=Role.WORKER)
    for on, seconds in ((True, DEFER_ACCEPT_SECONDS), (False, 0)):
        config = parse_config(route_config(route("web", listen, on)), "w.yaml")
        runtimes = prepare_routes(config, RelayStats(), listeners)
        assert listener_of(runtimes, "web") is sock
        assert defer_accept_of(sibling) == seconds


def test_a_passed_socket_keeps_what_its_socket_unit_set(held: list[socket.socket]) -> None:
    """DeferAcceptSec=5 in the unit (the kernel reads back 7): neither a route with
    defer_accept on nor one with it off changes it."""
    sock = tcp_listener(held, defer_accept=5)
    listen = f"127.0.0.1:{sock.getsockname()[1]}"
    listeners = ListenerSet([PassedSocket(sock, "web")])
    for on in (True, False):
        config = parse_config(route_config(route("web", listen, on)), "p.yaml")
        assert listener_of(prepare_routes(config, RelayStats(), listeners), "web") is sock
        assert defer_accept_of(sock) == 7


def test_a_passed_socket_left_off_by_its_unit_is_left_off(held: list[socket.socket]) -> None:
    sock = tcp_listener(held)
    listen = f"127.0.0.1:{sock.getsockname()[1]}"
    listeners = ListenerSet([PassedSocket(sock, "web")])
    config = parse_config(route_config(route("web", listen, False)), "p.yaml")
    prepare_routes(config, RelayStats(), listeners)
    assert defer_accept_of(sock) == 0


def test_on_for_a_passed_socket_whose_unit_left_it_off_is_refused(
    held: list[socket.socket],
) -> None:
    sock = tcp_listener(held)
    listen = f"127.0.0.1:{sock.getsockname()[1]}"
    listeners = ListenerSet([PassedSocket(sock, "web")])
    config = parse_config(route_config(route("web", listen, True)), "p.yaml")
    with pytest.raises(StartupError) as caught:
        prepare_routes(config, RelayStats(), listeners)
    assert str(caught.value) == (
        f"route web: defer_accept is true, but the socket systemd passed for {listen}"
        " does not defer accept: set DeferAcceptSec= in its socket unit (the relay leaves"
        " a passed socket's options as the unit set them), or defer_accept: false"
    )
    assert defer_accept_of(sock) == 0
    assert sock.fileno() >= 0  # not closed: systemd owns it
