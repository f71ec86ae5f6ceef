"""Route options that work now: connect timeout, idle timeout, limits, allow/deny,
pipe size, and listeners on IPv6 and unix sockets. All on real loopback sockets."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import trio

from tests.support.harness import free_port, poll_until, relay_config
from tests.support.peers import (
    Transfer,
    blackholed_listener,
    close_blackhole,
    connect,
    echo,
    expected_transfer,
    receive_all,
    round_trip,
    send_payload,
    start_server,
)

MiB = 1 << 20


async def test_connect_timeout_fails_over_from_a_blackholed_upstream(relay_factory):
    hole, fillers = blackholed_listener()
    try:
        async with trio.open_nursery() as nursery:
            live_port = await start_server(nursery, echo)
            listen_port = free_port()
            hole_port = hole.getsockname()[1]
            relay = await relay_factory.astart(
                relay_config(
                    listen_port, hole_port, live_port, extra="    connect_timeout: 300ms\n"
                )
            )
            started = time.monotonic()
            # The first connection is sent to the blackholed upstream first.
            assert await round_trip(listen_port, b"ping") == b"ping"
            elapsed = time.monotonic() - started
            nursery.cancel_scope.cancel()
    finally:
        close_blackhole(hole, fillers)
    assert 0.25 < elapsed < 2.0
    errors = relay.metrics().get(
        "splicerelay_upstream_connect_errors_total",
        upstream=f"127.0.0.1:{hole_port}",
        reason="timeout",
    )
    assert errors == 1


async def test_idle_connection_is_closed_after_idle_timeout(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(listen_port, upstream_port, extra="    idle_timeout: 400ms\n")
        )
        stream = await connect(listen_port)
        # Traffic keeps it open past the timeout...
        for _ in range(6):
            await trio.sleep(0.1)
            await stream.send_all(b"x")
            assert await stream.receive_some(10) == b"x"
        # ...and silence closes it.
        started = time.monotonic()
        with trio.fail_after(5):
            rest = await receive_all(stream)
        idle_for = time.monotonic() - started
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert rest.count == 0
    assert 0.35 < idle_for < 2.0
    assert relay.metrics().get("splicerelay_connections_total", outcome="idle_timeout") == 1


async def test_at_max_connections_new_clients_wait_in_the_backlog(relay_factory):
    served = 0

    async def counting_echo(stream: trio.SocketStream) -> None:
        nonlocal served
        served += 1
        await echo(stream)

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, counting_echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(listen_port, upstream_port, extra="    max_connections: 2\n")
        )
        first = await connect(listen_port)
        second = await connect(listen_port)
        third = await connect(listen_port)  # completes in the kernel's backlog
        await third.send_all(b"third")
        await third.send_eof()
        with trio.fail_after(5):
            while served < 2:
                await trio.sleep(0.01)
        # Bounded look for a state that must not happen: the third is not accepted.
        await trio.sleep(0.3)
        assert served == 2
        assert relay.metrics().get("splicerelay_connections_active") == 2
        await first.aclose()
        with trio.fail_after(5):
            reply = await receive_all(third)
        assert reply.count == len(b"third")
        for stream in (second, third):
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert served == 3


async def test_denied_client_is_closed_before_any_upstream_connect(relay_factory):
    served = 0

    async def counting_echo(stream: trio.SocketStream) -> None:
        nonlocal served
        served += 1
        await echo(stream)

    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, counting_echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(
                listen_port,
                upstream_port,
                extra="    allow: [127.0.0.0/8]\n    deny: [127.0.0.1/32]\n",
            )
        )
        with trio.fail_after(5):
            try:
                reply = await round_trip(listen_port, b"hello")
            except trio.BrokenResourceError:
                reply = b""  # closed with our bytes unread: the kernel answers with RST
        assert reply == b""
        nursery.cancel_scope.cancel()
    assert served == 0
    metrics = relay.metrics()
    assert metrics.get("splicerelay_connections_total", outcome="denied") == 1
    assert metrics.get("splicerelay_connections_total", outcome="completed") == 0


async def test_allowed_client_is_relayed(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        await relay_factory.astart(
            relay_config(listen_port, upstream_port, extra="    allow: [127.0.0.0/8, '::1/128']\n")
        )
        assert await round_trip(listen_port, b"hello") == b"hello"
        nursery.cancel_scope.cancel()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_listener_relays_to_ipv4_upstream(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port("::1")
        config = relay_config(listen_port, upstream_port).replace(
            f"listen: 127.0.0.1:{listen_port}", f"listen: '[::1]:{listen_port}'"
        )
        relay = await relay_factory.astart(config)
        assert await round_trip(listen_port, b"over v6" * 1000, host="::1") == b"over v6" * 1000
        nursery.cancel_scope.cancel()
    assert relay.metrics().get("splicerelay_bytes_total", path="splice") == 2 * 7000


async def test_unix_socket_listener_and_upstream_are_spliced(relay_factory, tmp_path: Path):
    size = 3 * MiB + 1
    got = {}
    upstream_path = tmp_path / "upstream.sock"
    listen_path = tmp_path / "relay.sock"

    async def upstream(stream: trio.SocketStream) -> None:
        got["upstream"] = await receive_all(stream)
        await send_payload(stream, seed=61, total=size)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        server = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await server.bind(str(upstream_path))
        server.listen()
        listener = trio.SocketListener(server)
        nursery.start_soon(trio.serve_listeners, upstream, [listener])
        config = (
            "metrics: {listen: '127.0.0.1:{metrics_port}'}\n"
            "log: {format: json}\n"
            "routes:\n"
            "  - name: local\n"
            f"    listen: unix:{listen_path}\n"
            "    upstreams:\n"
            f"      - address: unix:{upstream_path}\n"
        )
        relay = await relay_factory.astart(config)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(str(listen_path))
        stream = trio.SocketStream(client)
        await send_payload(stream, seed=60, total=size)
        await stream.send_eof()
        got["client"] = await receive_all(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert got["upstream"] == expected_transfer(60, size)
    assert got["client"] == expected_transfer(61, size)
    metrics = relay.metrics()
    assert metrics.get("splicerelay_bytes_total", path="splice") == 2 * size
    assert metrics.get("splicerelay_bytes_total", path="copy") == 0


def read_int(path: str) -> int:
    with open(path) as file:
        return int(file.read())


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root and setpriv to drop to nobody",
)
async def test_refused_pipe_resize_is_survived_and_counted(relay_factory):
    """Unprivileged, a pipe larger than fs.pipe-max-size is refused with EPERM.

    The relay keeps the default-sized pipe, counts the refusal, and relays intact.
    """
    size = 16 * MiB + 3
    requested = 4 * read_int("/proc/sys/fs/pipe-max-size")
    config_dir = Path(tempfile.mkdtemp(prefix="splicerelay-"))
    config_dir.chmod(0o755)
    got = {}

    async def upstream(stream: trio.SocketStream) -> None:
        got["upstream"] = await receive_all(stream)
        await send_payload(stream, seed=71, total=size)
        await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            upstream_port = await start_server(nursery, upstream)
            listen_port = free_port()
            relay = await relay_factory.astart(
                relay_config(
                    listen_port, upstream_port, extra=f"    pipe_size: {requested // 1024}KiB\n"
                ),
                prefix=["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"],
                config_dir=config_dir,
            )
            stream = await connect(listen_port)
            await send_payload(stream, seed=70, total=size)
            await stream.send_eof()
            got["client"] = await receive_all(stream)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(config_dir)
    assert got["upstream"] == expected_transfer(70, size)
    assert got["client"] == expected_transfer(71, size)

    def counted() -> bool:
        return relay.metrics().get("splicerelay_connections_total", outcome="completed") == 1

    await trio.to_thread.run_sync(poll_until, counted, 5, "the connection to be counted")
    metrics = relay.metrics()
    assert metrics.get("splicerelay_pipe_resize_failures_total") >= 1
    assert metrics.get("splicerelay_bytes_total", path="splice") == 2 * size


@pytest.mark.parametrize(
    ("client", "allow", "deny", "allowed"),
    [
        ("10.1.2.3", [], [], True),
        ("10.1.2.3", ["10.0.0.0/8"], [], True),
        ("11.1.2.3", ["10.0.0.0/8"], [], False),
        ("10.1.2.3", ["10.0.0.0/8"], ["10.1.0.0/16"], False),
        ("2001:db8::5", ["2001:db8::/32"], [], True),
        ("2001:db9::5", ["2001:db8::/32"], [], False),
        ("::1", ["127.0.0.0/8"], [], False),
        ("::ffff:10.1.2.3", ["10.0.0.0/8"], [], True),  # v4-mapped is matched as IPv4
        ("::ffff:10.1.2.3", [], ["10.1.2.3/32"], False),
    ],
)
def test_allow_and_deny_lists(client: str, allow: list[str], deny: list[str], allowed: bool):
    import ipaddress

    from splicerelay.relay.routes import is_allowed

    assert (
        is_allowed(
            client,
            [ipaddress.ip_network(net) for net in allow],
            [ipaddress.ip_network(net) for net in deny],
        )
        is allowed
    )


async def test_max_connections_per_source_limits_one_address_not_others(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(listen_port, upstream_port, extra="    max_connections_per_source: 2\n")
        )
        held = [await connect(listen_port), await connect(listen_port)]
        for stream in held:
            await stream.send_all(b"x")
            assert await stream.receive_some(1) == b"x"
        # A third from the same address is turned away at once...
        with trio.fail_after(5):
            try:
                third = await round_trip(listen_port, b"third")
            except trio.BrokenResourceError:
                third = b""
        assert third == b""
        # ...while another address on the loopback network is served.
        other = trio.socket.socket()
        await other.bind(("127.0.0.2", 0))
        await other.connect(("127.0.0.1", listen_port))
        stream = trio.SocketStream(other)
        await stream.send_all(b"other")
        await stream.send_eof()
        assert await receive_all(stream) == expected_echo(b"other")
        await stream.aclose()
        # When one of the two closes, the address may connect again.
        await held.pop().aclose()

        def slot_free() -> bool:
            return relay.metrics().get("splicerelay_connections_active") == 1

        await trio.to_thread.run_sync(poll_until, slot_free, 5, "the slot to free")
        assert await round_trip(listen_port, b"again") == b"again"
        for stream in held:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert relay.metrics().get("splicerelay_connections_total", outcome="source_limit") == 1


def expected_echo(data: bytes) -> Transfer:
    import hashlib

    return Transfer(len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_upstream_is_spliced(relay_factory):
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="::1"))
        upstream_port = listeners[0].socket.getsockname()[1]
        listen_port = free_port()
        config = relay_config(listen_port, upstream_port).replace(
            f"address: 127.0.0.1:{upstream_port}", f"address: '[::1]:{upstream_port}'"
        )
        relay = await relay_factory.astart(config)
        payload = b"to a v6 upstream " * 4096
        assert await round_trip(listen_port, payload) == payload
        nursery.cancel_scope.cancel()
    metrics = relay.metrics()
    assert metrics.get("splicerelay_bytes_total", path="splice") == 2 * len(payload)
    assert metrics.get("splicerelay_upstream_up", upstream=f"[::1]:{upstream_port}") == 1
