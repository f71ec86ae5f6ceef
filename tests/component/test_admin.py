"""Admin states and weights on a relay in process (relay/admin.py), on loopback sockets.

drain stops new connections to an upstream while open ones go on; maint also pauses its
health checks and, with kill_connections, closes its connections (outcome `killed`); a
weight changes the share of new connections; all of it survives a reload while the
route and address stay configured.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from splicerelay.bench.procs import free_port
from splicerelay.config import HealthCheck, parse_config
from splicerelay.ops.metrics import RelayCollector
from splicerelay.protocol.control import AdminState
from splicerelay.relay.admin import (
    AdminError,
    admin_snapshot,
    apply_admin_snapshot,
    set_upstream_state,
    set_upstream_weight,
    upstream_rows,
)
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.upstreams import UpstreamRuntime, UpstreamTarget, run_health_checks
from tests.support.fakes import (
    Backend,
    build_relay,
    ending_of,
    open_client,
    port_of,
    round_trip,
    route_stats,
    serving,
)

DRAIN, MAINT, READY = AdminState.DRAIN, AdminState.MAINT, AdminState.READY


Upstream = int | tuple[int, int]  # a port, or (port, weight)


def config_text(*upstreams: Upstream, listen: int = 0, extra: str = "") -> str:
    """Route web on 127.0.0.1:`listen` (0: a free port) to the 127.0.0.1 `upstreams`."""
    lines = []
    for upstream in upstreams:
        port, weight = upstream if isinstance(upstream, tuple) else (upstream, 1)
        lines.append(f"      - {{address: 127.0.0.1:{port}, weight: {weight}}}\n")
    return (
        "shutdown_timeout: 1s\n"
        "routes:\n"
        "  - name: web\n"
        f"    listen: 127.0.0.1:{listen or free_port()}\n"
        "    upstreams:\n" + "".join(lines) + extra
    )


MakeRelay = Callable[[str], Relay]


@pytest.fixture
def idle_relay() -> Iterator[MakeRelay]:
    """`idle_relay(text)`: a relay for `text` that is never served (its listeners are
    closed after the test)."""
    made: list[Relay] = []

    def make(text: str) -> Relay:
        relay, _ = build_relay(text)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.listeners.close_all(lambda sock: sock.close())


def member(relay: Relay, label: str, route: str = "web") -> UpstreamRuntime:
    runtime = next(r for r in relay.runtimes if r.route.name == route)
    return next(m for m in runtime.upstreams if m.label == label)


async def visits(port: int, count: int) -> None:
    """`count` short connections through the relay, one after another."""
    for number in range(count):
        client = await open_client(port)
        payload = b"visit %d" % number
        assert await round_trip(client, payload) == payload
        await client.aclose()


async def test_drain_stops_new_connections_and_lets_the_open_one_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await Backend().start(nursery), await Backend().start(nursery)
        relay, outcomes = build_relay(config_text(a.port, b.port))
        async with serving(relay):
            port = port_of(relay)
            long_lived = await open_client(port)
            assert await round_trip(long_lived, b"first") == b"first"
            # round_robin's first pick is the first upstream.
            assert (a.accepted, b.accepted) == (1, 0)
            answer = set_upstream_state(relay, "web", f"127.0.0.1:{a.port}", DRAIN)
            assert answer == {
                "route": "web",
                "address": f"127.0.0.1:{a.port}",
                "state": "drain",
                "upstreams": [{"upstream": f"127.0.0.1:{a.port}", "previous": "ready"}],
                "killed_connections": 0,
            }
            await visits(port, 6)
            assert (a.accepted, b.accepted) == (1, 6)
            # The connection from before the drain carries on, both ways.
            assert await round_trip(long_lived, b"still here") == b"still here"
            set_upstream_state(relay, "web", f"127.0.0.1:{a.port}", READY)
            await visits(port, 6)
            assert a.accepted > 1
            await long_lived.aclose()
            await outcomes.wait_for(13)
        nursery.cancel_scope.cancel()
    assert route_stats(relay).outcomes == {"completed": 13}


async def test_maint_keeps_connections_unless_told_to_kill_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await Backend().start(nursery), await Backend().start(nursery)
        relay, outcomes = build_relay(config_text(a.port, b.port))
        async with serving(relay):
            port = port_of(relay)
            on_a = await open_client(port)
            assert await round_trip(on_a, b"a") == b"a"
            on_b = await open_client(port)
            assert await round_trip(on_b, b"b") == b"b"
            assert (a.accepted, b.accepted) == (1, 1)
            address = f"127.0.0.1:{a.port}"
            answer = set_upstream_state(relay, "web", address, MAINT)
            assert answer["killed_connections"] == 0
            assert await round_trip(on_a, b"maint alone") == b"maint alone"
            answer = set_upstream_state(relay, "web", address, MAINT, kill_connections=True)
            assert answer["killed_connections"] == 1
            assert answer["upstreams"] == [{"upstream": address, "previous": "maint"}]
            [killed] = await outcomes.wait_for(1)
            assert killed.outcome == "killed"
            assert await ending_of(on_a) in ("eof", "reset")
            await a.wait_until(lambda: len(a.endings) == 1)
            # The other upstream's connection is untouched, and new ones go there.
            assert await round_trip(on_b, b"b again") == b"b again"
            await visits(port, 3)
            assert (a.accepted, b.accepted) == (1, 4)
            await on_a.aclose()
            await on_b.aclose()
            await outcomes.wait_for(5)
        nursery.cancel_scope.cancel()
    assert route_stats(relay).outcomes == {"killed": 1, "completed": 4}
    assert route_stats(relay).upstreams[address].active == 0


def test_kill_connections_goes_with_maint_only(idle_relay: MakeRelay) -> None:
    relay = idle_relay(config_text(1, 2))
    with pytest.raises(AdminError, match="maint only"):
        set_upstream_state(relay, "web", "127.0.0.1:1", DRAIN, kill_connections=True)
    assert member(relay, "127.0.0.1:1").admin is READY


async def test_a_weight_changes_the_share_of_new_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await Backend().start(nursery), await Backend().start(nursery)
        relay, _ = build_relay(config_text(a.port, b.port))
        async with serving(relay):
            port = port_of(relay)
            await visits(port, 4)
            assert (a.accepted, b.accepted) == (2, 2)
            answer = set_upstream_weight(relay, "web", f"127.0.0.1:{a.port}", 3)
            assert answer["upstreams"] == [{"upstream": f"127.0.0.1:{a.port}", "previous": 1}]
            await visits(port, 8)
            assert (a.accepted - 2, b.accepted - 2) == (6, 2)
        nursery.cancel_scope.cancel()


def counting_probe(counts: Counter[str], verdict: bool = True):  # type: ignore[no-untyped-def]
    async def probe(target: UpstreamTarget, check: HealthCheck) -> bool:
        counts[target.label] += 1
        await trio.sleep(0.001)  # a real check takes a moment too
        return verdict

    return probe


async def test_maint_pauses_health_checks_and_drain_does_not(
    idle_relay: MakeRelay,
    autojump_clock: trio.testing.MockClock,
) -> None:
    relay = idle_relay(config_text(1, 2, extra="    health_check: {interval: 1s}\n"))
    first, second = member(relay, "127.0.0.1:1"), member(relay, "127.0.0.1:2")
    check = relay.runtimes[0].route.health_check
    assert check is not None
    counts: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_health_checks, first, check, counting_probe(counts))
        nursery.start_soon(run_health_checks, second, check, counting_probe(counts))
        await trio.sleep(9.5)
        assert counts == {"127.0.0.1:1": 10, "127.0.0.1:2": 10}
        set_upstream_state(relay, "web", "127.0.0.1:1", MAINT)
        set_upstream_state(relay, "web", "127.0.0.1:2", DRAIN)
        await trio.sleep(60)
        assert counts == {"127.0.0.1:1": 10, "127.0.0.1:2": 70}
        assert upstream_rows(relay, "web")[0]["health_checks"] == "paused"
        # Out of maint, the first check runs at once.
        set_upstream_state(relay, "web", "127.0.0.1:1", READY)
        await trio.sleep(0.5)
        assert counts["127.0.0.1:1"] == 11
        nursery.cancel_scope.cancel()


async def test_a_check_under_way_when_maint_begins_is_not_counted(
    idle_relay: MakeRelay,
    autojump_clock: trio.testing.MockClock,
) -> None:
    relay = idle_relay(config_text(1, 2, extra="    health_check: {interval: 1s, fall: 1}\n"))
    first = member(relay, "127.0.0.1:1")
    check = relay.runtimes[0].route.health_check
    assert check is not None
    started = trio.Event()

    async def slow_failing_probe(target: UpstreamTarget, check: HealthCheck) -> bool:
        started.set()
        await trio.sleep(0.5)
        return False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_health_checks, first, check, slow_failing_probe)
        await started.wait()
        set_upstream_state(relay, "web", "127.0.0.1:1", MAINT)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert first.health.up
    assert first.last_check == ""


async def test_state_and_weight_survive_a_reload_while_the_address_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b, c = [await Backend().start(nursery) for _ in range(3)]
        relay, _ = build_relay(config_text(a.port, b.port))
        listen = port_of(relay)

        async def reload(*upstreams: Upstream, extra: str = "") -> None:
            text = config_text(*upstreams, listen=listen, extra=extra)
            await relay.reload(parse_config(text, "reloaded.yaml"))

        async with serving(relay):
            set_upstream_state(relay, "web", f"127.0.0.1:{a.port}", DRAIN)
            set_upstream_weight(relay, "web", f"127.0.0.1:{b.port}", 7)
            # A third upstream and a new timeout: the route and both addresses stay.
            await reload(a.port, b.port, c.port, extra="    idle_timeout: 5m\n")
            assert member(relay, f"127.0.0.1:{a.port}").admin is DRAIN
            assert member(relay, f"127.0.0.1:{b.port}").weight == 7
            assert member(relay, f"127.0.0.1:{c.port}").admin is READY
            await visits(listen, 16)
            assert (a.accepted, b.accepted, c.accepted) == (0, 14, 2)
            # b's configured weight changes: the config wins over the operator's weight.
            await reload(a.port, (b.port, 2))
            assert member(relay, f"127.0.0.1:{b.port}").weight == 2
            assert member(relay, f"127.0.0.1:{a.port}").admin is DRAIN
            # a leaves the config: its drain is forgotten; back again, it is ready.
            await reload(c.port, b.port)
            await reload(a.port, b.port)
            assert member(relay, f"127.0.0.1:{a.port}").admin is READY
            assert admin_snapshot(relay) == []
        nursery.cancel_scope.cancel()


def test_unknown_route_or_address_names_what_exists(idle_relay: MakeRelay) -> None:
    relay = idle_relay(config_text(1, 2))
    with pytest.raises(AdminError) as route_error:
        set_upstream_state(relay, "api", "127.0.0.1:1", DRAIN)
    assert str(route_error.value) == "no route api (routes: web)"
    with pytest.raises(AdminError) as address_error:
        set_upstream_weight(relay, "web", "10.0.0.9:80", 5)
    assert str(address_error.value) == (
        "no upstream 10.0.0.9:80 in route web (it has: 127.0.0.1:1, 127.0.0.1:2)"
    )
    with pytest.raises(AdminError, match="no route api"):
        upstream_rows(relay, "api")
    assert [m.admin for m in relay.runtimes[0].upstreams] == [READY, READY]
    assert admin_snapshot(relay) == []


def test_show_upstreams_rows(idle_relay: MakeRelay) -> None:
    relay = idle_relay(config_text((1, 3), 2))
    set_upstream_state(relay, "web", "127.0.0.1:2", DRAIN)
    set_upstream_weight(relay, "web", "127.0.0.1:2", 9)
    first, second = upstream_rows(relay, None)
    assert first == {
        "route": "web",
        "address": "127.0.0.1:1",
        "upstream": "127.0.0.1:1",
        "resolved": "127.0.0.1:1",
        "weight": 3,
        "configured_weight": 3,
        "admin_state": "ready",
        "health": "up",
        "health_checks": "off",
        "last_check": None,
        "last_check_age_seconds": None,
        "active": 0,
        "connect_errors": 0,
    }
    assert (second["admin_state"], second["weight"], second["configured_weight"]) == ("drain", 9, 1)


def admin_gauges(relay: Relay) -> dict[tuple[str, str], float]:
    (family,) = (
        f
        for f in RelayCollector(relay.stats, "0").collect()
        if f.name == "splicerelay_upstream_admin_state"
    )
    return {(s.labels["upstream"], s.labels["state"]): s.value for s in family.samples}


def test_admin_state_gauge_is_one_for_the_state_and_zero_for_the_others(
    idle_relay: MakeRelay,
) -> None:
    relay = idle_relay(config_text(1, 2))
    set_upstream_state(relay, "web", "127.0.0.1:1", MAINT)
    assert admin_gauges(relay) == {
        ("127.0.0.1:1", "ready"): 0,
        ("127.0.0.1:1", "drain"): 0,
        ("127.0.0.1:1", "maint"): 1,
        ("127.0.0.1:2", "ready"): 1,
        ("127.0.0.1:2", "drain"): 0,
        ("127.0.0.1:2", "maint"): 0,
    }
    set_upstream_weight(relay, "web", "127.0.0.1:2", 4)
    (weights,) = (
        f
        for f in RelayCollector(relay.stats, "0").collect()
        if f.name == "splicerelay_upstream_weight"
    )
    assert {s.labels["upstream"]: s.value for s in weights.samples} == {
        "127.0.0.1:1": 1,
        "127.0.0.1:2": 4,
    }


def test_a_restarted_relay_takes_the_snapshot_of_another(idle_relay: MakeRelay) -> None:
    old = idle_relay(config_text(1, 2))
    set_upstream_state(old, "web", "127.0.0.1:1", MAINT)
    set_upstream_weight(old, "web", "127.0.0.1:2", 5)
    snapshot = admin_snapshot(old)
    assert snapshot == [
        {"route": "web", "address": "127.0.0.1:1", "state": "maint"},
        {"route": "web", "address": "127.0.0.1:2", "weight": 5, "configured_weight": 1},
    ]
    new = idle_relay(config_text(1, 2))  # the same config, another process
    apply_admin_snapshot(new, [*snapshot, {"route": "gone", "address": "x:1", "state": "drain"}])
    assert member(new, "127.0.0.1:1").admin is MAINT
    assert member(new, "127.0.0.1:2").weight == 5
    assert admin_snapshot(new) == snapshot  # the unknown route's setting is dropped
    with pytest.raises(AdminError, match="bad admin snapshot"):
        apply_admin_snapshot(new, [{"route": "web", "address": "127.0.0.1:2", "state": "off"}])
    assert admin_snapshot(new) == snapshot


def test_upstream_down_and_up_lines_name_the_route(
    idle_relay: MakeRelay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="splicerelay")
    relay = idle_relay(config_text(1, 2))
    first = member(relay, "127.0.0.1:1")
    first.mark(False)
    first.mark(True)
    lines = [
        (record.getMessage(), record.fields)  # type: ignore[attr-defined]
        for record in caplog.records
        if record.getMessage() in ("upstream down", "upstream up")
    ]
    assert lines == [
        ("upstream down", {"route": "web", "upstream": "127.0.0.1:1"}),
        ("upstream up", {"route": "web", "upstream": "127.0.0.1:1"}),
    ]


async def test_kill_connections_reaches_connections_from_before_a_reload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await Backend().start(nursery), await Backend().start(nursery)
        relay, outcomes = build_relay(config_text(a.port, b.port))
        listen = port_of(relay)
        async with serving(relay):
            old = await open_client(listen)
            assert await round_trip(old, b"before") == b"before"
            assert a.accepted == 1
            same = config_text(a.port, b.port, listen=listen, extra="    idle_timeout: 5m\n")
            await relay.reload(parse_config(same, "reloaded.yaml"))
            answer = set_upstream_state(
                relay, "web", f"127.0.0.1:{a.port}", MAINT, kill_connections=True
            )
            assert answer["killed_connections"] == 1
            [killed] = await outcomes.wait_for(1)
            assert killed.outcome == "killed"
            await old.aclose()
        nursery.cancel_scope.cancel()
