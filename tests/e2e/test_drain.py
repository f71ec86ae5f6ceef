"""Taking an upstream out for a deploy, under load, with `workers: 2`.

The README's "Taking an upstream out for a deploy", step by step, against the real relay
on loopback: a route with three upstreams, a steady stream of short connections and a
few long transfers. `set upstream ... state drain` on one upstream: no connection that
starts after the reply reaches it, and every transfer already on it completes with its
sha256 intact. The drain holds across `splicerelay reload` and across a worker that is
SIGKILLed and started again. `state ready`: new connections reach it again.

Which upstream served a connection is read from the upstream itself (each names itself
first: tests/support/gated.py), and when a connection started is taken on the client's
side, before its connect: one started after the drain's reply cannot have been accepted
by a worker before that worker applied the drain.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from splicerelay.protocol.control import AdminState, Reply, SetUpstreamState, parse_command
from splicerelay.relay.control_client import send_command
from tests.support.control import socket_dir
from tests.support.gated import GatedUpstreams, LongTransfer, expected_payload, short_visit
from tests.support.harness import Relay, RelayFactory, child_pids, free_port, poll_until

pytestmark = pytest.mark.timeout(180)

ROUTE = "web"
LONG_TRANSFERS = 6
# Short connections that must all avoid the drained upstream, after each step.
VISITS_PER_STEP = 60
# Bounds: the whole stream of short connections, and each wait in the steps.
MAX_VISITS = 20_000
STEP_TIMEOUT = 30.0
WORKERS = 2


def drain_config(control_socket: Path, listen: int, ports: list[int], extra: str = "") -> str:
    upstreams = "".join(f"      - address: 127.0.0.1:{port}\n" for port in ports)
    return (
        f"workers: {WORKERS}\n"
        "metrics:\n"
        "  listen: 127.0.0.1:{metrics_port}\n"
        "log: {level: info, format: json, access_log: false}\n"
        "shutdown_timeout: 5s\n"
        "control:\n"
        f"  socket: {control_socket}\n"
        "routes:\n"
        f"  - name: {ROUTE}\n"
        f"    listen: 127.0.0.1:{listen}\n"
        "    balance: round_robin\n"
        "    upstreams:\n"
        f"{upstreams}{extra}"
    )


def extra_route(listen: int, port: int) -> str:
    return (
        "  - name: extra\n"
        f"    listen: 127.0.0.1:{listen}\n"
        "    upstreams:\n"
        f"      - address: 127.0.0.1:{port}\n"
    )


@dataclass
class Visit:
    started: float
    ended: float
    tag: bytes | None  # None: the connection failed
    error: str = ""


@dataclass
class ShortStream:
    """Short connections through the relay, two at a time, until stopped (bounded)."""

    port: int
    visits: list[Visit] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(self._loop)

    async def _loop(self) -> None:
        while not self.stop.is_set() and len(self.visits) < MAX_VISITS:
            started = time.monotonic()
            try:
                with trio.fail_after(10):
                    tag: bytes | None = await short_visit(self.port)
                error = ""
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, AssertionError) as e:
                tag, error = None, repr(e)
            self.visits.append(Visit(started, time.monotonic(), tag, error))

    def since(self, moment: float, until: float = math.inf) -> list[Visit]:
        """The visits that started after `moment` and ended before `until`."""
        return [v for v in self.visits if v.started > moment and v.ended < until]

    async def wait_visits_since(self, moment: float, count: int) -> None:
        with trio.fail_after(STEP_TIMEOUT):
            while len([v for v in self.since(moment) if v.tag is not None]) < count:
                await trio.sleep(0.01)

    async def wait_tag_since(self, moment: float, tag: bytes) -> None:
        with trio.fail_after(STEP_TIMEOUT):
            while not any(v.tag == tag for v in self.since(moment)):
                await trio.sleep(0.01)


class Control:
    """Lines to the relay's control socket, as an operator would send them."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    async def ask(self, line: str) -> Any:
        reply: Reply = await trio.to_thread.run_sync(send_command, self.path, line, 30.0)
        assert reply.ok, f"{line!r} was refused: {reply.error} {reply.data}"
        return reply.data


def admin_state_of(rows: Any, address: str) -> set[str]:
    """The admin states `show upstreams` reports for `address` (one per worker, or one
    merged), whatever the rows' exact shape: every row that names the address."""
    states: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if address in (str(node.get("address")), str(node.get("upstream"))):
                for key in ("admin_state", "admin", "state"):
                    if isinstance(node.get(key), str):
                        states.add(node[key])
                        break
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(rows)
    return states


