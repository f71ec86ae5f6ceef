"""A host name with several addresses is several upstream members, as in nginx.

The relay runs in a mount namespace of its own, where /etc/hosts says that multi.test is
127.0.0.2 and 127.0.0.3 (see tests/support/names.py): the real resolver, no DNS, and the
machine's /etc/hosts untouched. Two upstream servers listen on the same port of the two
addresses and answer each connection with the address they listen on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.harness import Relay, RelayFactory, free_port, poll_until, relay_config
from tests.support.names import PrivateHosts, private_hosts_unavailable
from tests.support.peers import connect

NAME = "multi.test"
ADDRESSES = ["127.0.0.2", "127.0.0.3"]


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[PrivateHosts]:
    probe = tmp_path / "probe"
    probe.mkdir()
    reason = private_hosts_unavailable(probe)
    if reason:
        pytest.skip(reason)
    directory = tmp_path / "names"
    directory.mkdir()
    hosts = PrivateHosts(directory)
    hosts.write({NAME: ADDRESSES})
    yield hosts


class Servers:
    """One server per address, all on one port; each answers with its address, then
    echoes. `stop(address)` closes that server's listener: connects there are refused."""

    def __init__(self, nursery: trio.Nursery, port: int) -> None:
        self.nursery = nursery
        self.port = port
        self.scopes: dict[str, trio.CancelScope] = {}

    async def start(self, address: str) -> None:
        self.scopes[address] = await self.nursery.start(self._serve, address)

    async def _serve(self, address: str, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        async def answer(stream: trio.SocketStream) -> None:
            try:
                await stream.send_all(f"{address}\n".encode())
                async for data in stream:
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

        with trio.CancelScope() as scope:
            listeners = await trio.open_tcp_listeners(self.port, host=address)
            task_status.started(scope)
            await trio.serve_listeners(answer, listeners)

    def stop(self, address: str) -> None:
        self.scopes.pop(address).cancel()


async def who_answers(port: int) -> tuple[str, trio.SocketStream]:
    """Connect through the relay: the address of the upstream server that answered."""
    stream = await connect(port)
    line = b""
    with trio.fail_after(10):
        while not line.endswith(b"\n"):
            data = await stream.receive_some(64)
            assert data, f"the relay closed the connection after {line!r}"
            line += data
    return line.decode().strip(), stream


async def answers(port: int, count: int) -> Counter[str]:
    """Which upstream server answered each of `count` connections, one after another."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        address, stream = await who_answers(port)
        await stream.aclose()
        seen[address] += 1
    return seen


def access_upstreams(relay: Relay) -> Counter[str]:
    """The upstream field of the access log's lines."""
    seen: Counter[str] = Counter()
    for line in relay.stdout().splitlines():
        if '"message": "connection"' in line:
            seen[json.loads(line[line.index("{") :])["upstream"]] += 1
    return seen


def config(listen_port: int, upstream_port: int, extra: str = "", upstream: str = "") -> str:
    """One route to multi.test:`upstream_port`; `upstream` adds to the upstream's keys,
    `extra` to the route's."""
    return relay_config(
        listen_port, extra=f"      - address: {NAME}:{upstream_port}\n{upstream}{extra}"
    )


async def start_relay(relay_factory: RelayFactory, hosts: PrivateHosts, text: str) -> Relay:
    return await relay_factory.astart(text, prefix=hosts.prefix)


async def test_connections_balance_over_every_address_of_a_name(
    relay_factory: RelayFactory, hosts: PrivateHosts
):
    listen_port, upstream_port = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, upstream_port)
        for address in ADDRESSES:
            await servers.start(address)
        relay = await start_relay(relay_factory, hosts, config(listen_port, upstream_port))
        # Round-robin over two members of weight 1 each: half each, exactly.
        assert await answers(listen_port, 10) == {"127.0.0.2": 5, "127.0.0.3": 5}

        labels = [f"{NAME}:{upstream_port}@{address}" for address in ADDRESSES]
        metrics = relay.metrics()
        for label in labels:
            assert metrics.get("splicerelay_upstream_up", upstream=label) == 1
            assert (
                metrics.get("splicerelay_upstream_connect_duration_seconds_count", upstream=label)
                == 5
            )
        await trio.to_thread.run_sync(relay.wait_settled)
        # The access log names the address each connection went to (its lines are
        # written in batches, within 50 ms of the connection's end).
        await trio.to_thread.run_sync(
            poll_until, lambda: sum(access_upstreams(relay).values()) >= 10, 5, "10 access lines"
        )
        assert access_upstreams(relay) == {label: 5 for label in labels}

        # One server goes away: every connection fails over to the other.
        servers.stop("127.0.0.2")
        assert await answers(listen_port, 6) == {"127.0.0.3": 6}
        nursery.cancel_scope.cancel()


