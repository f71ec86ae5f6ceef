"""Upstreams while they run: resolved members, health, and the background work on them.

A configured upstream is one or more members: an IP literal or a unix path is one, and
a host name is one per address it resolves to (`resolve: all`) or its first address
only (`resolve: first`); protocol/membership.py says how they share the weight. Names
are resolved before serving; refreshing them every `resolve_interval`, off the event
loop, is relay/members.py's work. Active health checks connect (and optionally send and
expect bytes) on their own schedule, one per member; their results, and failed connects
of real clients, drive the pure HealthState from balancer.py.

Beside its health, a member has an admin state that an operator sets over the control
socket (relay/admin.py): `drain` and `maint` take it out of the balancer as down does,
and `maint` also pauses its health checks (the last health state stays as it was; the
first check after `maint` runs at once). An operator's weight replaces the configured
one for as long as the configured one stays as it was.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from splicerelay.config import HealthCheck, Upstream
from splicerelay.config.addresses import Address, TcpAddress, UnixAddress, is_ip_literal
from splicerelay.datapath.flow import close_socket
from splicerelay.datapath.session import ConnectError, UpstreamTarget, connect
from splicerelay.datapath.stats import UpstreamStats
from splicerelay.protocol.balancer import AdminState, HealthState, takes_new_connections
from splicerelay.protocol.membership import chosen_addresses

log = logging.getLogger("splicerelay")

# socket.getaddrinfo, or a stand-in with its signature (tests: names without DNS).
GetAddrInfo = Callable[..., Sequence[tuple[Any, ...]]]


class ResolveError(Exception):
    """A host name did not resolve."""


def _lookup(
    address: TcpAddress, getaddrinfo: GetAddrInfo, flags: int = 0
) -> Sequence[tuple[Any, ...]]:
    try:
        infos = getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=flags)
    except (socket.gaierror, UnicodeError) as error:
        raise ResolveError(f"cannot resolve {address}: {error}") from None
    if not infos:
        raise ResolveError(f"cannot resolve {address}: no addresses")
    return infos


def resolve(address: TcpAddress, passive: bool = False) -> UpstreamTarget:
    """Blocking getaddrinfo for one address, its first answer: call it before serving or
    in a thread. (Listeners bind this way; upstreams use `resolve_all`.)"""
    family, _type, _proto, _name, sockaddr = _lookup(
        address, socket.getaddrinfo, socket.AI_PASSIVE if passive else 0
    )[0]
    return UpstreamTarget(str(address), family, sockaddr)


def member_label(address: TcpAddress, sockaddr: tuple[Any, ...]) -> str:
    """How a member is named in metrics, logs and the access log.

    An IP literal is its own name ("10.0.0.2:8000"). A member of a host name carries the
    name and the address it stands for ("backend.internal:8000@10.0.0.2"): the name says
    which configured upstream it belongs to, the address which host took the connection,
    and the label's values stay as few as the name has addresses.
    """
    if is_ip_literal(address.host):
        return str(address)
    return f"{address}@{sockaddr[0]}"


def resolve_all(
    address: TcpAddress, getaddrinfo: GetAddrInfo = socket.getaddrinfo
) -> list[UpstreamTarget]:
    """Blocking: every distinct address `address` resolves to, in the resolver's order,
    each labelled as a member (see `member_label`). Raises ResolveError."""
    targets = [
        UpstreamTarget(member_label(address, sockaddr), family, sockaddr)
        for family, _type, _proto, _name, sockaddr in _lookup(address, getaddrinfo)
    ]
    return chosen_addresses(targets, "all")


def upstream_targets(
    upstream: Upstream, getaddrinfo: GetAddrInfo = socket.getaddrinfo
) -> list[UpstreamTarget]:
    """Blocking: the members' targets of one configured upstream, as its `resolve` mode
    chooses them. Raises ResolveError."""
    address = upstream.address
    if isinstance(address, UnixAddress):
        return [UpstreamTarget(str(address), socket.AF_UNIX, address.path)]
    return chosen_addresses(resolve_all(address, getaddrinfo), upstream.resolve)


def needs_resolving(address: Address) -> bool:
    """A host name, whose addresses may change; IP literals and unix paths never do."""
    return isinstance(address, TcpAddress) and not is_ip_literal(address.host)


@dataclass(eq=False)
class UpstreamRuntime:
    """One member of one route: where it is, whether it is up, what it carries.

    `config` is the configured upstream it comes from, `slot` that upstream's index in
    the route's list (a name with several addresses gives several members of one slot),
    `route` the route's name (for log lines). `admin` and `weight_override` are the
    operator's: change them with `set_admin` and `set_weight`, which keep the metrics in
    step (the route must then rebuild its strategy for a new weight).
    """

    config: Upstream
    target: UpstreamTarget
    health: HealthState
    stats: UpstreamStats
    slot: int = 0
    route: str = ""
    admin: AdminState = AdminState.READY
    weight_override: int | None = None
    # The last health check: "passed", "failed", or "" before the first; and when
    # (time.time()), for `show upstreams`.
    last_check: str = ""
    last_check_time: float = 0.0
    # Set when the member leaves maint, for its paused health checks.
    _out_of_maint: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    @property
    def label(self) -> str:
        return self.target.label

    @property
    def needs_resolving(self) -> bool:
        return needs_resolving(self.config.address)

    @property
    def weight(self) -> int:
        """The weight the balancer uses: the operator's, else the configured one."""
        return self.config.weight if self.weight_override is None else self.weight_override

    @property
    def takes_new_connections(self) -> bool:
        return takes_new_connections(self.health.up, self.admin)

    def set_admin(self, state: AdminState) -> AdminState:
        """Put the member in `state`; returns the state it was in."""
        previous = self.admin
        self.admin = state
        self.stats.admin_state = state.value
        if previous is AdminState.MAINT and state is not AdminState.MAINT:
            self._out_of_maint.set()
            self._out_of_maint = trio.Event()
        return previous

    def set_weight(self, weight: int | None) -> None:
        """The operator's weight, or None for the configured one."""
        self.weight_override = weight
        self.stats.weight = self.weight

    async def wait_out_of_maint(self) -> None:
        """Return once the member is not in maint (at once if it is not)."""
        while self.admin is AdminState.MAINT:
            await self._out_of_maint.wait()

    def record_check(self, passed: bool) -> None:
        """One health check's result: remembered for `show upstreams`, then fed in."""
        self.last_check = "passed" if passed else "failed"
        self.last_check_time = time.time()
        self.mark(passed)

    def mark(self, success: bool) -> None:
        """Feed one check or connect result into the health state; log changes."""
        changed = self.health.record_success() if success else self.health.record_failure()
        self.stats.up = self.health.up
        if changed:
            fields = {"route": self.route, "upstream": self.label}
            if self.health.up:
                log.info("upstream up", extra={"fields": fields})
            else:
                log.warning("upstream down", extra={"fields": fields})


