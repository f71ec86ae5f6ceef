"""`systemctl reload` and the control socket of the shipped unit, under a real systemd.

The acceptance tests of a reload that tells the truth: the unit's ExecReload= runs
`splicerelay reload`, which waits for the outcome, so `systemctl reload` returns once
the new config is live (a connection to a new route succeeds at once, no polling) and
fails when the config is refused, with the reason in the unit's journal. A transfer in
flight during the reload completes intact. `splicerelay ctl`, run as root, reaches the
relay through the unit's runtime directory.

Run it as root:

    .venv/bin/python -m pytest -q tests/e2e/test_systemd_reload.py

See tests/e2e/test_systemd_container.py for how the container is built and booted
(SPLICERELAY_TEST_ROOTFS keeps the base rootfs across runs). The container shares the
host's network: the relay in it listens on 127.0.0.1 ports picked free here and relays
to upstreams this test serves on the host.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.support.container import (
    CONFIG,
    Container,
    service_journal,
    start_service,
    unit_property,
)
from tests.support.gated import GatedUpstreams, LongTransfer, expected_payload, short_visit
from tests.support.harness import free_port

# A real peer: systemd, in a container. The first test of a session may first build
# the rootfs (bounded at 4 minutes): more than the default per-test timeout.
pytestmark = [pytest.mark.peer, pytest.mark.timeout(600)]

UNIT = "splicerelay.service"
RUNTIME_DIRECTORY = "/run/splicerelay"
CONTROL_SOCKET = f"{RUNTIME_DIRECTORY}/control.sock"
# `systemctl reload` waits for ExecReload=, which waits for the relay: bounded here.
RELOAD_TIMEOUT = 60.0


def route(name: str, listen: int, upstream: int) -> str:
    return (
        f"  - name: {name}\n"
        f"    listen: 127.0.0.1:{listen}\n"
        "    upstreams:\n"
        f"      - address: 127.0.0.1:{upstream}\n"
    )


def config_text(*routes: str, workers: int = 1) -> str:
    return (
        f"workers: {workers}\n"
        "metrics:\n"
        f"  listen: 127.0.0.1:{free_port()}\n"
        "log: {level: info, format: json, access_log: true}\n"
        "shutdown_timeout: 5s\n"
        "routes:\n" + "".join(routes)
    )


def systemctl_reload(container: Container) -> subprocess.CompletedProcess[str]:
    return container.run("systemctl", "reload", UNIT, check=False, timeout=RELOAD_TIMEOUT)


def ctl(container: Container, *words: str) -> subprocess.CompletedProcess[str]:
    """`splicerelay ctl WORDS` as root inside the container, outside the service: it finds
    the socket in the unit's runtime directory."""
    return container.run("splicerelay", "ctl", *words, check=False)


def ctl_json(container: Container, *words: str) -> Any:
    result = ctl(container, "--json", *words)
    assert result.returncode == 0, f"ctl {' '.join(words)}: {result.stdout}{result.stderr}"
    reply = json.loads(result.stdout)
    # The reply as the socket sent it, or only its data: either way, the data.
    if isinstance(reply, dict) and "ok" in reply and "data" in reply:
        assert reply["ok"] is True, reply
        return reply["data"]
    return reply


def entries_of_run(container: Container, invocation: str) -> list[str]:
    """The unit's journal lines of this run: the relay's, ExecReload's and systemd's
    own about the unit (which carry the invocation id as INVOCATION_ID)."""
    lines = service_journal(container, "-o", "json").splitlines()
    found = []
    for line in lines:
        entry = json.loads(line)
        if invocation in (entry.get("_SYSTEMD_INVOCATION_ID"), entry.get("INVOCATION_ID")):
            text = entry.get("MESSAGE", "")
            found.append(bytes(text).decode() if isinstance(text, list) else str(text))
    return found


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port this test holds listening on the host (and so in the container, which
    shares the network): a relay cannot bind it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


async def assert_reload_live_during_a_transfer(container: Container, workers: int) -> None:
    """Start the unit, start a transfer, reload to a config with a second route, and
    check that the second route answers as soon as `systemctl reload` returns, in the
    same main process, and that the transfer then completes intact."""
    upstreams = GatedUpstreams()
    async with trio.open_nursery() as nursery:
        first_upstream, second_upstream = await upstreams.start(nursery, 2)
        first, second = free_port(), free_port()
        old = config_text(route("web", first, first_upstream), workers=workers)
        await trio.to_thread.run_sync(start_service, container, old)
        main_pid = unit_property(container, "MainPID")

        transfer = LongTransfer()
        nursery.start_soon(transfer.run, first)
        with trio.fail_after(10):
            await transfer.started.wait()
        assert transfer.tag == b"u0"

        new = config_text(
            route("web", first, first_upstream),
            route("second", second, second_upstream),
            workers=workers,
        )
        container.write(CONFIG, new)
        reloaded = await trio.to_thread.run_sync(systemctl_reload, container)
        assert reloaded.returncode == 0, (
            f"systemctl reload failed: {reloaded.stderr}\n{service_journal(container)[-3000:]}"
        )
        # Live now, not eventually: ExecReload= waited for every process to take it.
        assert await short_visit(second) == b"u1"
        assert await short_visit(first) == b"u0"
        assert unit_property(container, "MainPID") == main_pid
        assert unit_property(container, "ActiveState") == "active"
        assert transfer.result is None, "the transfer must still be in flight"

        upstreams.gate.set()
        with trio.fail_after(30):
            while transfer.result is None:
                await trio.sleep(0.05)
        assert transfer.result == expected_payload()
        nursery.cancel_scope.cancel()


