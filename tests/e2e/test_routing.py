"""Routing for production, through the running relay: PROXY protocol against real nginx
and HAProxy, balancing strategies, health checks and limits."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path

import pytest
import trio

from splicerelay.protocol.proxy_protocol import encode_v1, encode_v2
from tests.support.harness import Relay, free_port, poll_until, refused_port, relay_config
from tests.support.peers import connect, echo, receive_all, start_server
from tests.support.real_peers import haproxy_sending_proxy_v2, nginx_proxy_echo


async def http_get(port: int, host: str = "127.0.0.1") -> tuple[str, tuple[str, int]]:
    """GET / through `port`; return the body and the client's own (address, port)."""
    stream = await connect(port, host)
    local = stream.socket.getsockname()
    try:
        await stream.send_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some(4096):
            response += chunk
    finally:
        await stream.aclose()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode().strip(), (local[0], local[1])


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_nginx_sees_the_real_client_through_proxy_protocol(
    relay_factory, tmp_path: Path, version: str
):
    with nginx_proxy_echo(tmp_path) as nginx_port:
        listen_port = free_port()
        await relay_factory.astart(
            relay_config(listen_port, nginx_port, extra=f"    proxy_protocol: {version}\n")
        )
        for _ in range(3):
            body, (client_ip, client_port) = await http_get(listen_port)
            assert body == f"{client_ip} {client_port}"


async def test_chain_haproxy_v2_to_relay_v1_to_nginx_keeps_the_original_client(
    relay_factory, tmp_path: Path
):
    with nginx_proxy_echo(tmp_path) as nginx_port:
        relay_port = free_port()
        relay = await relay_factory.astart(
            relay_config(
                relay_port,
                nginx_port,
                extra="    accept_proxy_protocol: true\n    proxy_protocol: v1\n",
            )
        )
        with haproxy_sending_proxy_v2(tmp_path, relay_port) as haproxy_port:
            for _ in range(3):
                body, (client_ip, client_port) = await http_get(haproxy_port)
                assert body == f"{client_ip} {client_port}"
    # The access log names the original client too, not HAProxy's connection.
    await wait_for_access_log(relay, f'"client": "{client_ip}:{client_port}"')


async def wait_for_access_log(relay: Relay, text: str) -> None:
    """The line is written as the connection closes, just after the client saw it end."""
    await trio.to_thread.run_sync(
        poll_until, lambda: text in relay.stdout(), 5, f"access log {text}"
    )


async def proxied_round_trip(port: int, prefix: bytes, payload: bytes) -> bytes | None:
    """Send `prefix` + `payload` and half-close; the reply, or None if reset."""
    stream = await connect(port)
    try:
        await stream.send_all(prefix + payload)
        await stream.send_eof()
        return (await receive_all_bytes(stream)) or b""
    except trio.BrokenResourceError:
        return None
    finally:
        await stream.aclose()


