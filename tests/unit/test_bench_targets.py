"""The bench's targets: their configs and commands, and why one is skipped."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from splicerelay.bench import targets as bench_targets
from splicerelay.bench.targets import (
    Tools,
    haproxy_config,
    missing_reason,
    pproxy_command,
    relay_command,
    relay_config,
    relay_environment,
    socat_command,
    target_skip_reason,
)
from splicerelay.config import load_config
from splicerelay.relay import service as relay_service

ALL_TOOLS: Tools = {
    name: [f"/usr/bin/{name}"]
    for name in ("iperf3", "haproxy", "socat", "redis-server", "redis-benchmark", "pproxy")
}


def test_haproxy_config_is_the_splice_baseline() -> None:
    lines = [line.strip() for line in haproxy_config(8080, 9090).splitlines()]
    for required in (
        "mode tcp",
        "option splice-request",
        "option splice-response",
        "tune.pipesize 1048576",
        "nbthread 1",
        "maxconn 2000",
        "timeout connect 5s",
        "timeout client 10m",
        "timeout server 10m",
        "bind 127.0.0.1:8080",
        "server upstream 127.0.0.1:9090",
    ):
        assert required in lines


def test_haproxy_maxconn_can_be_raised_for_idle_connections() -> None:
    lines = [line.strip() for line in haproxy_config(1, 2, maxconn=10_100).splitlines()]
    assert "maxconn 10100" in lines and "maxconn 2000" not in lines


def test_relay_config_is_accepted_by_the_relay(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(relay_config(8080, 9090, 1))
    config = load_config(str(path))
    assert config.workers == 1
    assert config.log.access_log is False
    (route,) = config.routes
    assert str(route.listen) == "127.0.0.1:8080"
    assert [str(upstream.address) for upstream in route.upstreams] == ["127.0.0.1:9090"]
    assert route.max_connections == bench_targets.RELAY_MAX_CONNECTIONS


def test_relay_auto_asks_for_one_worker_per_core() -> None:
    assert bench_targets.relay_workers("relay-auto") == "auto"
    assert bench_targets.relay_workers("relay") == 1
    assert bench_targets.relay_workers("relay-copy") == 1
    assert relay_config(1, 2, "auto").splitlines()[0] == "workers: auto"


def test_relay_command_runs_this_package_without_metrics() -> None:
    assert relay_command(Path("/tmp/x.yaml")) == [
        sys.executable,
        *("-m", "splicerelay", "run", "-c", "/tmp/x.yaml"),
        *("--metrics-listen", "none"),
    ]


def test_relay_copy_environment_forces_the_copy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench_targets.FORCE_COPY_ENV == relay_service.FORCE_COPY_ENV
    monkeypatch.setenv(relay_service.FORCE_COPY_ENV, "1")
    assert relay_service.FORCE_COPY_ENV not in relay_environment()
    assert relay_environment(force_copy=True)[relay_service.FORCE_COPY_ENV] == "1"
    package_parent = str(Path(bench_targets.__file__).resolve().parent.parent)
    assert relay_environment()["PYTHONPATH"].split(":")[0] == package_parent


def test_socat_forks_per_connection_on_loopback() -> None:
    assert socat_command(["socat"], 8080, 9090) == [
        "socat",
        "TCP-LISTEN:8080,fork,reuseaddr,bind=127.0.0.1",
        "TCP:127.0.0.1:9090",
    ]


def test_pproxy_tunnel_mode() -> None:
    assert pproxy_command(["python3", "-m", "pproxy"], 8080, 9090) == [
        *("python3", "-m", "pproxy"),
        *("-l", "tunnel://127.0.0.1:8080", "-r", "tunnel://127.0.0.1:9090"),
    ]


@pytest.mark.parametrize("target", ["direct", "relay", "relay-auto", "relay-copy"])
def test_direct_and_relays_need_no_other_program(target: str) -> None:
    assert target_skip_reason(target, {name: None for name in ALL_TOOLS}) is None


@pytest.mark.parametrize(
    ("target", "hint"),
    [
        ("haproxy", "haproxy is not installed (Debian: apt-get install haproxy)"),
        ("socat", "socat is not installed (Debian: apt-get install socat)"),
        ("pproxy", "pproxy is not installed (pip install pproxy, or pip install 'splicerelay"),
    ],
)
def test_a_target_whose_program_is_missing_is_skipped(target: str, hint: str) -> None:
    assert target_skip_reason(target, ALL_TOOLS) is None
    reason = target_skip_reason(target, {**ALL_TOOLS, target: None})
    assert reason is not None and reason.startswith(hint)


def test_missing_reason_names_every_missing_program_once() -> None:
    tools = {**ALL_TOOLS, "redis-server": None, "redis-benchmark": None}
    assert missing_reason(["redis-server", "redis-benchmark"], tools) == (
        "redis-server, redis-benchmark are not installed (Debian: apt-get install "
        "redis-server; Debian: apt-get install redis-tools)"
    )
    assert missing_reason(["iperf3"], tools) is None
    assert missing_reason([], tools) is None


def test_find_tools_without_any_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert bench_targets.find_tools() == {name: None for name in ALL_TOOLS}


def test_find_tools_prefers_the_importable_pproxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/bin/{name}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    tools = bench_targets.find_tools()
    assert tools["pproxy"] == [sys.executable, "-m", "pproxy"]
    assert tools["socat"] == ["/bin/socat"]
