"""Routing by TLS ClientHello, in process on real loopback sockets.

The hellos are real: Python's ssl module writes them into a memory BIO. The upstreams
echo, so a client that reads its own hello back knows the hello was left in the socket
and relayed, not consumed by the peek.
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from splicerelay.bench.procs import free_port
from splicerelay.protocol.proxy_protocol import encode_v2
from splicerelay.relay import tls_peek
from tests.support.fakes import (
    Backend,
    build_relay,
    ending_of,
    open_client,
    receive,
    route_config,
    serving,
)
from tests.support.tls_hello_builder import python_client_hello

LISTENER_HOST = "127.0.0.1"


def client_hello(server_name: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    """The ClientHello Python's ssl sends for `server_name` (None: no SNI)."""
    return python_client_hello(server_hostname=server_name, alpn_protocols=alpn)


def shared_config(
    port: int, app: Backend, api: Backend, fallback: Backend | None, extra: str = ""
) -> str:
    listen = f"{LISTENER_HOST}:{port}"
    routes = [
        f"  - name: app\n    listen: {listen}\n"
        f"    match: {{sni: [app.example.com, '*.app.example.com']}}\n"
        f"    upstreams: [{{address: 127.0.0.1:{app.port}}}]\n{extra}",
        f"  - name: api\n    listen: {listen}\n"
        f"    match: {{sni: [api.example.com], alpn: [h2]}}\n"
        f"    upstreams: [{{address: 127.0.0.1:{api.port}}}]\n{extra}",
    ]
    if fallback is not None:
        routes.append(
            f"  - name: fallback\n    listen: {listen}\n"
            f"    upstreams: [{{address: 127.0.0.1:{fallback.port}}}]\n{extra}"
        )
    return route_config(*routes)


async def receive_exactly(client: trio.SocketStream, count: int) -> bytes:
    """`count` bytes from `client` (fewer only if it ends first)."""
    received = b""
    while len(received) < count:
        data = await receive(client)
        if not data:
            break
        received += data
    return received


async def echoed(port: int, hello: bytes) -> bytes:
    """Send `hello` and read back as many bytes, or what came before the end."""
    client = await open_client(port)
    await client.send_all(hello)
    return await receive_exactly(client, len(hello))


@pytest.mark.parametrize(
    ("name", "alpn", "expected"),
    [
        ("app.example.com", (), "app"),
        ("APP.Example.COM", (), "app"),  # names are case-insensitive
        ("eu.app.example.com", (), "app"),  # one label under the wildcard
        ("a.eu.app.example.com", (), "fallback"),  # two labels: not the wildcard's
        ("api.example.com", ("h2", "http/1.1"), "api"),
        ("api.example.com", ("http/1.1",), "fallback"),  # the route wants h2
        (None, (), "fallback"),  # no SNI at all
    ],
)
async def test_each_hello_reaches_its_route_with_the_hello_intact(
    name: str | None, alpn: tuple[str, ...], expected: str
) -> None:
    async with trio.open_nursery() as nursery:
        backends = {key: await Backend().start(nursery) for key in ("app", "api", "fallback")}
        port = free_port()
        relay, _outcomes = build_relay(
            shared_config(port, backends["app"], backends["api"], backends["fallback"])
        )
        hello = client_hello(name, alpn)
        async with serving(relay):
            assert await echoed(port, hello) == hello
            [finished] = [
                backend_name for backend_name, backend in backends.items() if backend.accepted
            ]
            assert finished == expected
        nursery.cancel_scope.cancel()
    assert relay.stats.routes[expected].client_to_upstream.copy == 0
    assert relay.stats.routes[expected].client_to_upstream.splice == len(hello)


async def test_no_fallback_closes_and_counts_no_route_on_the_listener() -> None:
    async with trio.open_nursery() as nursery:
        app, api = await Backend().start(nursery), await Backend().start(nursery)
        port = free_port()
        relay, outcomes = build_relay(shared_config(port, app, api, None))
        async with serving(relay):
            client = await open_client(port)
            await client.send_all(client_hello("unknown.example.org"))
            [finished] = await outcomes.wait_for(1)
            assert await ending_of(client) in ("eof", "reset")
        nursery.cancel_scope.cancel()
    listener = f"{LISTENER_HOST}:{port}"
    assert finished.route == listener
    assert finished.outcome == "no_route"
    assert relay.stats.routes[listener].outcomes == {"no_route": 1}
    assert app.accepted == api.accepted == 0


