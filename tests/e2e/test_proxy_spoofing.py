"""Spoofed PROXY headers against the real relay, with a real HAProxy as the trusted proxy.

HAProxy (`send-proxy-v2`, with a CRC32C TLV) forwards its clients from 127.0.0.1, the
only trusted peer. An attacker reaches the relay directly from 127.0.0.3 and sends a
valid v2 header that claims an allowed address. HAProxy's clients are served under
their own addresses; the attacker is closed unserved and counted as proxy_untrusted.
Then allow_applies_to, on a route that trusts every peer, decides whether the claimed
address, the real peer or both must pass allow/deny.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio

from splicerelay.protocol.proxy_protocol import encode_v2
from tests.support.harness import Relay, free_port, poll_until, relay_config
from tests.support.peers import echo, start_server
from tests.support.real_peers import haproxy_sending_proxy_v2

ATTACKER = "127.0.0.3"
CLAIMED = ("127.0.0.2", 40002)  # an address the route allows
PAYLOAD = b"relayed only for the clients it should be\n" * 20


async def exchange(port: int, source: str | None, prefix: bytes = b"") -> bytes | None:
    """Connect from `source`, send `prefix` + PAYLOAD, half-close, and read to the end.

    Returns what came back, or None when the connection was reset.
    """
    sock = trio.socket.socket()
    try:
        if source is not None:
            # Why bind before connect: the relay must see this address as the peer.
            await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        try:
            await stream.send_all(prefix + PAYLOAD)
            await stream.send_eof()
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
            return received
        except trio.BrokenResourceError:
            return None
    finally:
        sock.close()


def outcomes(relay: Relay) -> list[tuple[str, str]]:
    """(client, outcome) of every connection in the access log, in order."""
    found = []
    for line in relay.stdout().splitlines():
        record = json.loads(line)
        if record.get("message") == "connection":
            found.append((record["client"], record["outcome"]))
    return found


async def wait_for_outcomes(relay: Relay, count: int) -> list[tuple[str, str]]:
    await trio.to_thread.run_sync(
        poll_until, lambda: len(outcomes(relay)) >= count, 10, f"{count} access log lines"
    )
    return outcomes(relay)


def route_extra(*lines: str) -> str:
    return "".join(f"    {line}\n" for line in ("accept_proxy_protocol: true", *lines))


async def test_only_the_trusted_haproxy_may_name_the_client(relay_factory, tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        relay_port = free_port()
        relay = await relay_factory.astart(
            relay_config(
                relay_port,
                upstream_port,
                extra=route_extra(
                    "proxy_protocol_trusted: [127.0.0.1/32]",
                    "allow: [127.0.0.0/24]",
                    "deny: [127.0.0.66/32]",
                ),
            )
        )
        with (
            haproxy_sending_proxy_v2(tmp_path, relay_port, "proxy-v2-options crc32c") as front,
            trio.fail_after(20),
        ):
            # Through HAProxy: served, or denied by the address HAProxy names.
            assert await exchange(front, "127.0.0.1") == PAYLOAD
            assert await exchange(front, "127.0.0.4") == PAYLOAD
            assert not await exchange(front, "127.0.0.66")
            # Straight to the relay with a forged header: refused before it is read.
            forged = encode_v2(CLAIMED, ("127.0.0.1", relay_port))
            assert not await exchange(relay_port, ATTACKER, forged)
            # Without a header, from the trusted address's neighbour: refused as well.
            assert not await exchange(relay_port, ATTACKER)
            seen = await wait_for_outcomes(relay, 5)
        nursery.cancel_scope.cancel()
    by_outcome: dict[str, list[str]] = {}
    for client, outcome in seen:
        by_outcome.setdefault(outcome, []).append(client.rsplit(":", 1)[0])
    assert sorted(by_outcome["completed"]) == ["127.0.0.1", "127.0.0.4"], seen
    assert by_outcome["denied"] == ["127.0.0.66"], seen
    assert by_outcome["proxy_untrusted"] == [ATTACKER, ATTACKER], seen
    assert "127.0.0.2" not in {client for client, _ in seen}
    metrics = relay.metrics()
    assert metrics.get("splicerelay_connections_total", outcome="proxy_untrusted") == 2
    assert metrics.get("splicerelay_connections_total", outcome="completed") == 2
    assert metrics.get("splicerelay_connections_total", outcome="bad_proxy_header") == 0


@pytest.mark.parametrize(
    ("applies_to", "attacker_served"),
    [("proxy", True), ("both", False), ("peer", False)],
)
async def test_allow_applies_to_decides_whether_the_real_peer_counts(
    relay_factory, applies_to: str, attacker_served: bool
):
    """With every peer trusted (the warned-about setting), an attacker whose own
    address is denied claims an allowed one: only "proxy" believes the claim alone."""
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        relay_port = free_port()
        relay = await relay_factory.astart(
            relay_config(
                relay_port,
                upstream_port,
                extra=route_extra(
                    "allow: [127.0.0.0/24]",
                    f"deny: [{ATTACKER}/32]",
                    f"allow_applies_to: {applies_to}",
                ),
            )
        )
        forged = encode_v2(CLAIMED, ("127.0.0.1", relay_port))
        with trio.fail_after(10):
            reply = await exchange(relay_port, ATTACKER, forged)
            [(client, outcome)] = await wait_for_outcomes(relay, 1)
        nursery.cancel_scope.cancel()
    if attacker_served:
        assert reply == PAYLOAD
        assert (client.rsplit(":", 1)[0], outcome) == ("127.0.0.2", "completed")
    else:
        assert not reply
        assert (client.rsplit(":", 1)[0], outcome) == (ATTACKER, "denied")
    assert "accept_proxy_protocol is on and proxy_protocol_trusted is empty" in relay.stderr()


def test_loopback_aliases_are_usable():
    """The tests above bind clients to 127.0.0.x: Linux routes all of 127/8 to lo."""
    with socket.socket() as sock:
        sock.bind((ATTACKER, 0))
        assert sock.getsockname()[0] == ATTACKER
