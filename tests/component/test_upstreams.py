"""Upstream background work: address refresh and active health probes."""

from __future__ import annotations

import socket

import pytest
import trio

from splicerelay.config import HealthCheck, Upstream
from splicerelay.config.addresses import TcpAddress
from splicerelay.datapath.session import UpstreamTarget
from splicerelay.datapath.stats import UpstreamStats
from splicerelay.protocol.balancer import HealthState
from splicerelay.relay import upstreams as upstreams_module
from splicerelay.relay.upstreams import ResolveError, UpstreamRuntime, probe, refresh_addresses
from tests.support.harness import refused_port
from tests.support.peers import start_server


def runtime_for(host: str, port: int, sockaddr: tuple[str, int]) -> UpstreamRuntime:
    address = TcpAddress(host, port)
    target = UpstreamTarget(str(address), socket.AF_INET, sockaddr)
    return UpstreamRuntime(
        Upstream(address), target, HealthState(rise=1, fall=1), UpstreamStats(str(address))
    )


async def test_refresh_replaces_addresses_and_keeps_the_last_good_on_failure(
    monkeypatch: pytest.MonkeyPatch,
):
    answers: list[UpstreamTarget | ResolveError] = [
        UpstreamTarget("backend.example:80", socket.AF_INET, ("192.0.2.2", 80)),
        ResolveError("cannot resolve backend.example:80: temporary failure"),
        UpstreamTarget("backend.example:80", socket.AF_INET, ("192.0.2.3", 80)),
    ]
    upstream = runtime_for("backend.example", 80, ("192.0.2.1", 80))
    fixed = runtime_for("192.0.2.50", 80, ("192.0.2.50", 80))
    # What the upstream's address was when each lookup started: the result of the one before.
    before_lookup: list[object] = []
    finished = trio.Event()

    def fake_resolve(address: TcpAddress, passive: bool = False) -> UpstreamTarget:
        assert address.host == "backend.example", "IP literals are never re-resolved"
        before_lookup.append(upstream.target.sockaddr)
        if len(before_lookup) > len(answers):
            trio.from_thread.run_sync(finished.set)  # resolve runs in a worker thread
            raise ResolveError("no more answers")
        answer = answers[len(before_lookup) - 1]
        if isinstance(answer, ResolveError):
            raise answer
        return answer

    monkeypatch.setattr(upstreams_module, "resolve", fake_resolve)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(refresh_addresses, [upstream, fixed], 0.01)
        with trio.fail_after(5):
            await finished.wait()
        nursery.cancel_scope.cancel()
    assert before_lookup == [
        ("192.0.2.1", 80),  # as resolved at load
        ("192.0.2.2", 80),  # the first refresh
        ("192.0.2.2", 80),  # the failed lookup kept the last good address
        ("192.0.2.3", 80),  # and the next answer took over
    ]
    assert fixed.target.sockaddr == ("192.0.2.50", 80)


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
