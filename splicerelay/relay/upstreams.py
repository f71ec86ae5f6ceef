"""Upstreams while they run: resolved addresses, health, and the background work on them.

Host names are resolved before serving and then refreshed in a worker thread every
`resolve_interval`, so the event loop never waits on DNS; a failed lookup keeps the last
good addresses. Active health checks connect (and optionally send and expect bytes) on
their own schedule; their results, and failed connects of real clients, drive the
pure HealthState from balancer.py.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from splicerelay.config import HealthCheck, Upstream
from splicerelay.config.addresses import Address, TcpAddress, UnixAddress, is_ip_literal
from splicerelay.datapath.flow import close_socket
from splicerelay.datapath.session import ConnectError, UpstreamTarget, connect
from splicerelay.datapath.stats import UpstreamStats
from splicerelay.protocol.balancer import HealthState

log = logging.getLogger("splicerelay")


class ResolveError(Exception):
    """A host name did not resolve."""


def resolve(address: TcpAddress, passive: bool = False) -> UpstreamTarget:
    """Blocking getaddrinfo for one address: call it before serving or in a thread."""
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=flags)
    except (socket.gaierror, UnicodeError) as error:
        raise ResolveError(f"cannot resolve {address}: {error}") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return UpstreamTarget(str(address), family, sockaddr)  # type: ignore[arg-type]


def resolve_upstream(address: Address) -> UpstreamTarget:
    if isinstance(address, UnixAddress):
        return UpstreamTarget(str(address), socket.AF_UNIX, address.path)
    return resolve(address)


@dataclass(eq=False)
class UpstreamRuntime:
    """One upstream of one route: where it is now, whether it is up, what it carries."""

    config: Upstream
    target: UpstreamTarget
    health: HealthState
    stats: UpstreamStats

    @property
    def label(self) -> str:
        return self.target.label

    @property
    def needs_resolving(self) -> bool:
        address = self.config.address
        return isinstance(address, TcpAddress) and not is_ip_literal(address.host)

    def mark(self, success: bool) -> None:
        """Feed one check or connect result into the health state; log changes."""
        changed = self.health.record_success() if success else self.health.record_failure()
        self.stats.up = self.health.up
        if changed:
            if self.health.up:
                log.info("upstream up", extra={"fields": {"upstream": self.label}})
            else:
                log.warning("upstream down", extra={"fields": {"upstream": self.label}})


def make_upstreams(
    configs: Sequence[Upstream],
    check: HealthCheck | None,
    stats_for: Callable[[str], UpstreamStats],
) -> list[UpstreamRuntime]:
    """Resolve every upstream (blocking) and give each its health state and counters."""
    runtimes = []
    for upstream in configs:
        target = resolve_upstream(upstream.address)
        health = (
            HealthState(rise=check.rise, fall=check.fall) if check else HealthState(rise=1, fall=1)
        )
        stats = stats_for(target.label)
        stats.up = health.up
        runtimes.append(UpstreamRuntime(upstream, target, health, stats))
    return runtimes


async def refresh_addresses(upstreams: Sequence[UpstreamRuntime], interval: float) -> None:
    """Re-resolve host names every `interval`, off the event loop; keep the last good."""
    named = [upstream for upstream in upstreams if upstream.needs_resolving]
    if not named:
        return
    while True:
        await trio.sleep(interval)
        for upstream in named:
            address = upstream.config.address
            assert isinstance(address, TcpAddress)
            try:
                target = await trio.to_thread.run_sync(resolve, address, abandon_on_cancel=True)
            except ResolveError as error:
                log.warning(
                    "re-resolving failed; keeping the last good address",
                    extra={"fields": {"upstream": upstream.label, "error": str(error)}},
                )
                continue
            if target.sockaddr != upstream.target.sockaddr:
                log.info(
                    "upstream address changed",
                    extra={"fields": {"upstream": upstream.label, "address": str(target.sockaddr)}},
                )
                upstream.target = target


async def probe(target: UpstreamTarget, check: HealthCheck) -> bool:
    """One health check: connect, then optionally send and expect a reply prefix."""
    try:
        with trio.fail_after(check.timeout):
            sock = await connect(target, check.timeout)
            try:
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            except BaseException:
                close_socket(sock)
                raise
            async with stream:
                if check.send:
                    await stream.send_all(check.send)
                if check.expect:
                    return await _reply_starts_with(stream, check.expect)
                return True
    except (ConnectError, OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False


async def _reply_starts_with(stream: trio.SocketStream, expected: bytes) -> bool:
    reply = b""
    while len(reply) < len(expected):
        data = await stream.receive_some(len(expected) - len(reply))
        if not data:
            return False
        reply += data
        if not expected.startswith(reply):
            return False
    return True


async def run_health_checks(upstream: UpstreamRuntime, check: HealthCheck) -> None:
    """Check one upstream forever, every `check.interval`."""
    while True:
        upstream.mark(await probe(upstream.target, check))
        await trio.sleep(check.interval)