async def test_resolve_first_sends_everything_to_one_address(
    relay_factory: RelayFactory, hosts: PrivateHosts
):
    listen_port, upstream_port = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, upstream_port)
        for address in ADDRESSES:
            await servers.start(address)
        text = config(listen_port, upstream_port, upstream="        resolve: first\n")
        relay = await start_relay(relay_factory, hosts, text)
        seen = await answers(listen_port, 6)
        assert len(seen) == 1 and sum(seen.values()) == 6, seen
        (address,) = seen
        metrics = relay.metrics()
        assert metrics.get("splicerelay_upstream_up", upstream=f"{NAME}:{upstream_port}@{address}")
        other = next(a for a in ADDRESSES if a != address)
        absent = metrics.get(
            "splicerelay_upstream_up", default=-1.0, upstream=f"{NAME}:{upstream_port}@{other}"
        )
        assert absent == -1.0, "the other address is not a member"
        nursery.cancel_scope.cancel()


async def test_a_refresh_moves_new_connections_and_keeps_open_ones(
    relay_factory: RelayFactory, hosts: PrivateHosts
):
    listen_port, upstream_port = free_port(), free_port()
    old, new = (f"{NAME}:{upstream_port}@{address}" for address in ADDRESSES)
    hosts.write({NAME: ["127.0.0.2"]})
    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, upstream_port)
        for address in ADDRESSES:
            await servers.start(address)
        text = config(listen_port, upstream_port, extra="    resolve_interval: 100ms\n")
        relay = await start_relay(relay_factory, hosts, text)
        address, held = await who_answers(listen_port)
        assert address == "127.0.0.2"

        hosts.write({NAME: ["127.0.0.3"]})

        def moved() -> bool:
            metrics = relay.metrics()
            return (
                metrics.get("splicerelay_upstream_up", default=-1.0, upstream=new) == 1
                and metrics.get("splicerelay_upstream_up", default=-1.0, upstream=old) == 0
            )

        # The old address still has a connection: its series stays, as down, until then.
        await trio.to_thread.run_sync(poll_until, moved, 10, "the refresh to swap the members")
        assert await answers(listen_port, 4) == {"127.0.0.3": 4}
        # The connection made before the refresh still carries bytes both ways.
        await held.send_all(b"still here")
        echoed = b""
        with trio.fail_after(10):
            while len(echoed) < len(b"still here"):
                echoed += await held.receive_some(64)
        assert echoed == b"still here"
        await held.aclose()

        def forgotten() -> bool:
            metrics = relay.metrics()
            return metrics.get("splicerelay_upstream_up", default=-1.0, upstream=old) == -1.0

        await trio.to_thread.run_sync(poll_until, forgotten, 10, "the old address's series to go")
        nursery.cancel_scope.cancel()


# ----- check --resolve ------------------------------------------------------------------


def write_config(path: Path, text: str) -> None:
    path.write_text(text.replace("{metrics_port}", "19109"))


def check(hosts: PrivateHosts, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "splicerelay", "check", "-c", str(path), *options]
    return subprocess.run(
        hosts.prefix + command, capture_output=True, text=True, timeout=60, check=False
    )


def test_check_resolve_says_what_names_resolve_to(tmp_path: Path, hosts: PrivateHosts):
    path = tmp_path / "relay.yaml"
    write_config(
        path,
        config(18080, 18000) + "      - address: 127.0.0.1:18001\n"
        f"      - address: {NAME}:18002\n        resolve: first\n",
    )
    plain = check(hosts, path)
    assert plain.returncode == 0, plain.stderr
    assert "#" not in plain.stderr
    resolved = check(hosts, path, "--resolve")
    assert resolved.returncode == 0, resolved.stderr
    assert resolved.stdout == plain.stdout, "the printed config is the same"
    notes = [line for line in resolved.stderr.splitlines() if line.startswith("# ")]
    assert notes == [
        f"# route test: {NAME}:18000 -> 127.0.0.2:18000, 127.0.0.3:18000",
        f"# route test: {NAME}:18002 -> 127.0.0.2:18002"
        " (resolve: first; not used: 127.0.0.3:18002)",
    ]


def test_check_resolve_fails_on_a_name_that_does_not_resolve(tmp_path: Path, hosts: PrivateHosts):
    path = tmp_path / "relay.yaml"
    write_config(path, config(18080, 18000) + "      - address: nowhere.test:18001\n")
    # Plain check does not resolve: it passes offline.
    plain = check(hosts, path)
    assert plain.returncode == 0, plain.stderr
    resolved = check(hosts, path, "--resolve")
    assert resolved.returncode == 1
    lines = resolved.stderr.strip().splitlines()
    assert lines == [
        f"{path}:10: routes[0].upstreams[1].address: cannot resolve nowhere.test:18001:"
        " [Errno -2] Name or service not known"
    ], resolved.stderr
    assert resolved.stdout == ""