@pytest.mark.parametrize(
    ("sent", "close", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n", False, "not_tls"),
        (b"\x80\x2e\x01\x00\x02" + bytes(44), False, "not_tls"),  # an SSLv2-style hello
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", False, "malformed"),  # a ServerHello
        (None, True, "truncated"),  # half a hello, then the client's FIN
        (b"", True, "truncated"),  # a FIN before any byte (a TCP probe)
        (None, False, "timeout"),  # half a hello, then nothing
    ],
)
async def test_a_failed_inspection_is_closed_and_counted_by_reason(
    autojump_clock: trio.testing.MockClock, sent: bytes | None, close: bool, reason: str
) -> None:
    async with trio.open_nursery() as nursery:
        backends = [await Backend().start(nursery) for _ in range(3)]
        port = free_port()
        relay, outcomes = build_relay(shared_config(port, *backends))
        data = client_hello("app.example.com")[:40] if sent is None else sent
        async with serving(relay):
            client = await open_client(port)
            await client.send_all(data)
            if close:
                await client.send_eof()
            [finished] = await outcomes.wait_for(1, within=10)
            # The relay goes on serving: the next client is routed.
            hello = client_hello("app.example.com")
            assert await echoed(port, hello) == hello
        nursery.cancel_scope.cancel()
    listener = relay.stats.routes[f"{LISTENER_HOST}:{port}"]
    assert finished.outcome == "tls_inspect_failed"
    assert finished.tls_error == reason  # (what its access line says)
    assert dict(listener.inspect_failures) == {reason: 1}
    if reason == "timeout":  # tls_inspect_timeout, 5 s by default
        assert finished.time - finished.started == pytest.approx(5, abs=0.1)
    else:
        assert finished.time - finished.started < 0.5
    assert sum(backend.accepted for backend in backends) == 1


async def test_a_hello_over_the_size_cap_is_too_large() -> None:
    async with trio.open_nursery() as nursery:
        backends = [await Backend().start(nursery) for _ in range(3)]
        port = free_port()
        relay, outcomes = build_relay(
            shared_config(port, *backends, extra="    tls_max_client_hello: 1KiB\n")
        )
        hello = client_hello("app.example.com", tuple(f"protocol-{n:03d}" for n in range(100)))
        assert len(hello) > 1024
        async with serving(relay):
            client = await open_client(port)
            await client.send_all(hello)
            [finished] = await outcomes.wait_for(1)
        nursery.cancel_scope.cancel()
    assert finished.outcome == "tls_inspect_failed"
    assert dict(relay.stats.routes[f"{LISTENER_HOST}:{port}"].inspect_failures) == {"too_large": 1}


