"""The bench's targets: their configs and commands, and why one is skipped."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path
from typing import cast

import pytest

from splicerelay.bench import targets as bench_targets
from splicerelay.bench.procs import ProcessGroup
from splicerelay.bench.targets import (
    StartOptions,
    Tools,
    haproxy_config,
    missing_reason,
    pproxy_command,
    relay_command,
    relay_config,
    relay_environment,
    socat_command,
    start_proxy,
    target_skip_reason,
    usable_cores,
)
from splicerelay.config import Config, LogConfig, load_config
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


def load(tmp_path: Path, text: str) -> Config:
    """`text` read by the relay's own config loader."""
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return load_config(str(path))


def test_relay_config_is_accepted_by_the_relay(tmp_path: Path) -> None:
    config = load(tmp_path, relay_config(8080, 9090, 1))
    assert config.workers == 1
    (route,) = config.routes
    assert str(route.listen) == "127.0.0.1:8080"
    assert [str(upstream.address) for upstream in route.upstreams] == ["127.0.0.1:9090"]
    assert route.max_connections == bench_targets.RELAY_MAX_CONNECTIONS


def test_relay_runs_with_the_relays_own_log_defaults(tmp_path: Path) -> None:
    text = relay_config(8080, 9090, 1)
    assert "log" not in text.split("routes:")[0]
    config = load(tmp_path, text)
    assert config.log == LogConfig()
    assert config.log.access_log is True


def test_relay_without_access_log_changes_nothing_else(tmp_path: Path) -> None:
    on = load(tmp_path, relay_config(8080, 9090, 1))
    off = load(tmp_path, relay_config(8080, 9090, 1, access_log=False))
    assert off.log == LogConfig(access_log=False)
    assert dataclasses.replace(off, log=on.log) == on


class RecordingGroup(ProcessGroup):
    """Records what start_proxy would start, and starts nothing."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.started: list[tuple[list[str], dict[str, str] | None, object]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
        cpus: Collection[int] | None = None,
    ) -> subprocess.Popen[bytes]:
        self.started.append((argv, env, cpus))
        return cast("subprocess.Popen[bytes]", None)


def started_config(
    tmp_path: Path, target: str, options: StartOptions | None = None
) -> tuple[list[str], dict[str, str] | None, str]:
    """argv, environment and config file text of `target` as start_proxy starts it."""
    group = RecordingGroup(tmp_path)
    start_proxy(group, target, 9090, "label", ALL_TOOLS, options)
    ((argv, env, _),) = group.started
    return argv, env, Path(argv[argv.index("-f" if "-f" in argv else "-c") + 1]).read_text()


@pytest.mark.parametrize(
    ("target", "workers", "access_log", "force_copy"),
    [
        ("relay", 1, True, False),
        ("relay-nolog", 1, False, False),
        ("relay-auto", "auto", True, False),
        ("relay-copy", 1, True, True),
    ],
)
def test_each_relay_target_starts_with_its_config(
    tmp_path: Path, target: str, workers: int | str, access_log: bool, force_copy: bool
) -> None:
    argv, env, text = started_config(tmp_path, target)
    assert argv[1:5] == ["-m", "splicerelay", "run", "-c"]
    config = load(tmp_path, text)
    assert (config.workers, config.log.access_log) == (workers, access_log)
    assert config.log == LogConfig(access_log=access_log)
    assert env is not None and (relay_service.FORCE_COPY_ENV in env) is force_copy


def nbthread(text: str) -> int:
    (line,) = [line.split() for line in text.splitlines() if "nbthread" in line]
    return int(line[1])


@pytest.mark.parametrize(
    ("cpus", "threads"),
    [(frozenset({1}), 1), (frozenset({0, 1, 2}), 3), (frozenset(range(16)), 16)],
)
def test_haproxy_auto_runs_a_thread_per_proxy_core_when_pinned(
    tmp_path: Path, cpus: frozenset[int], threads: int
) -> None:
    argv, _, text = started_config(tmp_path, "haproxy-auto", StartOptions(cpus=cpus))
    assert argv[:3] == ["/usr/bin/haproxy", "-db", "-f"]
    assert nbthread(text) == threads
    _, _, baseline = started_config(tmp_path, "haproxy", StartOptions(cpus=cpus))
    assert nbthread(baseline) == 1
    # Apart from its threads (and its free port), haproxy-auto is the baseline.
    assert settings_of(text) == settings_of(baseline)


def settings_of(haproxy_text: str) -> list[str]:
    """The config's lines but its threads and its listening port."""
    skip = ("nbthread", "bind")
    return [line for line in haproxy_text.splitlines() if not line.strip().startswith(skip)]


def test_haproxy_auto_unpinned_counts_the_cores_this_process_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5, 7, 9})
    assert usable_cores(None) == 5
    _, _, text = started_config(tmp_path, "haproxy-auto")
    assert nbthread(text) == 5


def test_haproxy_auto_keeps_a_raised_maxconn(tmp_path: Path) -> None:
    options = StartOptions(haproxy_maxconn=10_100, cpus=frozenset({0, 1}))
    _, _, text = started_config(tmp_path, "haproxy-auto", options)
    assert "    maxconn 10100" in text.splitlines()


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


def test_the_relay_measured_is_this_very_package() -> None:
    """The first PYTHONPATH entry is the directory that holds this `splicerelay`
    package, so that the relay's process imports it ahead of any installed copy."""
    first = Path(relay_environment()["PYTHONPATH"].split(":")[0])
    package = Path(bench_targets.__file__).resolve().parent.parent
    assert (first / "splicerelay").resolve() == package
    assert (first / "splicerelay" / "__init__.py").is_file()


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


@pytest.mark.parametrize("target", ["direct", "relay", "relay-nolog", "relay-auto", "relay-copy"])
def test_direct_and_relays_need_no_other_program(target: str) -> None:
    assert target_skip_reason(target, {name: None for name in ALL_TOOLS}) is None


@pytest.mark.parametrize(
    ("target", "hint"),
    [
        ("haproxy", "haproxy is not installed (Debian: apt-get install haproxy)"),
        ("haproxy-auto", "haproxy is not installed (Debian: apt-get install haproxy)"),
        ("socat", "socat is not installed (Debian: apt-get install socat)"),
        ("pproxy", "pproxy is not installed (pip install pproxy, or pip install 'splicerelay"),
    ],
)
def test_a_target_whose_program_is_missing_is_skipped(target: str, hint: str) -> None:
    assert target_skip_reason(target, ALL_TOOLS) is None
    program = bench_targets.TARGET_PROGRAMS[target]
    reason = target_skip_reason(target, {**ALL_TOOLS, program: None})
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