async def test_reload_succeeds_during_a_transfer_and_the_new_config_is_live(
    systemd_container: Container,
) -> None:
    await assert_reload_live_during_a_transfer(systemd_container, workers=1)


async def test_reload_with_two_workers_is_live_in_both(systemd_container: Container) -> None:
    await assert_reload_live_during_a_transfer(systemd_container, workers=2)
    # The supervisor answers on the unit's socket, for both of its workers.
    info = ctl_json(systemd_container, "show", "info")
    assert info["pid"] == int(unit_property(systemd_container, "MainPID"))
    assert info["workers"] == 2, info
    pids = {worker["pid"] for worker in info["worker_processes"]}
    assert len(pids) == 2 and info["pid"] not in pids, info


async def test_reload_of_a_broken_config_fails_and_the_old_one_keeps_serving(
    systemd_container: Container,
) -> None:
    upstreams = GatedUpstreams()
    async with trio.open_nursery() as nursery:
        (upstream,) = await upstreams.start(nursery, 1)
        listen = free_port()
        good = config_text(route("web", listen, upstream))
        invocation = await trio.to_thread.run_sync(start_service, systemd_container, good)
        main_pid = unit_property(systemd_container, "MainPID")

        # An unknown key, on a line of its own: the error must name the file and line.
        broken_lines = good.splitlines()
        broken_lines.insert(len(broken_lines) - 2, "    listen_twice: 127.0.0.1:1")
        bad_line = len(broken_lines) - 2  # 1-based number of the inserted line
        systemd_container.write(CONFIG, "\n".join(broken_lines) + "\n")

        reloaded = await trio.to_thread.run_sync(systemctl_reload, systemd_container)
        assert reloaded.returncode != 0, "systemctl reload must fail on a broken config"
        journal = "\n".join(entries_of_run(systemd_container, invocation))
        assert re.search(rf"{re.escape(CONFIG)}:{bad_line}:.*listen_twice", journal), journal

        # The old config goes on serving, in the same process.
        assert unit_property(systemd_container, "ActiveState") == "active"
        assert unit_property(systemd_container, "MainPID") == main_pid
        assert await short_visit(listen) == b"u0"
        nursery.cancel_scope.cancel()


async def test_reload_refused_by_the_relay_fails_with_its_reason(
    systemd_container: Container, held_port: int
) -> None:
    """A config that validates but cannot be applied (its new listen address is taken)
    is refused by the running relay, not by the check: the refusal must still reach
    `systemctl reload` as a failure, with the relay's reason in the journal."""
    upstreams = GatedUpstreams()
    async with trio.open_nursery() as nursery:
        first_upstream, second_upstream = await upstreams.start(nursery, 2)
        listen = free_port()
        invocation = await trio.to_thread.run_sync(
            start_service, systemd_container, config_text(route("web", listen, first_upstream))
        )
        systemd_container.write(
            CONFIG,
            config_text(
                route("web", listen, first_upstream), route("taken", held_port, second_upstream)
            ),
        )
        checked = systemd_container.run("splicerelay", "check", "-c", CONFIG, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        reloaded = await trio.to_thread.run_sync(systemctl_reload, systemd_container)
        assert reloaded.returncode != 0, "systemctl reload must fail on a refused config"
        journal = "\n".join(entries_of_run(systemd_container, invocation))
        assert re.search(rf"127\.0\.0\.1:{held_port}.*(in use|[Ee]rrno 98)", journal), journal
        assert unit_property(systemd_container, "ActiveState") == "active"
        assert await short_visit(listen) == b"u0"
        nursery.cancel_scope.cancel()


async def test_ctl_show_info_reaches_the_relay_through_the_runtime_directory(
    systemd_container: Container,
) -> None:
    upstreams = GatedUpstreams()
    async with trio.open_nursery() as nursery:
        (upstream,) = await upstreams.start(nursery, 1)
        await trio.to_thread.run_sync(
            start_service, systemd_container, config_text(route("web", free_port(), upstream))
        )
        main_pid = int(unit_property(systemd_container, "MainPID"))

        # The socket and its directory: the dynamic user's, and no one else's.
        stat = systemd_container.run(
            "stat", "-c", "%a %u %F", RUNTIME_DIRECTORY, CONTROL_SOCKET
        ).stdout.split("\n")
        directory_mode, directory_uid, _ = stat[0].split(" ", 2)
        socket_mode, socket_uid, kind = stat[1].split(" ", 2)
        assert (directory_mode, socket_mode, kind) == ("700", "600", "socket")
        service_uid = systemd_container.run("stat", "-c", "%u", f"/proc/{main_pid}").stdout
        assert directory_uid == socket_uid == service_uid.strip() != "0"

        info = ctl_json(systemd_container, "show", "info")
        assert info["pid"] == main_pid
        assert info["config_path"] == CONFIG, info
        # For people, a table: the same facts.
        table = ctl(systemd_container, "show", "info")
        assert table.returncode == 0 and str(main_pid) in table.stdout, table

        # Another user is kept out by the directory before the socket's own check.
        other = systemd_container.run(
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "splicerelay",
            "ctl",
            "--socket",
            CONTROL_SOCKET,
            "show",
            "info",
            check=False,
        )
        assert other.returncode != 0
        assert "permission denied" in (other.stdout + other.stderr).lower(), other
        nursery.cancel_scope.cancel()
