"""Settings that are valid but probably a mistake: `check` prints them, and the relay
logs them at warning level whenever it loads a config (at start and on every reload),
once per load however many workers there are."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio

from tests.support.harness import Relay, child_pids, free_port, is_running, poll_until
from tests.support.harness import relay_config as base_config
from tests.support.peers import echo, start_server

UNTRUSTED = "accept_proxy_protocol is on and proxy_protocol_trusted is empty"
TRUST_UNUSED = "proxy_protocol_trusted has no effect without accept_proxy_protocol"


def config_with(listen_port: int, upstream_port: int, extra: str, workers: int = 1) -> str:
    return f"workers: {workers}\n" + base_config(listen_port, upstream_port, extra=extra)


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splicerelay", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_prints_each_warning_to_stderr_and_still_passes(tmp_path: Path):
    path = tmp_path / "relay.yaml"
    path.write_text(
        "routes:\n"
        "  - name: front\n"
        "    listen: 127.0.0.1:18081\n"
        "    upstreams: [{address: 127.0.0.1:18082}]\n"
        "    accept_proxy_protocol: true\n"
        "  - name: plain\n"
        "    listen: 127.0.0.1:18083\n"
        "    upstreams: [{address: 127.0.0.1:18084}]\n"
        "    proxy_protocol_trusted: [10.0.0.0/8]\n"
    )
    result = check(path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("warning: route 'front': ") and UNTRUSTED in lines[0]
    assert lines[1] == f"warning: route 'plain': {TRUST_UNUSED}"
    assert "accept_proxy_protocol: true" in result.stdout  # the effective config, as ever


def test_check_of_a_config_without_risky_settings_prints_no_warning(tmp_path: Path):
    path = tmp_path / "relay.yaml"
    path.write_text(
        "routes:\n"
        "  - name: front\n"
        "    listen: 127.0.0.1:18081\n"
        "    upstreams: [{address: 127.0.0.1:18082}]\n"
        "    accept_proxy_protocol: true\n"
        "    proxy_protocol_trusted: [10.0.0.0/8]\n"
    )
    result = check(path)
    assert result.returncode == 0
    assert result.stderr == ""


def warnings_logged(relay: Relay, text: str) -> list[dict[str, object]]:
    found = []
    for line in relay.stderr().splitlines():
        record = json.loads(line)
        if text in str(record.get("message")):
            found.append(record)
    return found


async def wait_for_count(relay: Relay, text: str, count: int) -> list[dict[str, object]]:
    await trio.to_thread.run_sync(
        poll_until, lambda: len(warnings_logged(relay, text)) >= count, 10, f"{count} x {text}"
    )
    return warnings_logged(relay, text)


async def test_the_relay_logs_warnings_at_start_and_on_every_reload(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            config_with(listen_port, upstream_port, "    accept_proxy_protocol: true\n")
        )
        [at_start] = warnings_logged(relay, UNTRUSTED)
        assert at_start["level"] == "warning"
        relay.process.send_signal(signal.SIGHUP)
        await wait_for_count(relay, UNTRUSTED, 2)
        # A reload to a config with a different mistake says only the new one.
        relay.config_path.write_text(
            config_with(
                listen_port, upstream_port, "    proxy_protocol_trusted: [10.0.0.0/8]\n"
            ).replace("{metrics_port}", str(relay.metrics_port))
        )
        relay.process.send_signal(signal.SIGHUP)
        [unused] = await wait_for_count(relay, TRUST_UNUSED, 1)
        assert unused["level"] == "warning"
        assert len(warnings_logged(relay, UNTRUSTED)) == 2
        nursery.cancel_scope.cancel()


async def test_with_workers_each_load_is_warned_about_once(relay_factory):
    async with trio.open_nursery() as nursery:
        upstream_port = await start_server(nursery, echo)
        listen_port = free_port()
        relay = await relay_factory.astart(
            config_with(listen_port, upstream_port, "    accept_proxy_protocol: true\n", 2)
        )
        workers = await trio.to_thread.run_sync(
            lambda: (
                poll_until(lambda: len(child_pids(relay.pid)) == 2, 15, "two workers")
                or child_pids(relay.pid)
            )
        )

        def both_ready() -> bool:
            return relay.stderr().count('"message": "worker ready"') == 2

        await trio.to_thread.run_sync(poll_until, both_ready, 15, "both workers ready")
        assert len(warnings_logged(relay, UNTRUSTED)) == 1
        relay.process.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            return relay.metrics().get("splicerelay_config_reloads_total", result="success") == 1

        await trio.to_thread.run_sync(poll_until, reloaded, 15, "the reload")
        await wait_for_count(relay, UNTRUSTED, 2)
        assert len(warnings_logged(relay, UNTRUSTED)) == 2
        nursery.cancel_scope.cancel()
    relay_factory.check_and_stop_all()
    await trio.to_thread.run_sync(
        poll_until, lambda: not any(is_running(pid) for pid in workers), 15, "workers to exit"
    )
