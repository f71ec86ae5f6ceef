"""The control socket of a relay with `workers: 2`: the supervisor answers for both.

Real processes on loopback: `splicerelay run` with two workers, and `splicerelay ctl` /
`splicerelay reload` (or the client library, for a raw line) as an operator runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from splicerelay.protocol.control import Reply
from splicerelay.relay.control_client import send_command
from tests.support.control import socket_dir
from tests.support.harness import Relay, RelayFactory, child_pids, free_port, poll_until
from tests.support.peers import connect, echo, start_server

pytestmark = pytest.mark.timeout(120)

WORKERS = 2
STEP_TIMEOUT = 30.0
# Connections opened, at most, until both workers hold some.
MAX_CONNECTIONS = 64


def workers_config(control: Path, listen: int, upstreams: list[str]) -> str:
    listed = "".join(f"      - address: {address}\n" for address in upstreams)
    return (
        f"workers: {WORKERS}\n"
        "metrics:\n"
        "  listen: 127.0.0.1:{metrics_port}\n"
        "log: {level: info, format: json, access_log: false}\n"
        "shutdown_timeout: 5s\n"
        "control:\n"
        f"  socket: {control}\n"
        "routes:\n"
        "  - name: web\n"
        f"    listen: 127.0.0.1:{listen}\n"
        "    upstreams:\n"
        f"{listed}"
    )


@pytest.fixture
def control_dir() -> Iterator[Path]:
    with socket_dir() as directory:
        yield directory


def cli(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splicerelay", *words],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )


def ctl_json(control: Path, *words: str) -> tuple[int, Any]:
    """`splicerelay ctl -s CONTROL --json WORDS...`: exit code and the reply's data."""
    done = cli("ctl", "-s", str(control), "--json", *words)
    try:
        return done.returncode, json.loads(done.stdout).get("data")
    except json.JSONDecodeError:
        raise AssertionError(f"ctl printed no JSON: {done.stdout!r} {done.stderr!r}") from None


def ask(control: Path, line: str) -> Reply:
    return send_command(str(control), line, STEP_TIMEOUT)


def ready_workers(control: Path, relay: Relay) -> list[dict[str, Any]]:
    """The supervisor's worker rows, once `WORKERS` ready workers are its children."""
    found: list[dict[str, Any]] = []

    def all_ready() -> bool:
        nonlocal found
        reply = ask(control, "show info")
        assert reply.ok, reply
        found = reply.data["worker_processes"]
        pids = sorted(row["pid"] for row in found)
        return (
            len(found) == WORKERS
            and all(row["state"] == "ready" for row in found)
            and pids == sorted(child_pids(relay.pid))
        )

    poll_until(all_ready, STEP_TIMEOUT, f"{WORKERS} ready workers")
    return found


async def start_relay(
    relay_factory: RelayFactory, control: Path, upstreams: list[str]
) -> tuple[Relay, int]:
    listen = free_port()
    relay = await relay_factory.astart(workers_config(control, listen, upstreams))
    await trio.to_thread.run_sync(ready_workers, control, relay)
    return relay, listen


async def test_show_info_is_the_supervisors_and_lists_both_workers(
    relay_factory: RelayFactory, control_dir: Path
) -> None:
    control = control_dir / "control.sock"
    relay, _ = await start_relay(relay_factory, control, ["127.0.0.1:9"])
    code, info = await trio.to_thread.run_sync(ctl_json, control, "show", "info")
    assert code == 0
    assert info["pid"] == relay.pid
    assert info["workers"] == WORKERS
    assert info["config_path"] == str(relay.config_path)
    rows = info["worker_processes"]
    assert sorted(row["slot"] for row in rows) == [0, 1]
    assert sorted(row["pid"] for row in rows) == sorted(child_pids(relay.pid))
    # People get a table with both workers too.
    table = await trio.to_thread.run_sync(lambda: cli("ctl", "-s", str(control), "show", "info"))
    assert table.returncode == 0
    for row in rows:
        assert str(row["pid"]) in table.stdout


async def test_connections_of_both_workers_are_listed_and_killed_by_slot_and_id(
    relay_factory: RelayFactory, control_dir: Path
) -> None:
    control = control_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        _, listen = await start_relay(relay_factory, control, [f"127.0.0.1:{upstream}"])
        clients: list[trio.SocketStream] = []
        rows: list[dict[str, Any]] = []
        try:
            # The workers take turns at the shared listener as the kernel wakes them:
            # open connections until both hold some.
            while len(clients) < MAX_CONNECTIONS:
                client = await connect(listen)
                clients.append(client)
                await client.send_all(b"x")
                assert await client.receive_some(1) == b"x"  # relayed: it has an upstream
                reply = await trio.to_thread.run_sync(ask, control, "show connections")
                assert reply.ok, reply
                rows = reply.data
                if len(rows) == len(clients) and {row["worker"] for row in rows} == {0, 1}:
                    break
            assert {row["worker"] for row in rows} == {0, 1}, rows
            ids = [row["id"] for row in rows]
            assert len(set(ids)) == len(ids) == len(clients)
            assert all(row["id"].startswith(f"{row['worker']}:") for row in rows)

            # Kill one of worker 1's: only that client sees its connection end.
            victim = next(row for row in rows if row["worker"] == 1)
            code, killed = await trio.to_thread.run_sync(
                ctl_json, control, "kill", "connection", victim["id"]
            )
            assert code == 0, killed
            assert killed["slot"] == 1
            after = await trio.to_thread.run_sync(ask, control, "show connections")
            assert victim["id"] not in [row["id"] for row in after.data]
            assert len(after.data) == len(clients) - 1
            # A plain number is not an id with workers.
            plain = await trio.to_thread.run_sync(ask, control, "kill connection 1")
            assert not plain.ok and "SLOT:ID" in (plain.error or "")
        finally:
            for client in clients:
                await client.aclose()
            nursery.cancel_scope.cancel()


