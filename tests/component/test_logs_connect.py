"""What the log says about failed upstream connects: warnings an operator can act on,
rate-limited per upstream, and an access line that names the upstream tried.

Upstreams are real loopback ports (one bound and never listening refuses; a listener
with a full accept queue never answers). The warnings' rate limit runs on a clock the
test sets; the relay runs in process, with a hook that keeps every access record.
"""

from __future__ import annotations

import _socket
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack

import pytest
import trio

from splicerelay.bench.procs import free_port
from splicerelay.config import parse_config
from splicerelay.datapath.reactor import Reactor
from splicerelay.datapath.session import Session
from splicerelay.datapath.stats import RelayStats
from splicerelay.ops.ratelimit import RateLimit
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay import connector as connector_module
from splicerelay.relay.connector import Connector
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.listeners import ListenerSet
from splicerelay.relay.routes import RouteRuntime, prepare_routes
from splicerelay.relay.upstreams import UpstreamRuntime
from tests.support.fakes import ending_of, open_client, port_of, route_config, serving
from tests.support.peers import blackholed_listener
from tests.support.scripted import bound_port, close_idle_reactor, refusing_port, upstream_at

TIMEOUT = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def warn_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A fresh rate limit for the connect warnings, on a clock the test moves."""
    clock = Clock()
    limit: RateLimit[tuple[str, str]] = RateLimit(connector_module.CONNECT_WARNING_INTERVAL, clock)
    monkeypatch.setattr(connector_module, "connect_warnings", limit)
    return clock


@pytest.fixture
def ports() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="splicerelay")
    return caplog


def connect_failures(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, object]]]:
    """(level, fields) of every "upstream connect failed" record."""
    return [
        (record.levelname.lower(), record.fields)  # type: ignore[attr-defined]
        for record in caplog.records
        if record.getMessage() == "upstream connect failed"
    ]


def label(sock: object) -> str:
    return f"127.0.0.1:{bound_port(sock)}"  # type: ignore[arg-type]


def failing_connector(
    reactor: Reactor, upstreams: list[UpstreamRuntime], route: str = "web"
) -> Connector:
    def done(sock: _socket.socket | None, upstream: UpstreamRuntime | None) -> None:
        assert sock is None  # these upstreams never accept

    return Connector(
        upstreams, list(range(len(upstreams))), TIMEOUT, False, Counter(), reactor, route, done
    )


@pytest.fixture
async def reactor() -> AsyncIterator[Reactor]:
    reactor = Reactor()
    yield reactor
    close_idle_reactor(reactor)


async def test_a_refused_connect_is_a_warning_naming_route_upstream_and_reason(
    reactor: Reactor, ports: ExitStack, warn_clock: Clock, logged: pytest.LogCaptureFixture
) -> None:
    dead = ports.enter_context(refusing_port())
    connector = failing_connector(reactor, [upstream_at(bound_port(dead))])
    connector.start(trio.current_time())
    assert connect_failures(logged) == [
        (
            "warning",
            {"route": "web", "upstream": label(dead), "reason": "refused", "suppressed": 0},
        )
    ]


async def test_a_timed_out_connect_is_a_warning_with_reason_timeout(
    reactor: Reactor, ports: ExitStack, warn_clock: Clock, logged: pytest.LogCaptureFixture
) -> None:
    listener, fillers = blackholed_listener()
    for sock in (listener, *fillers):
        ports.enter_context(sock)
    connector = failing_connector(reactor, [upstream_at(bound_port(listener))])
    connector.start(100.0)
    assert connect_failures(logged) == []  # still in progress
    connector.expire(100.0 + TIMEOUT)
    assert connect_failures(logged) == [
        (
            "warning",
            {"route": "web", "upstream": label(listener), "reason": "timeout", "suppressed": 0},
        )
    ]


async def test_connect_warnings_are_limited_per_upstream_and_count_what_they_held_back(
    reactor: Reactor, ports: ExitStack, warn_clock: Clock, logged: pytest.LogCaptureFixture
) -> None:
    first, second = ports.enter_context(refusing_port()), ports.enter_context(refusing_port())

    def fail_once(sock: object, route: str = "web") -> None:
        failing_connector(reactor, [upstream_at(bound_port(sock))], route).start(0.0)  # type: ignore[arg-type]

    for _ in range(5):
        fail_once(first)
    fail_once(second)  # another upstream: its own limit
    fail_once(first, route="api")  # the same address in another route: its own too
    warn_clock.now = 9.9
    fail_once(first)
    levels = [
        (level, fields["upstream"], fields["route"]) for level, fields in connect_failures(logged)
    ]
    assert levels == [
        ("warning", label(first), "web"),
        *[("debug", label(first), "web")] * 4,  # held back, but there at debug level
        ("warning", label(second), "web"),
        ("warning", label(first), "api"),
        ("debug", label(first), "web"),
    ]
    logged.clear()
    warn_clock.now = 10.0
    fail_once(first)
    assert connect_failures(logged) == [
        (
            "warning",
            {"route": "web", "upstream": label(first), "reason": "refused", "suppressed": 5},
        )
    ]


# ----- the access record ----------------------------------------------------------------


class Records:
    """The relay's access hook: keeps each connection's access-log fields."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []
        self.changed = trio.Event()

    def __call__(self, runtime: RouteRuntime, session: Session, outcome: Outcome) -> None:
        # The fields relay/service.write_access_log writes, from the same attributes.
        self.records.append(
            {
                "route": runtime.route.name,
                "client": session.client_address,
                "upstream": session.upstream_label or None,
                "bytes_in": session.bytes_in,
                "bytes_out": session.bytes_out,
                "duration_seconds": round(trio.current_time() - session.started, 6),
                "outcome": outcome.value,
            }
        )
        self.changed.set()

    async def wait_for(self, count: int) -> list[dict[str, object]]:
        with trio.fail_after(10):
            while len(self.records) < count:
                self.changed = trio.Event()
                await self.changed.wait()
        return self.records


