"""Admin settings on the members of a host name: by name, by member, and through refreshes.

The resolver is a FakeResolver (no DNS); nothing connects.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from splicerelay.config import parse_config
from splicerelay.config.addresses import TcpAddress
from splicerelay.datapath.stats import RelayStats
from splicerelay.protocol.control import AdminState
from splicerelay.relay.admin import (
    AdminError,
    admin_snapshot,
    set_upstream_state,
    set_upstream_weight,
    upstream_rows,
)
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.listeners import ListenerSet
from splicerelay.relay.members import refresh_members
from splicerelay.relay.routes import RouteRuntime, strategy_for
from splicerelay.relay.upstreams import make_upstreams, resolve_all
from tests.support.names import FakeResolver

NAME = "pool.test"
POOL = f"{NAME}:8000"
CONFIG = f"""\
routes:
  - name: web
    listen: 127.0.0.1:1
    upstreams:
      - {{address: 10.0.0.1:8000}}
      - {{address: "{POOL}", weight: 2}}
"""
DRAIN, MAINT, READY = AdminState.DRAIN, AdminState.MAINT, AdminState.READY


def label(ip: str) -> str:
    return f"{POOL}@{ip}"


@pytest.fixture
def relay() -> Iterator[Relay]:
    """A relay (never served) whose route web has 10.0.0.1 and pool.test's two
    addresses, 10.0.1.1 and 10.0.1.2."""
    config = parse_config(CONFIG, "relay.yaml")
    route = config.routes[0]
    stats = RelayStats()
    route_stats = stats.route("web")
    resolver = FakeResolver({NAME: ["10.0.1.1", "10.0.1.2"]})
    members = make_upstreams(route.upstreams, None, route_stats.upstream, resolver, route="web")
    runtime = RouteRuntime(
        route=route,
        listener=socket.socket(),
        upstreams=members,
        strategy=strategy_for(route, members),
        stats=route_stats,
        slots=trio.Semaphore(1),
    )
    yield Relay(config, [runtime], stats, ListenerSet())
    runtime.listener.close()


def states(relay: Relay) -> dict[str, str]:
    return {member.label: member.admin.value for member in relay.runtimes[0].upstreams}


def refresh(relay: Relay, *addresses: str) -> None:
    """A DNS refresh after which pool.test resolves to `addresses`."""
    found = resolve_all(TcpAddress(NAME, 8000), FakeResolver({NAME: list(addresses)}))
    refresh_members(relay.runtimes[0], {1: found})


def first_choices(relay: Relay, count: int) -> list[str]:
    runtime = relay.runtimes[0]
    return [runtime.upstreams[runtime.attempt_order(None)[0]].label for _ in range(count)]


def test_a_name_drains_all_its_members_and_one_member_can_come_back(relay: Relay) -> None:
    answer = set_upstream_state(relay, "web", POOL, DRAIN)
    assert answer["upstreams"] == [
        {"upstream": label("10.0.1.1"), "previous": "ready"},
        {"upstream": label("10.0.1.2"), "previous": "ready"},
    ]
    assert states(relay) == {
        "10.0.0.1:8000": "ready",
        label("10.0.1.1"): "drain",
        label("10.0.1.2"): "drain",
    }
    assert set(first_choices(relay, 6)) == {"10.0.0.1:8000"}
    # The last setting that names a member wins.
    set_upstream_state(relay, "web", label("10.0.1.2"), READY)
    assert states(relay)[label("10.0.1.2")] == "ready"
    assert states(relay)[label("10.0.1.1")] == "drain"
    assert set(first_choices(relay, 6)) == {"10.0.0.1:8000", label("10.0.1.2")}
    # A setting on the whole name again overrides the member's.
    set_upstream_state(relay, "web", POOL, MAINT)
    assert states(relay)[label("10.0.1.2")] == "maint"
    assert admin_snapshot(relay) == [{"route": "web", "address": POOL, "state": "maint"}]
    set_upstream_state(relay, "web", POOL, READY)
    assert set(states(relay).values()) == {"ready"}
    assert admin_snapshot(relay) == []


def test_a_member_a_refresh_adds_gets_its_names_state(relay: Relay) -> None:
    set_upstream_state(relay, "web", POOL, DRAIN)
    set_upstream_state(relay, "web", label("10.0.1.2"), READY)
    refresh(relay, "10.0.1.1", "10.0.1.2", "10.0.1.3")
    assert states(relay)[label("10.0.1.3")] == "drain"
    # 10.0.1.2 leaves the name and comes back: it is still the one set ready.
    refresh(relay, "10.0.1.1", "10.0.1.3")
    refresh(relay, "10.0.1.1", "10.0.1.3", "10.0.1.2")
    assert states(relay)[label("10.0.1.2")] == "ready"
    assert set(first_choices(relay, 8)) == {"10.0.0.1:8000", label("10.0.1.2")}


def test_a_member_a_refresh_adds_gets_its_names_weight(relay: Relay) -> None:
    set_upstream_weight(relay, "web", POOL, 6)
    refresh(relay, "10.0.1.1", "10.0.1.2", "10.0.1.3")
    weights = {member.label: member.weight for member in relay.runtimes[0].upstreams}
    assert weights == {
        "10.0.0.1:8000": 1,
        label("10.0.1.1"): 6,
        label("10.0.1.2"): 6,
        label("10.0.1.3"): 6,
    }
    picks = first_choices(relay, 19)
    assert picks.count("10.0.0.1:8000") == 1
    assert picks.count(label("10.0.1.3")) == 6


def test_a_member_not_resolved_now_is_an_error_naming_the_members(relay: Relay) -> None:
    with pytest.raises(AdminError) as error:
        set_upstream_state(relay, "web", label("10.0.1.9"), DRAIN)
    assert str(error.value) == (
        f"upstream {POOL} of route web has no member {label('10.0.1.9')} now "
        f"(it has: 10.0.0.1:8000, {POOL}; members of names: "
        f"{label('10.0.1.1')}, {label('10.0.1.2')})"
    )
    assert admin_snapshot(relay) == []


def test_rows_name_the_configured_address_and_the_member(relay: Relay) -> None:
    set_upstream_state(relay, "web", label("10.0.1.1"), MAINT)
    rows = {row["upstream"]: row for row in upstream_rows(relay, "web")}
    row = rows[label("10.0.1.1")]
    assert (row["address"], row["resolved"], row["admin_state"], row["weight"]) == (
        POOL,
        "10.0.1.1:8000",
        "maint",
        2,
    )