async def receive_all_bytes(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_proxy_header_garbage_missing_and_valid(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(
                listen_port,
                upstream_port,
                extra="    accept_proxy_protocol: true\n    proxy_protocol_timeout: 300ms\n",
            )
        )
        payload = b"the stream itself\r\n" * 1000
        with trio.fail_after(5):
            # Garbage instead of a header: closed, nothing relayed.
            assert not await proxied_round_trip(listen_port, b"GET / HTTP/1.1\r\n", payload)
            # No header at all, the client waits for the server to speak: cut at the timeout.
            stream = await connect(listen_port)
            started = time.monotonic()
            assert await receive_all(stream) is not None
            waited = time.monotonic() - started
            await stream.aclose()
            # A valid v1 header then the stream: relayed with the header stripped.
            header = encode_v1(("192.0.2.7", 40000), ("198.51.100.1", 443))
            assert await proxied_round_trip(listen_port, header, payload) == payload
            header = encode_v2(("2001:db8::7", 40001), ("2001:db8::1", 443))
            assert await proxied_round_trip(listen_port, header, payload) == payload
        nursery.cancel_scope.cancel()
    assert 0.25 < waited < 2.0
    metrics = relay.metrics()
    assert metrics.get("splicerelay_connections_total", outcome="bad_proxy_header") == 2
    assert metrics.get("splicerelay_connections_total", outcome="completed") == 2
    await wait_for_access_log(relay, '"client": "192.0.2.7:40000"')
    await wait_for_access_log(relay, '"client": "[2001:db8::7]:40001"')


async def test_proxy_header_address_is_used_for_allow_and_deny(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(
                listen_port,
                upstream_port,
                extra="    accept_proxy_protocol: true\n    deny: [192.0.2.0/24]\n",
            )
        )
        denied = encode_v1(("192.0.2.9", 1000), ("127.0.0.1", listen_port))
        allowed = encode_v1(("198.51.100.9", 1000), ("127.0.0.1", listen_port))
        with trio.fail_after(5):
            assert not await proxied_round_trip(listen_port, denied, b"hello")
            assert await proxied_round_trip(listen_port, allowed, b"hello") == b"hello"
        nursery.cancel_scope.cancel()
    assert relay.metrics().get("splicerelay_connections_total", outcome="denied") == 1


class Backends:
    """Several echo upstreams that count and hold their connections."""

    def __init__(self) -> None:
        self.served: Counter[int] = Counter()
        self.ports: list[int] = []

    async def start(self, nursery: trio.Nursery, count: int) -> list[int]:
        for _ in range(count):
            port_box: list[int] = []

            async def handler(stream: trio.SocketStream, box: list[int] = port_box) -> None:
                self.served[box[0]] += 1
                try:
                    await stream.send_all(str(box[0]).encode() + b"\n")
                    await echo(stream)
                except trio.BrokenResourceError:
                    pass  # a health check that hung up without reading the banner

            port = await start_server(nursery, handler)
            port_box.append(port)
            self.ports.append(port)
        return self.ports


async def which_backend(port: int, prefix: bytes = b"") -> int:
    """Open a connection, read which backend answered, and close it."""
    stream = await connect(port)
    try:
        if prefix:
            await stream.send_all(prefix)
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(64)
            if not chunk:
                raise AssertionError("closed before the backend spoke")
            line += chunk
        return int(line)
    finally:
        await stream.aclose()


def upstreams_yaml(ports: list[int], weights: list[int] | None = None) -> str:
    weights = weights or [1] * len(ports)
    return "".join(
        f"      - address: 127.0.0.1:{port}\n        weight: {weight}\n"
        for port, weight in zip(ports, weights, strict=True)
    )


def route_yaml(listen_port: int, upstreams: str, extra: str = "") -> str:
    return (
        "metrics: {listen: '127.0.0.1:{metrics_port}'}\n"
        "log: {level: info, format: json}\n"
        "routes:\n"
        "  - name: test\n"
        f"    listen: 127.0.0.1:{listen_port}\n"
        f"{extra}"
        "    upstreams:\n"
        f"{upstreams}"
    )


async def test_weighted_round_robin_gives_exact_shares(relay_factory):
    backends = Backends()
    async with trio.open_nursery() as nursery:
        ports = await backends.start(nursery, 3)
        listen_port = free_port()
        await relay_factory.astart(route_yaml(listen_port, upstreams_yaml(ports, [2, 1, 1])))
        picks = [await which_backend(listen_port) for _ in range(40)]
        nursery.cancel_scope.cancel()
    assert Counter(picks) == {ports[0]: 20, ports[1]: 10, ports[2]: 10}


async def test_least_connections_sends_new_clients_to_the_idle_upstream(relay_factory):
    backends = Backends()
    async with trio.open_nursery() as nursery:
        ports = await backends.start(nursery, 2)
        listen_port = free_port()
        relay = await relay_factory.astart(
            route_yaml(listen_port, upstreams_yaml(ports), extra="    balance: least_connections\n")
        )
        # Hold three connections open; they spread 2/1 or alternate.
        held = []
        for _ in range(3):
            stream = await connect(listen_port)
            assert (await stream.receive_some(64)).endswith(b"\n")
            held.append(stream)
        counts = Counter(backends.served)
        busier = max(ports, key=lambda port: counts[port])
        quieter = min(ports, key=lambda port: counts[port])
        assert counts[busier] == 2 and counts[quieter] == 1
        # The relay's own count of open connections per upstream agrees.
        metrics = await trio.to_thread.run_sync(relay.metrics)
        for port, expected in ((busier, 2), (quieter, 1)):
            active = metrics.get(
                "splicerelay_upstream_connections_active", upstream=f"127.0.0.1:{port}"
            )
            assert active == expected
        # The next one goes to the quieter upstream.
        assert await which_backend(listen_port) == quieter
        for stream in held:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_source_hash_keeps_each_client_on_one_upstream(relay_factory):
    backends = Backends()
    async with trio.open_nursery() as nursery:
        ports = await backends.start(nursery, 4)
        listen_port = free_port()
        await relay_factory.astart(
            route_yaml(
                listen_port,
                upstreams_yaml(ports),
                extra="    balance: source_hash\n    accept_proxy_protocol: true\n",
            )
        )
        # The client address the hash sees is the one in the PROXY header.
        clients = [f"198.51.100.{index}" for index in range(1, 41)]
        first = {}
        for client in clients:
            header = encode_v1((client, 5000), ("127.0.0.1", listen_port))
            first[client] = await which_backend(listen_port, header)
        for client in clients:
            header = encode_v1((client, 6000), ("127.0.0.1", listen_port))
            assert await which_backend(listen_port, header) == first[client]
        nursery.cancel_scope.cancel()
    # 40 clients over 4 upstreams: every upstream gets some.
    assert set(first.values()) == set(ports)


async def test_health_checks_take_a_dead_upstream_out_and_no_upstream_when_all_down(relay_factory):
    backends = Backends()
    async with trio.open_nursery() as nursery:
        ports = await backends.start(nursery, 1)
        dead = refused_port()
        listen_port = free_port()
        relay = await relay_factory.astart(
            route_yaml(
                listen_port,
                upstreams_yaml([dead, ports[0]]),
                extra="    health_check: {interval: 100ms, timeout: 100ms, rise: 1, fall: 1}\n",
            )
        )

        def dead_is_down() -> bool:
            return relay.metrics().get("splicerelay_upstream_up", upstream=f"127.0.0.1:{dead}") == 0

        await trio.to_thread.run_sync(
            poll_until, dead_is_down, 5, "the dead upstream to be marked down"
        )
        errors_before = relay.metrics().get("splicerelay_upstream_connect_errors_total", 0)
        for _ in range(6):
            assert await which_backend(listen_port) == ports[0]
        # A down upstream gets no new connections, so no client connect failed on it.
        assert relay.metrics().get("splicerelay_upstream_connect_errors_total", 0) == errors_before
        assert relay.metrics().get("splicerelay_upstream_up", upstream=f"127.0.0.1:{ports[0]}") == 1
        nursery.cancel_scope.cancel()  # now the live one dies too

    def all_down() -> bool:
        return relay.metrics().get("splicerelay_upstream_up") == 0

    await trio.to_thread.run_sync(poll_until, all_down, 5, "every upstream to be marked down")
    stream = await connect(listen_port)
    started = time.monotonic()
    with trio.fail_after(3):
        with contextlib.suppress(trio.BrokenResourceError):
            await receive_all(stream)
    await stream.aclose()
    assert time.monotonic() - started < 1.0
    assert relay.metrics().get("splicerelay_connections_total", outcome="no_upstream") == 1


async def test_passive_health_marks_down_after_fall_failed_connects(relay_factory):
    backends = Backends()
    async with trio.open_nursery() as nursery:
        ports = await backends.start(nursery, 1)
        dead = refused_port()
        listen_port = free_port()
        # Checks are slow here, so only the clients' own failed connects can mark it down.
        relay = await relay_factory.astart(
            route_yaml(
                listen_port,
                upstreams_yaml([dead, ports[0]]),
                extra="    health_check: {interval: 1h, timeout: 1s, rise: 1, fall: 3}\n",
            )
        )

        def checked_once() -> bool:
            return relay.metrics().get("splicerelay_upstream_up", upstream=f"127.0.0.1:{dead}") == 1

        await trio.to_thread.run_sync(poll_until, checked_once, 5, "metrics")
        for _ in range(12):
            assert await which_backend(listen_port) == ports[0]
        nursery.cancel_scope.cancel()
    metrics = relay.metrics()
    assert metrics.get("splicerelay_upstream_up", upstream=f"127.0.0.1:{dead}") == 0
    # The first check failed once, then the third client failure of a streak marked it
    # down: at most 3 client connects failed on it, not 6 (its round-robin share).
    assert (
        metrics.get("splicerelay_upstream_connect_errors_total", upstream=f"127.0.0.1:{dead}") <= 3
    )


async def test_max_connect_attempts_caps_failover(relay_factory):
    dead = [refused_port() for _ in range(3)]
    listen_port = free_port()
    relay = await relay_factory.astart(
        route_yaml(listen_port, upstreams_yaml(dead), extra="    max_connect_attempts: 2\n")
    )
    stream = await connect(listen_port)
    with trio.fail_after(3):
        await receive_all(stream)
    await stream.aclose()

    def counted() -> bool:
        return relay.metrics().get("splicerelay_connections_total", outcome="connect_failed") == 1

    await trio.to_thread.run_sync(poll_until, counted, 5, "the failure to be counted")
    assert relay.metrics().get("splicerelay_upstream_connect_errors_total", 0) == 2


async def test_max_duration_ends_a_busy_connection(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            relay_config(listen_port, upstream_port, extra="    max_duration: 500ms\n")
        )
        stream = await connect(listen_port)
        started = time.monotonic()
        closed = False
        with trio.fail_after(5):
            while not closed:
                try:
                    await stream.send_all(b"ping")
                    closed = await stream.receive_some(16) == b""
                except trio.BrokenResourceError:
                    closed = True
                await trio.sleep(0.02)
        lasted = time.monotonic() - started
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert 0.45 < lasted < 2.0
    assert relay.metrics().get("splicerelay_connections_total", outcome="max_duration") == 1


async def test_global_max_connections_holds_new_clients_in_the_backlog(relay_factory):
    backends = Backends()
    async with trio.open_nursery() as nursery:
        ports = await backends.start(nursery, 1)
        first_port, second_port = free_port(), free_port()
        upstream = f"upstreams: [{{address: '127.0.0.1:{ports[0]}'}}]"
        config = (
            "metrics: {listen: '127.0.0.1:{metrics_port}'}\n"
            "log: {format: json}\n"
            "max_connections: 2\n"
            "routes:\n"
            f"  - {{name: a, listen: '127.0.0.1:{first_port}', {upstream}}}\n"
            f"  - {{name: b, listen: '127.0.0.1:{second_port}', {upstream}}}\n"
        )
        relay = await relay_factory.astart(config)
        held = [await connect(first_port), await connect(second_port)]
        for stream in held:
            assert (await stream.receive_some(64)).endswith(b"\n")
        waiting = await connect(second_port)
        await trio.sleep(0.3)  # bounded look for something that must not happen
        assert sum(backends.served.values()) == 2
        await held[0].aclose()
        with trio.fail_after(5):
            assert (await waiting.receive_some(64)).endswith(b"\n")
        for stream in (held[1], waiting):
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert relay.metrics().get("splicerelay_global_limit_wait_seconds_total") > 0.2


async def test_upstream_by_host_name(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        config = relay_config(listen_port, upstream_port).replace(
            f"address: 127.0.0.1:{upstream_port}", f"address: localhost:{upstream_port}"
        )
        relay = await relay_factory.astart(config)
        stream = await connect(listen_port)
        await stream.send_all(b"by name")
        await stream.send_eof()
        assert await receive_all_bytes(stream) == b"by name"
        await stream.aclose()
        nursery.cancel_scope.cancel()
    # A member of a host name is labelled with the address it stands for (localhost may
    # be ::1 as well; the server listens on 127.0.0.1 only).
    label = f"localhost:{upstream_port}@127.0.0.1"
    assert relay.metrics().get("splicerelay_upstream_up", upstream=label) == 1
