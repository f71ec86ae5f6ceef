"""Who may send a PROXY header, and which address allow/deny check.

In process, on real loopback sockets: clients bind to 127.0.0.2 (a trusted proxy) or
127.0.0.3 (anyone else) before connecting, and the relay's outcomes come from its access
hook. The header timeout runs on trio's MockClock, so "refused at once" means before any
of the 3 s a header may take.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from splicerelay.config import Route, parse_config
from splicerelay.protocol.proxy_protocol import encode_v1, encode_v2
from splicerelay.relay.routes import is_trusted
from tests.support.fakes import (
    Backend,
    build_relay,
    ending_of,
    one_route,
    open_client,
    port_of,
    receive,
    route_config,
    route_stats,
    serving,
)

PROXY = "127.0.0.2"  # the proxy in front: trusted where a list is given
OTHER = "127.0.0.3"  # some other peer that reaches the listener
ALLOWED_CLAIM = ("192.0.2.7", 40007)
DENIED_CLAIM = ("198.51.100.7", 40008)
DESTINATION = ("203.0.113.1", 443)
PAYLOAD = b"the stream after the header"


def proxy_route(backend: Backend, extra: str) -> str:
    return route_config(one_route(backend.port, "    accept_proxy_protocol: true\n" + extra))


async def connect_and_send(port: int, source: str, data: bytes) -> trio.SocketStream:
    client = await open_client(port, source)
    if data:
        await client.send_all(data)
    return client


async def test_an_untrusted_peer_is_refused_before_a_byte_is_read(
    autojump_clock: trio.testing.MockClock,
):
    """It sends a valid header naming an allowed client, and is closed with the header
    still unread (so the close is a reset), counted as proxy_untrusted, at once."""
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(
            proxy_route(backend, f"    proxy_protocol_trusted: [{PROXY}/32]\n")
        )
        header = encode_v2(ALLOWED_CLAIM, DESTINATION)
        # Sent before the relay serves: the header is waiting when it accepts.
        client = await connect_and_send(port_of(relay), OTHER, header + PAYLOAD)
        client_port = client.socket.getsockname()[1]
        async with serving(relay):
            [finished] = await outcomes.wait_for(1)
            assert await ending_of(client) == "reset"
        nursery.cancel_scope.cancel()
    assert finished.outcome == "proxy_untrusted"
    assert finished.time - finished.started < 0.1
    assert finished.client == f"{OTHER}:{client_port}"
    assert route_stats(relay).outcomes == {"proxy_untrusted": 1}
    assert backend.accepted == 0


async def test_a_trusted_peer_names_the_client(autojump_clock: trio.testing.MockClock):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        trusted = f"    proxy_protocol_trusted: [10.0.0.0/8, {PROXY}/32]\n"
        relay, outcomes = build_relay(proxy_route(backend, trusted))
        async with serving(relay):
            client = await connect_and_send(
                port_of(relay), PROXY, encode_v1(ALLOWED_CLAIM, DESTINATION) + PAYLOAD
            )
            assert await receive(client) == PAYLOAD
            await client.send_eof()
            assert await ending_of(client) == "eof"
            [finished] = await outcomes.wait_for(1)
        nursery.cancel_scope.cancel()
    assert finished.outcome == "completed"
    assert finished.client == "192.0.2.7:40007"


async def test_an_empty_trusted_list_trusts_every_peer(autojump_clock: trio.testing.MockClock):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        relay, outcomes = build_relay(proxy_route(backend, ""))
        async with serving(relay):
            client = await connect_and_send(
                port_of(relay), OTHER, encode_v2(ALLOWED_CLAIM, DESTINATION) + PAYLOAD
            )
            assert await receive(client) == PAYLOAD
            await client.aclose()
            [finished] = await outcomes.wait_for(1)
        nursery.cancel_scope.cancel()
    assert finished.client == "192.0.2.7:40007"


HEADERS = {
    "claims_allowed": encode_v2(ALLOWED_CLAIM, DESTINATION),
    "claims_denied": encode_v2(DENIED_CLAIM, DESTINATION),
    "local": encode_v2(None, None, local=True),
}
PEERS = {"proxy": PROXY, "other": OTHER}

# (allow_applies_to, peer, header, outcome). allow: the proxy and 192.0.2.0/24.
APPLIES_TO_CASES = [
    ("both", "proxy", "claims_allowed", "completed"),
    ("both", "proxy", "claims_denied", "denied"),
    ("both", "other", "claims_allowed", "denied"),
    ("both", "proxy", "local", "completed"),
    ("proxy", "other", "claims_allowed", "completed"),
    ("proxy", "proxy", "claims_denied", "denied"),
    # A LOCAL header names nobody: the peer is the client, and the peer is checked.
    ("proxy", "other", "local", "denied"),
    ("proxy", "proxy", "local", "completed"),
    ("peer", "proxy", "claims_denied", "completed"),
    ("peer", "other", "claims_allowed", "denied"),
]


@pytest.mark.parametrize(
    ("applies_to", "peer", "header", "outcome"),
    APPLIES_TO_CASES,
    ids=["-".join(case) for case in APPLIES_TO_CASES],
)
async def test_allow_applies_to(
    autojump_clock: trio.testing.MockClock,
    applies_to: str,
    peer: str,
    header: str,
    outcome: str,
):
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        extra = f"    allow: [{PROXY}/32, 192.0.2.0/24]\n    allow_applies_to: {applies_to}\n"
        relay, outcomes = build_relay(proxy_route(backend, extra))
        async with serving(relay):
            client = await connect_and_send(port_of(relay), PEERS[peer], HEADERS[header] + PAYLOAD)
            if outcome == "completed":
                assert await receive(client) == PAYLOAD
                await client.send_eof()
            assert await ending_of(client) in ("eof", "reset")
            [finished] = await outcomes.wait_for(1)
        nursery.cancel_scope.cancel()
    assert finished.outcome == outcome
    assert backend.accepted == (outcome == "completed")


@pytest.mark.parametrize("applies_to", ["both", "peer"])
async def test_a_denied_peer_is_refused_before_its_header(
    autojump_clock: trio.testing.MockClock, applies_to: str
):
    """The peer check comes first: a denied peer that sends nothing is closed at once,
    as denied, not held for the header timeout and counted as bad_proxy_header."""
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        extra = f"    deny: [{OTHER}/32]\n    allow_applies_to: {applies_to}\n"
        relay, outcomes = build_relay(proxy_route(backend, extra))
        async with serving(relay):
            client = await connect_and_send(port_of(relay), OTHER, b"")
            assert await ending_of(client) == "eof"
            [finished] = await outcomes.wait_for(1)
        nursery.cancel_scope.cancel()
    assert finished.outcome == "denied"
    assert finished.time - finished.started < 0.1


async def test_with_proxy_only_the_peer_waits_for_its_header(
    autojump_clock: trio.testing.MockClock,
):
    """allow_applies_to: proxy does not look at the peer: a denied peer that sends
    nothing waits for its header like anyone, and the timeout ends it."""
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        extra = f"    deny: [{OTHER}/32]\n    allow_applies_to: proxy\n"
        relay, outcomes = build_relay(proxy_route(backend, extra))
        async with serving(relay):
            client = await connect_and_send(port_of(relay), OTHER, b"")
            await ending_of(client)
            [finished] = await outcomes.wait_for(1)
        nursery.cancel_scope.cancel()
    assert finished.outcome == "bad_proxy_header"
    assert finished.time - finished.started >= 3.0


@pytest.mark.parametrize("applies_to", ["both", "proxy", "peer"])
async def test_without_accept_proxy_protocol_the_peer_is_the_client(
    autojump_clock: trio.testing.MockClock, applies_to: str
):
    """No header is read, so every setting checks the one address there is; a header
    sent anyway is stream data, and trust does not come into it."""
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        extra = (
            f"    deny: [{OTHER}/32]\n    allow_applies_to: {applies_to}\n"
            f"    proxy_protocol_trusted: [{PROXY}/32]\n"
        )
        relay, outcomes = build_relay(route_config(one_route(backend.port, extra)))
        header = encode_v1(ALLOWED_CLAIM, DESTINATION)
        async with serving(relay):
            denied = await connect_and_send(port_of(relay), OTHER, header)
            assert await ending_of(denied) in ("eof", "reset")
            served = await connect_and_send(port_of(relay), "127.0.0.4", header)
            assert await receive(served) == header
            await served.aclose()
            finished = await outcomes.wait_for(2)
        nursery.cancel_scope.cancel()
    assert sorted(end.outcome for end in finished) == ["completed", "denied"]


def trust_route(trusted: str) -> Route:
    config = parse_config(
        route_config(one_route(9, f"    accept_proxy_protocol: true\n{trusted}")), "trust.yaml"
    )
    return config.routes[0]


@pytest.mark.parametrize(
    ("trusted", "peer", "expected"),
    [
        ("", ("203.0.113.9", 1), True),
        ("", None, True),
        ("    proxy_protocol_trusted: [10.0.0.0/8]\n", ("10.1.2.3", 1), True),
        ("    proxy_protocol_trusted: [10.0.0.0/8]\n", ("11.1.2.3", 1), False),
        # A dual-stack listener's IPv4 peer is an IPv4-mapped address: still matched.
        ("    proxy_protocol_trusted: [10.0.0.0/8]\n", ("::ffff:10.1.2.3", 1), True),
        ('    proxy_protocol_trusted: ["2001:db8::/32"]\n', ("2001:db8::5", 1), True),
        ('    proxy_protocol_trusted: ["2001:db8::/32"]\n', ("10.1.2.3", 1), False),
        # A unix socket peer has no address: in no list.
        ("    proxy_protocol_trusted: [10.0.0.0/8]\n", None, False),
    ],
)
def test_is_trusted(trusted: str, peer: tuple[str, int] | None, expected: bool):
    assert is_trusted(trust_route(trusted), peer) is expected
