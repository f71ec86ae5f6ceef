"""Members of a route: every address of a host name, refreshed in the background.

The resolver is a FakeResolver (no DNS); health checks and connects are real, on loopback.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterator

import pytest
import trio

from splicerelay.config import Route, parse_config
from splicerelay.config.addresses import TcpAddress
from splicerelay.datapath.session import UpstreamTarget
from splicerelay.datapath.stats import RouteStats
from splicerelay.protocol.balancer import make_strategy
from splicerelay.relay.members import (
    HealthChecks,
    forget_gone_members,
    maintain_members,
    refresh_members,
)
from splicerelay.relay.routes import RouteRuntime
from splicerelay.relay.upstreams import (
    ResolveError,
    UpstreamRuntime,
    make_upstreams,
    resolve_all,
)
from tests.support.harness import refused_port
from tests.support.names import FakeResolver

NAME = "multi.test"
MakeRuntime = Callable[[Route, FakeResolver], RouteRuntime]


def route_of(upstreams: str, extra: str = "") -> Route:
    text = f"routes:\n  - name: web\n    listen: 127.0.0.1:1\n    upstreams:\n{upstreams}{extra}"
    return parse_config(text, "relay.yaml").routes[0]


@pytest.fixture
def runtime_of() -> Iterator[MakeRuntime]:
    """`runtime_of(route, resolver)`: a route's runtime as prepare_routes makes it, but
    with a listener socket that is never bound (closed after the test)."""
    made: list[RouteRuntime] = []

    def make(route: Route, resolver: FakeResolver) -> RouteRuntime:
        stats = RouteStats(route.name)
        members = make_upstreams(route.upstreams, route.health_check, stats.upstream, resolver)
        runtime = RouteRuntime(
            route=route,
            listener=socket.socket(),
            upstreams=members,
            strategy=make_strategy(
                route.balance, [m.label for m in members], [m.config.weight for m in members]
            ),
            stats=stats,
            slots=trio.Semaphore(1),
        )
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.listener.close()


def labels(members: list[UpstreamRuntime]) -> list[str]:
    return [member.label for member in members]


def targets(host: str, *addresses: str) -> list[UpstreamTarget]:
    """What a refresh of `host`:8000 finds when it resolves to `addresses`."""
    return resolve_all(TcpAddress(host, 8000), FakeResolver({host: list(addresses)}))


# ----- at load ------------------------------------------------------------------------


def test_every_address_of_a_name_is_a_member_with_the_configured_weight():
    resolver = FakeResolver({NAME: ["10.0.0.2", "10.0.0.3", "10.0.0.2", "2001:db8::4"]})
    route = route_of(
        f"      - address: {NAME}:8000\n        weight: 3\n"
        "      - address: 10.0.0.9:8000\n"
        "      - address: unix:/run/backend.sock\n"
    )
    members = make_upstreams(route.upstreams, None, RouteStats("web").upstream, resolver)
    assert labels(members) == [
        f"{NAME}:8000@10.0.0.2",  # the repeated record is one member
        f"{NAME}:8000@10.0.0.3",
        f"{NAME}:8000@2001:db8::4",
        "10.0.0.9:8000",  # a literal keeps its plain name
        "unix:/run/backend.sock",
    ]
    assert [member.config.weight for member in members] == [3, 3, 3, 1, 1]
    assert [member.slot for member in members] == [0, 0, 0, 1, 2]
    assert members[2].target.family == socket.AF_INET6
    assert members[2].target.sockaddr == ("2001:db8::4", 8000, 0, 0)
    assert resolver.asked == [NAME, "10.0.0.9"]


def test_resolve_first_keeps_the_first_address_only():
    resolver = FakeResolver({NAME: ["10.0.0.3", "10.0.0.2"]})
    route = route_of(f"      - address: {NAME}:8000\n        resolve: first\n")
    members = make_upstreams(route.upstreams, None, RouteStats("web").upstream, resolver)
    assert labels(members) == [f"{NAME}:8000@10.0.0.3"]


def test_a_name_that_does_not_resolve_stops_the_load():
    route = route_of("      - address: nowhere.test:8000\n")
    with pytest.raises(ResolveError, match=r"cannot resolve nowhere\.test:8000"):
        make_upstreams(route.upstreams, None, RouteStats("web").upstream, FakeResolver({}))


def test_round_robin_shares_connections_over_the_addresses_by_weight(
    runtime_of: MakeRuntime,
):
    resolver = FakeResolver({NAME: ["10.0.0.2", "10.0.0.3"]})
    route = route_of(f"      - address: {NAME}:8000\n      - address: 10.0.0.9:8000\n")
    runtime = runtime_of(route, resolver)
    picks = [runtime.upstreams[runtime.attempt_order("192.0.2.1")[0]].label for _ in range(30)]
    # Each address is a member of the name's weight: three members, a third each.
    assert {label: picks.count(label) for label in set(picks)} == {
        f"{NAME}:8000@10.0.0.2": 10,
        f"{NAME}:8000@10.0.0.3": 10,
        "10.0.0.9:8000": 10,
    }


# ----- refreshing ---------------------------------------------------------------------


def test_a_refresh_adds_and_removes_members_and_keeps_the_others(
    runtime_of: MakeRuntime,
):
    resolver = FakeResolver({NAME: ["10.0.0.1", "10.0.0.2"]})
    route = route_of(
        f"      - address: {NAME}:8000\n      - address: 10.0.0.9:8000\n",
        "    health_check: {interval: 1s, rise: 2, fall: 1}\n",
    )
    runtime = runtime_of(route, resolver)
    first, second, literal = runtime.upstreams
    second.mark(False)  # down: a refresh must not bring it back
    second.stats.active = 2
    first.stats.active = 1  # a connection still open to an address that goes away
    runtime.stats.connect_errors[(first.label, "refused")] += 1
    old_list, old_strategy = runtime.upstreams, runtime.strategy

    # The same addresses in another order: nothing changes.
    assert not refresh_members(runtime, {0: targets(NAME, "10.0.0.2", "10.0.0.1")})
    assert runtime.upstreams is old_list and runtime.strategy is old_strategy

    assert refresh_members(runtime, {0: targets(NAME, "10.0.0.3", "10.0.0.2")})
    assert runtime.upstreams is not old_list, "connections being set up keep the old list"
    assert labels(old_list) == [f"{NAME}:8000@10.0.0.1", f"{NAME}:8000@10.0.0.2", "10.0.0.9:8000"]
    assert labels(runtime.upstreams) == [
        f"{NAME}:8000@10.0.0.2",  # stays, in its place
        f"{NAME}:8000@10.0.0.3",  # new, after it
        "10.0.0.9:8000",
    ]
    kept, added, still_literal = runtime.upstreams
    assert kept is second and still_literal is literal
    assert not kept.health.up and kept.stats.active == 2, "health and counters survive"
    assert added.health.up and added.health.rise == 2 and added.slot == 0
    assert added.stats is runtime.stats.upstreams[added.label]
    # The strategy is the new list's: every index it gives is one of the three.
    orders = [runtime.attempt_order(None) for _ in range(6)]
    assert {index for order in orders for index in order} == {1, 2}  # kept is down

    forget_gone_members(runtime.stats, runtime.upstreams)
    gone = runtime.stats.upstreams[first.label]
    assert gone.up is False, "a removed address takes no new connections"
    gone.active = 0  # its last connection closed
    forget_gone_members(runtime.stats, runtime.upstreams)
    assert set(runtime.stats.upstreams) == set(labels(runtime.upstreams))
    assert not runtime.stats.connect_errors


def test_a_failed_lookup_keeps_the_last_good_members(
    runtime_of: MakeRuntime,
):
    resolver = FakeResolver({NAME: ["10.0.0.1"], "other.test": ["10.0.1.1"]})
    route = route_of(f"      - address: {NAME}:8000\n      - address: other.test:8000\n")
    runtime = runtime_of(route, resolver)
    before = list(runtime.upstreams)
    # Slot 0's lookup failed (no answer); slot 1's changed.
    assert refresh_members(runtime, {1: targets("other.test", "10.0.1.2")})
    assert runtime.upstreams[0] is before[0]
    assert labels(runtime.upstreams) == [f"{NAME}:8000@10.0.0.1", "other.test:8000@10.0.1.2"]


def test_resolve_first_follows_the_first_answer(
    runtime_of: MakeRuntime,
):
    resolver = FakeResolver({NAME: ["10.0.0.1", "10.0.0.2"]})
    route = route_of(f"      - address: {NAME}:8000\n        resolve: first\n")
    runtime = runtime_of(route, resolver)
    assert not refresh_members(runtime, {0: targets(NAME, "10.0.0.1", "10.0.0.3")})
    assert refresh_members(runtime, {0: targets(NAME, "10.0.0.2", "10.0.0.1")})
    assert labels(runtime.upstreams) == [f"{NAME}:8000@10.0.0.2"]


async def test_the_refresh_loop_resolves_off_the_event_loop_and_applies_answers(
    runtime_of: MakeRuntime,
):
    resolver = FakeResolver({NAME: ["10.0.0.1", "10.0.0.2"]})
    route = route_of(f"      - address: {NAME}:8000\n      - address: 10.0.0.9:8000\n")
    route = dataclasses.replace(route, resolve_interval=0.01)
    runtime = runtime_of(route, resolver)
    answers: list[list[str] | None] = [
        ["10.0.0.2", "10.0.0.1"],  # rotated: no change
        None,  # an outage: keep the last good
        ["10.0.0.2", "10.0.0.3"],
    ]
    # The members each lookup found in place: the outcome of the one before.
    seen: list[list[str]] = []
    finished = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def on_call(host: str) -> None:
        assert host == NAME, "IP literals are never looked up again"
        # Runs in the resolver's worker thread: look at the route from the event loop.
        seen.append(trio.from_thread.run_sync(labels, runtime.upstreams, trio_token=token))
        step = len(seen) - 1
        if step >= len(answers):
            trio.from_thread.run_sync(finished.set, trio_token=token)
            raise socket.gaierror(socket.EAI_AGAIN, "no more answers")
        resolver.table[NAME] = answers[step]

    resolver.asked.clear()
    resolver.on_call = on_call
    async with trio.open_nursery() as nursery:
        nursery.start_soon(maintain_members, runtime, resolver)
        with trio.fail_after(10):
            await finished.wait()
        nursery.cancel_scope.cancel()
    one, two, three, literal = (
        f"{NAME}:8000@10.0.0.1",
        f"{NAME}:8000@10.0.0.2",
        f"{NAME}:8000@10.0.0.3",
        "10.0.0.9:8000",
    )
    assert seen == [
        [one, two, literal],  # as resolved at load
        [one, two, literal],  # the rotated answer changed nothing
        [one, two, literal],  # the failed lookup kept the last good
        [two, three, literal],  # and the next answer took over
    ]


async def test_health_checks_follow_the_members(
    runtime_of: MakeRuntime,
):
    probes: dict[str, int] = {"a": 0, "b": 0}

    async def counting(name: str, task_status: trio.TaskStatus[int]) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            probes[name] += 1
            await stream.aclose()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners)

    async with trio.open_nursery() as servers:
        port_a = await servers.start(counting, "a")
        port_b = await servers.start(counting, "b")
        dead = refused_port()
        route = route_of(
            f"      - address: 127.0.0.1:{port_a}\n"
            f"      - address: 127.0.0.1:{port_b}\n"
            f"      - address: 127.0.0.1:{dead}\n",
            "    health_check: {interval: 20ms, timeout: 20ms, rise: 1, fall: 1}\n",
        )
        runtime = runtime_of(route, FakeResolver({}))
        a, b, down = runtime.upstreams
        async with trio.open_nursery() as nursery:
            checks = HealthChecks(nursery, route.health_check)
            checks.follow([a, down])
            with trio.fail_after(10):
                while probes["a"] < 2 or down.health.up:
                    await trio.sleep(0.01)
            checks.follow([b, down])  # a leaves, b comes
            after_leaving = probes["a"]
            with trio.fail_after(10):
                while probes["b"] < 3:
                    await trio.sleep(0.01)
            # b was probed three times meanwhile; a was not probed again (one probe may
            # have been under way when its check stopped).
            assert probes["a"] <= after_leaving + 1
            nursery.cancel_scope.cancel()
        servers.cancel_scope.cancel()
