"""The control socket's upstream commands, on a running relay: admin states and weights.

`set upstream ROUTE ADDRESS state ready|drain|maint` and `... weight N`, and the rows of
`show upstreams`. ADDRESS is a configured upstream address as the config writes it
(every member of a host name) or one member's label (`name:port@ip`), as `show
upstreams` prints both. Each setting is recorded in the relay's admin store
(admin_store.py), which applies it to the members now and to those a reload or a DNS
refresh brings later; the functions here find what ADDRESS names, say what changed, and
close connections when asked to.

A change reaches new connections at once: the next one balanced on the route sees it.
Connections already open are never touched, except by `maint` with `kill_connections`,
which closes those established to the members it names (outcome `killed`); one still
connecting at that moment completes and carries on.

Every function returns a JSON-able dict or list, or raises AdminError with a message
for the operator that names what does exist.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence

from splicerelay.protocol.control import AdminState
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.admin_store import SnapshotError, Weight, address_of_label, names_member
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.routes import RouteRuntime, endpoint_of, format_endpoint
from splicerelay.relay.upstreams import UpstreamRuntime

log = logging.getLogger("splicerelay")

__all__ = [
    "AdminError",
    "admin_snapshot",
    "apply_admin_snapshot",
    "set_upstream_state",
    "set_upstream_weight",
    "upstream_rows",
]


class AdminError(Exception):
    """A command naming a route or an upstream that the relay does not have."""


def _runtime(relay: Relay, route: str) -> RouteRuntime:
    for runtime in relay.runtimes:
        if runtime.route.name == route:
            return runtime
    names = ", ".join(runtime.route.name for runtime in relay.runtimes) or "none"
    raise AdminError(f"no route {route} (routes: {names})")


def _members(runtime: RouteRuntime, address: str) -> list[UpstreamRuntime]:
    members = [member for member in runtime.upstreams if names_member(address, member)]
    if members:
        return members
    configured = [str(upstream.address) for upstream in runtime.route.upstreams]
    labels = [m.label for m in runtime.upstreams if m.label not in configured]
    has = ", ".join(configured)
    if labels:
        has += "; members of names: " + ", ".join(labels)
    if address_of_label(address) in configured and address not in configured:
        raise AdminError(
            f"upstream {address_of_label(address)} of route {runtime.route.name} "
            f"has no member {address} now (it has: {has})"
        )
    raise AdminError(f"no upstream {address} in route {runtime.route.name} (it has: {has})")


def set_upstream_state(
    relay: Relay,
    route: str,
    address: str,
    state: AdminState,
    *,
    kill_connections: bool = False,
) -> dict[str, object]:
    """Put the members that ADDRESS names in `state` (see the module docstring).

    Returns {"route", "address", "state", "upstreams": [{"upstream", "previous"}],
    "killed_connections"}.
    """
    state = AdminState(state)
    if kill_connections and state is not AdminState.MAINT:
        raise AdminError("kill_connections goes with state maint only")
    runtime = _runtime(relay, route)
    members = _members(runtime, address)
    previous = [member.admin for member in members]
    relay.admin.record(route, address, state)
    runtime.apply_admin()
    killed = _kill_connections(relay, route, members) if kill_connections else 0
    log.info(
        "upstream admin state set",
        extra={
            "fields": {
                "route": route,
                "upstream": address,
                "state": state.value,
                "members": [member.label for member in members],
                "killed_connections": killed,
            }
        },
    )
    return {
        "route": route,
        "address": address,
        "state": state.value,
        "upstreams": [
            {"upstream": member.label, "previous": before.value}
            for member, before in zip(members, previous, strict=True)
        ],
        "killed_connections": killed,
    }


def _kill_connections(relay: Relay, route: str, members: Sequence[UpstreamRuntime]) -> int:
    """Close the connections established to `members` (by any runtime of `route`, one
    from before a reload included); returns how many."""
    # A member's counters are shared by every member of the same label in the route,
    # old and new, so they identify its connections across a reload.
    targets = {id(member.stats) for member in members}
    doomed = [
        session
        for session, owner in list(relay.table.sessions.items())
        if owner.route.name == route
        and session.upstream_stats is not None
        and id(session.upstream_stats) in targets
    ]
    for session in doomed:
        session.stop(Outcome.KILLED)
    return len(doomed)


def set_upstream_weight(relay: Relay, route: str, address: str, weight: int) -> dict[str, object]:
    """Give the members that ADDRESS names `weight` for new connections.

    Returns {"route", "address", "weight", "upstreams": [{"upstream", "previous"}]}.
    """
    runtime = _runtime(relay, route)
    members = _members(runtime, address)
    previous = [member.weight for member in members]
    relay.admin.record(route, address, Weight(weight, members[0].config.weight))
    runtime.apply_admin()
    log.info(
        "upstream weight set",
        extra={
            "fields": {
                "route": route,
                "upstream": address,
                "weight": weight,
                "members": [member.label for member in members],
            }
        },
    )
    return {
        "route": route,
        "address": address,
        "weight": weight,
        "upstreams": [
            {"upstream": member.label, "previous": before}
            for member, before in zip(members, previous, strict=True)
        ],
    }


def upstream_rows(relay: Relay, route: str | None) -> list[dict[str, object]]:
    """One row per member of every route, or of `route`, for `show upstreams`.

    Keys: route, address (as configured), upstream (the member's label), resolved,
    weight, configured_weight, admin_state, health ("up" or "down"), health_checks
    ("on", "off" or "paused" in maint), last_check ("passed", "failed" or None),
    last_check_age_seconds (or None), active (connections open now) and connect_errors
    (failed connects so far, every reason).
    """
    runtimes = list(relay.runtimes) if route is None else [_runtime(relay, route)]
    now = time.time()
    rows: list[dict[str, object]] = []
    for runtime in runtimes:
        errors = dict(runtime.stats.connect_errors)
        checked = runtime.route.health_check is not None
        for member in runtime.upstreams:
            if not checked:
                checks = "off"
            elif member.admin is AdminState.MAINT:
                checks = "paused"
            else:
                checks = "on"
            rows.append(
                {
                    "route": runtime.route.name,
                    "address": str(member.config.address),
                    "upstream": member.label,
                    "resolved": _resolved(member),
                    "weight": member.weight,
                    "configured_weight": member.config.weight,
                    "admin_state": member.admin.value,
                    "health": "up" if member.health.up else "down",
                    "health_checks": checks,
                    "last_check": member.last_check or None,
                    "last_check_age_seconds": (
                        round(max(0.0, now - member.last_check_time), 3)
                        if member.last_check
                        else None
                    ),
                    "active": member.stats.active,
                    "connect_errors": sum(
                        count for (label, _reason), count in errors.items() if label == member.label
                    ),
                }
            )
    return rows


def _resolved(member: UpstreamRuntime) -> str:
    target = member.target
    if target.family == socket.AF_UNIX:
        return f"unix:{target.sockaddr}"
    return format_endpoint(endpoint_of(target.family, target.sockaddr))


def admin_snapshot(relay: Relay) -> list[dict[str, object]]:
    """Every admin setting held, in order, as JSON-able dicts: for `apply_admin_snapshot`
    in a relay started later (a restarted worker)."""
    return relay.admin.snapshot()


def apply_admin_snapshot(relay: Relay, snapshot: Sequence[object]) -> None:
    """Take the settings of `admin_snapshot` (from another process of the same config),
    after those held; settings for routes or addresses not in this relay's config are
    dropped. Raises AdminError, changing nothing, on a malformed snapshot."""
    try:
        relay.admin.load(snapshot)
    except SnapshotError as error:
        raise AdminError(f"bad admin snapshot: {error}") from None
    relay.admin.prune(relay.config)
    relay.apply_admin(relay.runtimes)
