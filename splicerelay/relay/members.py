"""A route's members while it runs: refreshing host names and a health check per member.

Every `resolve_interval` the route's host names are resolved again in a worker thread,
so the event loop never waits on DNS. When a name's addresses change, the route gets a
new member list and a new strategy for it, in one step between two checkpoints: a
connection being set up keeps the list it was given (the connector holds it), members
that stay keep their health, counters and connections, new members start up (as at
load) with a health check of their own and the operator's settings for their address
(relay/admin_store.py), and removed members' checks stop. A lookup that fails keeps the
name's last good members.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

import trio

from splicerelay.config import HealthCheck
from splicerelay.config.addresses import TcpAddress
from splicerelay.datapath.session import UpstreamTarget
from splicerelay.datapath.stats import RouteStats
from splicerelay.protocol.membership import chosen_addresses, merge_members
from splicerelay.relay.routes import RouteRuntime
from splicerelay.relay.upstreams import (
    GetAddrInfo,
    ResolveError,
    UpstreamRuntime,
    needs_resolving,
    new_member,
    resolve_all,
    run_health_checks,
)

log = logging.getLogger("splicerelay")


class HealthChecks:
    """One health-check task per member, started and stopped as members come and go."""

    def __init__(self, nursery: trio.Nursery, check: HealthCheck | None) -> None:
        self._nursery = nursery
        self._check = check
        self._scopes: dict[UpstreamRuntime, trio.CancelScope] = {}

    def follow(self, members: Sequence[UpstreamRuntime]) -> None:
        """Check exactly `members` from now on."""
        check = self._check
        if check is None:
            return
        for member in set(self._scopes) - set(members):
            self._scopes.pop(member).cancel()
        for member in members:
            if member not in self._scopes:
                scope = self._scopes[member] = trio.CancelScope()
                self._nursery.start_soon(self._run, member, check, scope)

    @staticmethod
    async def _run(member: UpstreamRuntime, check: HealthCheck, scope: trio.CancelScope) -> None:
        with scope:
            await run_health_checks(member, check)


async def maintain_members(
    runtime: RouteRuntime, getaddrinfo: GetAddrInfo = socket.getaddrinfo
) -> None:
    """Run the route's health checks and refresh its host names, until cancelled."""
    route = runtime.route
    async with trio.open_nursery() as nursery:
        checks = HealthChecks(nursery, route.health_check)
        checks.follow(runtime.upstreams)
        named = [
            slot
            for slot, upstream in enumerate(route.upstreams)
            if needs_resolving(upstream.address)
        ]
        if not named:
            return  # the nursery still waits for the health checks
        while True:
            await trio.sleep(route.resolve_interval)
            answers: dict[int, list[UpstreamTarget]] = {}
            for slot in named:
                address = route.upstreams[slot].address
                assert isinstance(address, TcpAddress)
                try:
                    answers[slot] = await trio.to_thread.run_sync(
                        resolve_all, address, getaddrinfo, abandon_on_cancel=True
                    )
                except ResolveError as error:
                    log.warning(
                        "re-resolving failed; keeping the last good addresses",
                        extra={"fields": {"route": route.name, "error": str(error)}},
                    )
            if refresh_members(runtime, answers):
                checks.follow(runtime.upstreams)
            forget_gone_members(runtime.stats, runtime.upstreams)


def refresh_members(runtime: RouteRuntime, answers: dict[int, list[UpstreamTarget]]) -> bool:
    """Apply fresh lookups (slot -> every address, in the resolver's order) to the
    route's members; True if the members changed. Slots without an answer keep theirs."""
    route = runtime.route
    members: list[UpstreamRuntime] = []
    added: list[UpstreamRuntime] = []
    changed = False
    for slot, upstream in enumerate(route.upstreams):
        current = [member for member in runtime.upstreams if member.slot == slot]
        if slot not in answers:
            members += current
            continue
        by_target = {member.target: member for member in current}
        change = merge_members(
            [member.target for member in current], chosen_addresses(answers[slot], upstream.resolve)
        )
        if not change.changed:
            members += current
            continue
        changed = True
        log.info(
            "upstream addresses changed",
            extra={
                "fields": {
                    "route": route.name,
                    "upstream": str(upstream.address),
                    "added": [target.label for target in change.added],
                    "removed": [target.label for target in change.removed],
                }
            },
        )
        for target in change.members:
            member = by_target.get(target)
            if member is None:
                member = new_member(
                    upstream, slot, target, route.health_check, runtime.stats.upstream, route.name
                )
                added.append(member)
            members.append(member)
    if changed:
        # A new member of a drained name is drained too, before it can be chosen.
        runtime.admin.apply(route.name, added)
        runtime.set_members(members)
    return changed


def forget_gone_members(stats: RouteStats, members: Sequence[UpstreamRuntime]) -> None:
    """Drop the series of addresses that are no longer members once their last
    connection has closed; until then they show as down (they take no new connections)."""
    current = {member.label for member in members}
    for label, upstream_stats in list(stats.upstreams.items()):
        if label in current:
            continue
        upstream_stats.up = False
        if upstream_stats.active <= 0:
            del stats.upstreams[label]
            for key in [key for key in stats.connect_errors if key[0] == label]:
                del stats.connect_errors[key]