def upstream_rows(control: Path, address: str) -> list[dict[str, Any]]:
    reply = ask(control, "show upstreams web")
    assert reply.ok, reply
    return [row for row in reply.data if row["address"] == address]


async def test_drain_is_applied_by_both_workers_and_by_a_restarted_one(
    relay_factory: RelayFactory, control_dir: Path
) -> None:
    control = control_dir / "control.sock"
    drained, other = "127.0.0.1:9", "127.0.0.1:10"
    relay, _ = await start_relay(relay_factory, control, [drained, other])
    code, data = await trio.to_thread.run_sync(
        ctl_json, control, "set", "upstream", "web", drained, "state", "drain"
    )
    assert code == 0, data
    assert sorted(item["slot"] for item in data["applied"]) == [0, 1]
    assert data["failed"] == []
    [row] = await trio.to_thread.run_sync(upstream_rows, control, drained)
    assert row["admin_state"] == "drain"
    assert "workers" not in row  # both workers say the same

    # SIGKILL one worker: its replacement comes up drained too.
    killed = child_pids(relay.pid)[0]
    os.kill(killed, signal.SIGKILL)

    def replaced() -> bool:
        now = child_pids(relay.pid)
        return len(now) == WORKERS and killed not in now

    await trio.to_thread.run_sync(poll_until, replaced, STEP_TIMEOUT, "a new worker")
    rows = await trio.to_thread.run_sync(ready_workers, control, relay)
    assert killed not in [row["pid"] for row in rows]
    [row] = await trio.to_thread.run_sync(upstream_rows, control, drained)
    assert row["admin_state"] == "drain", row
    [row] = await trio.to_thread.run_sync(upstream_rows, control, other)
    assert row["admin_state"] == "ready", row


async def test_reload_reports_every_workers_outcome(
    relay_factory: RelayFactory, control_dir: Path
) -> None:
    control = control_dir / "control.sock"
    listen = free_port()
    relay = await relay_factory.astart(workers_config(control, listen, ["127.0.0.1:9"]))
    await trio.to_thread.run_sync(ready_workers, control, relay)
    config_path = relay.config_path
    good = config_path.read_text().replace("127.0.0.1:9\n", "127.0.0.1:10\n")

    # A good config: live in both workers.
    config_path.write_text(good)
    done = await trio.to_thread.run_sync(lambda: cli("reload", "-c", str(config_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    reply = await trio.to_thread.run_sync(ask, control, "reload")
    assert reply.ok, reply
    assert reply.data["result"] == "ok"
    pids = sorted(child_pids(relay.pid))
    assert sorted(w["pid"] for w in reply.data["workers"]) == pids
    assert {w["result"] for w in reply.data["workers"]} == {"ok"}

    # Valid, but no worker can resolve its upstream: refused by each, the old one stays.
    config_path.write_text(good.replace("127.0.0.1:10", "nonexistent.invalid:10"))
    done = await trio.to_thread.run_sync(lambda: cli("reload", "-c", str(config_path)))
    assert done.returncode == 1, done.stdout + done.stderr
    reply = await trio.to_thread.run_sync(ask, control, "reload")
    assert not reply.ok
    assert reply.data["result"] == "refused"
    assert "every worker refused" in (reply.error or "")
    assert sorted(w["pid"] for w in reply.data["workers"]) == pids
    assert {w["result"] for w in reply.data["workers"]} == {"refused"}
    # Each worker's own reason.
    assert all("nonexistent.invalid" in w["error"] for w in reply.data["workers"]), reply.data

    # Not even valid: the supervisor refuses it before any worker sees it.
    config_path.write_text(good + "bogus_key: 1\n")
    reply = await trio.to_thread.run_sync(ask, control, "reload")
    assert not reply.ok
    assert reply.data == {"result": "refused", "workers": [], "error": reply.error}
    assert "bogus_key" in (reply.error or "")

    # Through all this, the good config still serves, in both workers.
    [row] = await trio.to_thread.run_sync(upstream_rows, control, "127.0.0.1:10")
    assert row["admin_state"] == "ready"
    code, info = await trio.to_thread.run_sync(ctl_json, control, "show", "info")
    assert code == 0
    assert info["last_reload"]["result"] == "refused"
