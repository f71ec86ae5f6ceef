"""The shipped systemd unit, unchanged, under a real systemd booted in a container.

Run it as root:

    .venv/bin/python -m pytest -q tests/e2e/test_systemd_container.py tests/e2e/test_journald.py

The first run builds a Debian rootfs with debootstrap (about a minute, at most four)
and caches it in the temp dir; set SPLICERELAY_TEST_ROOTFS=/some/dir to keep it
elsewhere, across reboots. Later runs take seconds: build the relay's wheels, install them
into a layer over the cached rootfs, boot. Without root, debootstrap or systemd-nspawn
(Debian packages debootstrap, systemd-container) the tests skip. See
tests/support/container.py for how the container is put together.

The container shares the host's network: the relay it runs listens on 127.0.0.1 ports
picked free here, and relays to upstreams this test serves on the host.
"""

from __future__ import annotations

import functools

import pytest
import trio

from tests.support.container import Container, start_service, unit_property
from tests.support.harness import free_port
from tests.support.peers import echo, round_trip

# A real peer: systemd, in a container. The first test of a session may first build
# the rootfs (bounded at 4 minutes): more than the default per-test timeout.
pytestmark = [pytest.mark.peer, pytest.mark.timeout(600)]


def config_text(listen_port: int, upstream_port: int) -> str:
    return (
        "metrics:\n"
        f"  listen: 127.0.0.1:{free_port()}\n"
        "shutdown_timeout: 5s\n"
        "routes:\n"
        "  - name: web\n"
        f"    listen: 127.0.0.1:{listen_port}\n"
        "    upstreams:\n"
        f"      - address: 127.0.0.1:{upstream_port}\n"
    )


async def serve_echo(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def process_uid(container: Container, pid: str) -> int:
    status = container.run("cat", f"/proc/{pid}/status").stdout
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[1])


async def test_shipped_unit_starts_as_notify_service_and_relays(
    systemd_container: Container,
) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await serve_echo(nursery)
        listen = free_port()
        await trio.to_thread.run_sync(
            start_service, systemd_container, config_text(listen, upstream)
        )

        assert unit_property(systemd_container, "Type") == "notify"
        assert unit_property(systemd_container, "ActiveState") == "active"
        assert unit_property(systemd_container, "SubState") == "running"
        # The relay said how it is doing, over the notify socket.
        assert unit_property(systemd_container, "StatusText") != ""
        # DynamicUser=yes: not root.
        main_pid = unit_property(systemd_container, "MainPID")
        assert process_uid(systemd_container, main_pid) != 0

        payload = bytes(range(256)) * 64
        assert await round_trip(listen, payload) == payload
        nursery.cancel_scope.cancel()


async def test_reload_applies_a_new_config_in_the_same_process(
    systemd_container: Container,
) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await serve_echo(nursery)
        first, second = free_port(), free_port()
        await trio.to_thread.run_sync(
            start_service, systemd_container, config_text(first, upstream)
        )
        main_pid = unit_property(systemd_container, "MainPID")

        systemd_container.write("/etc/splicerelay/relay.yaml", config_text(second, upstream))
        # Nothing but the relay is needed (a minimal Debian has no /bin/kill: procps).
        await trio.to_thread.run_sync(
            systemd_container.run, "systemctl", "reload", "splicerelay.service"
        )

        # `systemctl reload` returns once the new config is live (ExecReload= runs
        # `splicerelay reload`, which waits for it): the new listener answers at once.
        assert await round_trip(second, b"reloaded") == b"reloaded"
        assert unit_property(systemd_container, "MainPID") == main_pid
        assert unit_property(systemd_container, "ActiveState") == "active"
        nursery.cancel_scope.cancel()


async def test_stop_exits_cleanly(systemd_container: Container) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await serve_echo(nursery)
        listen = free_port()
        await trio.to_thread.run_sync(
            start_service, systemd_container, config_text(listen, upstream)
        )
        await trio.to_thread.run_sync(
            systemd_container.run, "systemctl", "stop", "splicerelay.service"
        )
        assert unit_property(systemd_container, "ActiveState") == "inactive"
        # SIGTERM drained and exited 0: a success, not a kill or a failure.
        assert unit_property(systemd_container, "Result") == "success"
        assert unit_property(systemd_container, "ExecMainStatus") == "0"
        nursery.cancel_scope.cancel()