def new_member(
    upstream: Upstream,
    slot: int,
    target: UpstreamTarget,
    check: HealthCheck | None,
    stats_for: Callable[[str], UpstreamStats],
    route: str = "",
) -> UpstreamRuntime:
    """A member with fresh health (up, as at load), ready, of its configured weight, and
    the counters of its label (the route's admin states are applied after)."""
    health = HealthState(rise=check.rise, fall=check.fall) if check else HealthState(rise=1, fall=1)
    stats = stats_for(target.label)
    stats.up = health.up
    stats.admin_state = AdminState.READY.value
    stats.weight = upstream.weight
    return UpstreamRuntime(upstream, target, health, stats, slot, route)


def make_upstreams(
    configs: Sequence[Upstream],
    check: HealthCheck | None,
    stats_for: Callable[[str], UpstreamStats],
    getaddrinfo: GetAddrInfo = socket.getaddrinfo,
    route: str = "",
) -> list[UpstreamRuntime]:
    """Resolve every upstream (blocking) into its members, in config order, each with its
    own health state and counters. Raises ResolveError."""
    return [
        new_member(upstream, slot, target, check, stats_for, route)
        for slot, upstream in enumerate(configs)
        for target in upstream_targets(upstream, getaddrinfo)
    ]


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


Probe = Callable[[UpstreamTarget, HealthCheck], Awaitable[bool]]


async def run_health_checks(
    upstream: UpstreamRuntime, check: HealthCheck, check_once: Probe = probe
) -> None:
    """Check one upstream forever, every `check.interval`; not while it is in maint.

    A check that was under way when the member went into maint is not counted: maint
    means the operator is working on it, and its results say nothing about later.
    """
    while True:
        await upstream.wait_out_of_maint()
        passed = await check_once(upstream.target, check)
        if upstream.admin is not AdminState.MAINT:
            upstream.record_check(passed)
            await trio.sleep(check.interval)