def relay_with_records(route_yaml: str) -> tuple[Relay, Records]:
    config = parse_config(route_config(route_yaml), "component.yaml")
    stats = RelayStats()
    listeners = ListenerSet()
    records = Records()
    relay = Relay(
        config, prepare_routes(config, stats, listeners), stats, listeners, access=records
    )
    return relay, records


def route_to(*labels: str, extra: str = "") -> str:
    upstreams = "".join(f"      - address: {address}\n" for address in labels)
    return f"  - name: web\n    listen: 127.0.0.1:{free_port()}\n    upstreams:\n{upstreams}{extra}"


async def test_the_access_record_of_a_failed_connect_names_the_last_upstream_tried(
    ports: ExitStack, warn_clock: Clock
) -> None:
    dead = [ports.enter_context(refusing_port()) for _ in range(3)]
    relay, records = relay_with_records(route_to(*(label(sock) for sock in dead)))
    async with serving(relay):
        client = await open_client(port_of(relay))
        [record] = await records.wait_for(1)
        assert await ending_of(client) == "eof"
        await client.aclose()
    assert record["outcome"] == "connect_failed"
    # Each was tried once; the record names the one tried last.
    tried = list(relay.stats.routes["web"].connect_errors)
    assert sorted(tried) == sorted((label(sock), "refused") for sock in dead)
    assert record["upstream"] == tried[-1][0]
    # Every other field as before.
    assert set(record) == {
        "route",
        "client",
        "upstream",
        "bytes_in",
        "bytes_out",
        "duration_seconds",
        "outcome",
    }
    assert (record["route"], record["bytes_in"], record["bytes_out"]) == ("web", 0, 0)


async def test_a_connection_stopped_while_connecting_names_the_upstream_it_was_trying(
    ports: ExitStack, warn_clock: Clock
) -> None:
    listener, fillers = blackholed_listener()
    for sock in (listener, *fillers):
        ports.enter_context(sock)
    relay, records = relay_with_records(
        route_to(label(listener), extra="    connect_timeout: 1h\n")
    )
    async with serving(relay):
        client = await open_client(port_of(relay))
        with trio.fail_after(10):
            while not relay.table.connecting:
                await trio.sleep(0.01)  # bounded poll: the accept loop takes the client
        relay.stop_all_sessions()
        [record] = await records.wait_for(1)
        await client.aclose()
    assert record["outcome"] == "shutdown"
    assert record["upstream"] == label(listener)


async def test_a_connection_turned_away_before_any_connect_names_no_upstream(
    ports: ExitStack, warn_clock: Clock
) -> None:
    dead = ports.enter_context(refusing_port())
    relay, records = relay_with_records(route_to(label(dead), extra="    allow: [10.0.0.0/8]\n"))
    async with serving(relay):
        client = await open_client(port_of(relay))
        [record] = await records.wait_for(1)
        await client.aclose()
    assert record["outcome"] == "denied"
    assert record["upstream"] is None