async def test_a_trickled_hello_wakes_the_relay_only_as_the_parser_asks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One byte at a time, the relay looks again only when SO_RCVLOWAT says the bytes
    the parser wants are there: a handful of looks for a hello of hundreds of bytes.
    Without SO_RCVLOWAT every byte would wake it (and without consuming, a level-
    triggered wait would spin)."""
    looks = 0
    parse = tls_peek.parse_client_hello

    def counting(data: memoryview, max_size: int) -> object:
        nonlocal looks
        looks += 1
        return parse(data, max_size)

    monkeypatch.setattr(tls_peek, "parse_client_hello", counting)
    async with trio.open_nursery() as nursery:
        backends = [await Backend().start(nursery) for _ in range(3)]
        port = free_port()
        relay, _outcomes = build_relay(shared_config(port, *backends))
        hello = client_hello("app.example.com")
        async with serving(relay):
            client = await open_client(port)
            for index in range(len(hello)):
                await client.send_all(hello[index : index + 1])
                await trio.sleep(0.001)
            received = await receive_exactly(client, len(hello))
        nursery.cancel_scope.cancel()
    assert received == hello
    assert backends[0].accepted == 1
    assert looks <= 6, f"{looks} looks at a {len(hello)}-byte hello sent a byte at a time"


async def test_the_data_path_gets_its_socket_back_with_rcvlowat_at_one() -> None:
    """The peek raises SO_RCVLOWAT while it waits; left raised, the data path would not
    see a short message until that many bytes were queued."""
    async with trio.open_nursery() as nursery:
        backends = [await Backend().start(nursery) for _ in range(3)]
        port = free_port()
        relay, _outcomes = build_relay(shared_config(port, *backends))
        hello = client_hello("app.example.com")
        async with serving(relay):
            client = await open_client(port)
            await client.send_all(hello[:10])
            await trio.sleep(0.05)
            await client.send_all(hello[10:])
            assert await receive_exactly(client, len(hello)) == hello
            [session] = relay.table.sessions
            low_water = session.client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
            # And a one-byte message still goes through at once.
            await client.send_all(b"x")
            assert await receive(client, within=5) == b"x"
        nursery.cancel_scope.cancel()
    assert low_water == 1


async def test_a_proxy_header_is_read_first_then_the_hello_is_peeked() -> None:
    async with trio.open_nursery() as nursery:
        backends = [await Backend().start(nursery) for _ in range(3)]
        port = free_port()
        extra = "    accept_proxy_protocol: true\n    proxy_protocol_trusted: [127.0.0.0/8]\n"
        relay, outcomes = build_relay(shared_config(port, *backends, extra=extra))
        hello = client_hello("api.example.com", ("h2",))
        header = encode_v2(("192.0.2.7", 40007), ("203.0.113.1", 443))
        async with serving(relay):
            client = await open_client(port)
            await client.send_all(header + hello)
            received = await receive_exactly(client, len(hello))
            await client.aclose()
            [finished] = await outcomes.wait_for(1)
        nursery.cancel_scope.cancel()
    assert received == hello  # the header was consumed, the hello relayed
    assert backends[1].accepted == 1
    assert finished.route == "api"
    assert finished.client == "192.0.2.7:40007"


async def test_a_route_at_its_limit_holds_the_next_connection_until_a_slot_frees() -> None:
    async with trio.open_nursery() as nursery:
        backends = [await Backend().start(nursery) for _ in range(3)]
        port = free_port()
        relay, _outcomes = build_relay(
            shared_config(port, *backends, extra="    max_connections: 1\n")
        )
        hello = client_hello("app.example.com")
        async with serving(relay):
            first = await open_client(port)
            await first.send_all(hello)
            assert len(await receive(first)) > 0
            second = await open_client(port)
            await second.send_all(hello)
            await trio.sleep(0.2)
            assert backends[0].accepted == 1  # the second waits for app's one slot
            assert relay.stats.routes["app"].active == 1
            await first.aclose()
            received = await receive_exactly(second, len(hello))
            assert received == hello
            assert backends[0].accepted == 2
        nursery.cancel_scope.cancel()
    assert relay.stats.routes["app"].limited_seconds > 0.1


async def test_a_hello_already_in_is_routed_without_a_task() -> None:
    """The common case (the hello arrives with the handshake's last ACK) costs no task:
    the acceptor looks once and hands the connection over at once. trio never waits
    on such a client socket, which `tracked` records."""
    async with trio.open_nursery() as nursery:
        backends = [await Backend().start(nursery) for _ in range(3)]
        port = free_port()
        relay, _outcomes = build_relay(shared_config(port, *backends))
        hello = client_hello("app.example.com")
        # Sent before the relay serves: the whole hello waits with the connection.
        client = await open_client(port)
        await client.send_all(hello)
        async with serving(relay):
            received = await receive_exactly(client, len(hello))
            [session] = relay.table.sessions
            tracked = session.tracked
        nursery.cancel_scope.cancel()
    assert received == hello
    assert not tracked


async def test_a_reset_in_the_middle_of_a_hello_is_a_client_reset() -> None:
    """The peek still sees the bytes queued before the reset: the reset itself must be
    told from a FIN (truncated) by the socket's pending error."""
    async with trio.open_nursery() as nursery:
        backends = [await Backend().start(nursery) for _ in range(3)]
        port = free_port()
        relay, outcomes = build_relay(shared_config(port, *backends))
        async with serving(relay):
            client = await open_client(port)
            await client.send_all(client_hello("app.example.com")[:40])
            await trio.sleep(0.1)  # the relay waits for the rest
            # SO_LINGER with a zero timeout: close() sends a reset.
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.socket.close()
            [finished] = await outcomes.wait_for(1, within=5)
        nursery.cancel_scope.cancel()
    assert finished.outcome == "client_reset"
    assert not relay.stats.routes[f"{LISTENER_HOST}:{port}"].inspect_failures


async def test_clients_waiting_for_a_full_route_give_up_at_the_inspect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each route takes one connection. One app client is relayed and three more wait
    for app's slot, holding all three of the listener's acceptor slots: an api client
    then waits in the backlog, but only until the waiters give up (route_limit) at
    tls_inspect_timeout. The time app spent at its limit is counted once, not once per
    waiter."""
    extra = "    max_connections: 1\n    tls_inspect_timeout: 1s\n"
    async with trio.open_nursery() as nursery:
        backends = [await Backend().start(nursery) for _ in range(3)]
        port = free_port()
        relay, outcomes = build_relay(shared_config(port, *backends, extra=extra))
        app_hello = client_hello("app.example.com")
        api_hello = client_hello("api.example.com", ("h2",))
        async with serving(relay):
            holder = await open_client(port)
            await holder.send_all(app_hello)
            assert await receive_exactly(holder, len(app_hello)) == app_hello
            for _ in range(3):
                waiting = await open_client(port)
                await waiting.send_all(app_hello)
            await trio.sleep(0.1)
            started = trio.current_time()
            assert await echoed(port, api_hello) == api_hello
            api_routed_after = trio.current_time() - started
            waiters = await outcomes.wait_for(3)
        nursery.cancel_scope.cancel()
    assert [finished.outcome for finished in waiters] == ["route_limit"] * 3
    assert all(finished.route == f"{LISTENER_HOST}:{port}" for finished in waiters)
    assert api_routed_after < 1.5
    assert relay.stats.routes["app"].limited_seconds == pytest.approx(0.9, abs=0.15)
