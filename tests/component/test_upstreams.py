"""Active health probes of one upstream (refreshing names: test_members.py)."""

from __future__ import annotations

import socket

import trio

from splicerelay.config import HealthCheck
from splicerelay.datapath.session import UpstreamTarget
from splicerelay.relay.upstreams import probe
from tests.support.harness import refused_port
from tests.support.peers import start_server


async def test_probe_connect_send_and_expect():
    async def banner(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(100)
        await stream.send_all(b"+PONG\r\n" if request == b"PING\r\n" else b"-ERR\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, banner)
        target = UpstreamTarget(f"127.0.0.1:{port}", socket.AF_INET, ("127.0.0.1", port))
        good = HealthCheck(send=b"PING\r\n", expect=b"+PONG")
        wrong_reply = HealthCheck(send=b"PING\r\n", expect=b"+OK")
        wrong_request = HealthCheck(send=b"HELLO\r\n", expect=b"+PONG")
        assert await probe(target, HealthCheck()) is True
        assert await probe(target, good) is True
        assert await probe(target, wrong_reply) is False
        assert await probe(target, wrong_request) is False
        nursery.cancel_scope.cancel()
    dead = refused_port()
    dead_target = UpstreamTarget(f"127.0.0.1:{dead}", socket.AF_INET, ("127.0.0.1", dead))
    assert await probe(dead_target, HealthCheck()) is False


async def test_probe_times_out_on_a_silent_upstream():
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, silent)
        target = UpstreamTarget(f"127.0.0.1:{port}", socket.AF_INET, ("127.0.0.1", port))
        with trio.fail_after(2):
            assert await probe(target, HealthCheck(timeout=0.2, expect=b"hello")) is False
        nursery.cancel_scope.cancel()