def reload_cli(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splicerelay", "reload", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def workers_of(relay: Relay, count: int, timeout: float = 20.0) -> list[int]:
    found: list[int] = []

    def has_count() -> bool:
        found[:] = child_pids(relay.pid)
        return len(found) == count

    poll_until(has_count, timeout, f"{count} worker processes")
    return found


@pytest.fixture
def control_dir() -> Iterator[Path]:
    with socket_dir() as directory:
        yield directory


async def test_drain_for_a_deploy_under_load(
    relay_factory: RelayFactory, control_dir: Path
) -> None:
    upstreams = GatedUpstreams()
    async with trio.open_nursery() as nursery:
        ports = await upstreams.start(nursery, 4)
        route_ports, extra_port = ports[:3], ports[3]
        listen = free_port()
        control_socket = control_dir / "control.sock"
        relay = await relay_factory.astart(drain_config(control_socket, listen, route_ports))
        control = Control(control_socket)
        workers = await trio.to_thread.run_sync(workers_of, relay, WORKERS)

        # A few long transfers, spread over the upstreams by round robin.
        transfers = [LongTransfer() for _ in range(LONG_TRANSFERS)]
        for transfer in transfers:
            nursery.start_soon(transfer.run, listen)
        with trio.fail_after(STEP_TIMEOUT):
            for transfer in transfers:
                await transfer.started.wait()
        # Drain the upstream that holds the most of them.
        tags = [transfer.tag for transfer in transfers]
        target = max(sorted(set(tags)), key=tags.count)
        on_target = tags.count(target)
        address = f"127.0.0.1:{upstreams.ports[target]}"

        # The steady stream reaches every upstream, the target too (so the checks below
        # could fail).
        stream = ShortStream(listen)
        nursery.start_soon(stream.run)
        begin = time.monotonic()
        for tag in upstreams.ports:
            if tag != b"u3":
                await stream.wait_tag_since(begin, tag)

        # 1. Drain it. From the reply on, no new connection reaches it.
        changed = await control.ask(f"set upstream {ROUTE} {address} state drain")
        drained = time.monotonic()
        assert changed, "the reply says what changed"
        assert admin_state_of(await control.ask(f"show upstreams {ROUTE}"), address) == {"drain"}
        # Its open transfers go on: the active connections count them, and only them.
        assert (
            relay.metrics().get(
                "splicerelay_upstream_connections_active", route=ROUTE, upstream=address
            )
            == on_target
        )
        await stream.wait_visits_since(drained, VISITS_PER_STEP)

        # 2. A reload (which adds a route, to show it took) keeps the drain, and the
        #    transfers in flight.
        config_path, extra_listen = relay.config_path, free_port()
        new_config = drain_config(
            control_socket, listen, route_ports, extra=extra_route(extra_listen, extra_port)
        )
        config_path.write_text(new_config.replace("{metrics_port}", str(relay.metrics_port)))
        reloaded = await trio.to_thread.run_sync(reload_cli, config_path)
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
        after_reload = time.monotonic()
        assert await short_visit(extra_listen) == b"u3"
        assert admin_state_of(await control.ask(f"show upstreams {ROUTE}"), address) == {"drain"}
        await stream.wait_visits_since(after_reload, VISITS_PER_STEP)
        assert all(transfer.result is None for transfer in transfers)

        # 3. Every transfer completes intact, those on the drained upstream too; then
        #    nothing is left on it: the moment to deploy.
        upstreams.gate.set()
        with trio.fail_after(STEP_TIMEOUT):
            while any(transfer.result is None for transfer in transfers):
                await trio.sleep(0.05)
        for transfer in transfers:
            assert transfer.result == expected_payload(), transfer.tag

        def target_idle() -> bool:
            return (
                relay.metrics().get(
                    "splicerelay_upstream_connections_active", route=ROUTE, upstream=address
                )
                == 0
            )

        await trio.to_thread.run_sync(poll_until, target_idle, STEP_TIMEOUT, "no connection")

        # 4. A worker SIGKILLed and started again comes back with the drain.
        killed = workers[0]
        os.kill(killed, signal.SIGKILL)
        killed_at = time.monotonic()

        def replaced() -> bool:
            now = child_pids(relay.pid)
            return len(now) == WORKERS and killed not in now

        await trio.to_thread.run_sync(poll_until, replaced, STEP_TIMEOUT, "a new worker")
        restarted = await trio.to_thread.run_sync(workers_of, relay, WORKERS)
        # Both workers answer, and both say drain.
        with trio.fail_after(STEP_TIMEOUT):
            while True:
                try:
                    rows = await control.ask(f"show upstreams {ROUTE}")
                except AssertionError:
                    await trio.sleep(0.05)  # the new worker not answering yet
                    continue
                if admin_state_of(rows, address) == {"drain"}:
                    break
                await trio.sleep(0.05)
        back = time.monotonic()
        await stream.wait_visits_since(back, VISITS_PER_STEP)

        # 5. Ready again: new connections reach it.
        # (A worker may take it before the reply, which waits for both: the checks
        # below end when the command is sent.)
        readying = time.monotonic()
        await control.ask(f"set upstream {ROUTE} {address} state ready")
        readied = time.monotonic()
        await stream.wait_tag_since(readied, target)
        stream.stop.set()
        nursery.cancel_scope.cancel()  # the upstream servers

    # No connection that started after the drain's reply and ended before `ready` was
    # sent reached the drained upstream.
    leaked = [v for v in stream.since(drained, until=readying) if v.tag == target]
    assert leaked == [], f"{len(leaked)} connections reached {address} while it drained"
    # Connections fail only while a worker was being killed and replaced.
    failed = [v for v in stream.visits if v.tag is None]
    outside = [v for v in failed if not (killed_at - 1 < v.started < back)]
    assert outside == [], f"connections failed outside the worker's restart: {outside[:3]}"
    assert set(restarted) != set(workers)


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_deploy_steps_are_commands_the_relay_takes() -> None:
    """Every `splicerelay ctl ...` of the README's deploy steps parses as a command, and
    the steps drain, watch and put back, in that order, as the test above does."""
    text = README.read_text()
    start = text.index("### Taking an upstream out for a deploy")
    section = text[start : text.index("\n### ", start + 1)]
    lines = re.findall(r"splicerelay ctl ([^`\n]+)", section)
    # ID stands for a connection id, as `show connections` prints it.
    commands = [parse_command(re.sub(r"\bID\b", "17", line).strip().encode()) for line in lines]
    kinds = [type(command).__name__ for command in commands]
    assert kinds[:2] == ["SetUpstreamState", "ShowUpstreams"], kinds
    states = [c.state for c in commands if isinstance(c, SetUpstreamState)]
    assert states[:2] == [AdminState.DRAIN, AdminState.READY], states
    assert AdminState.MAINT in states
