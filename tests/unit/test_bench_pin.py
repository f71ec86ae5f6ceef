"""`splicerelay bench --pin`: which cores the proxies and the load get, and that the
processes the bench starts run there from their first instruction."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splicerelay import bench
from splicerelay.bench.options import add_arguments, resolve_defaults, settings
from splicerelay.bench.parse import BenchError
from splicerelay.bench.procs import Pinning, ProcessGroup, free_port, on_cpus, plan_pinning
from splicerelay.bench.report import BenchReport, render_markdown
from splicerelay.bench.targets import usable_cores

AFFINITY = "import os; print(','.join(map(str, sorted(os.sched_getaffinity(0)))))"
# Listens on the port it is given, then waits to be stopped.
LISTENER = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen()\n"
    "time.sleep(60)\n"
)


def two_cores() -> list[int]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip(f"needs 2 usable cores, this process may use {len(cores)}")
    return cores


def allowed_cpus(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


@pytest.mark.parametrize(
    ("available", "proxies", "load"),
    [
        ({0, 1}, {1}, {0}),
        ({3, 1, 2, 0}, {3}, {0, 1, 2}),
        ({2, 5}, {5}, {2}),
    ],
)
def test_the_proxies_get_the_last_core_and_the_load_the_others(
    available: set[int], proxies: set[int], load: set[int]
) -> None:
    assert plan_pinning(available) == Pinning(frozenset(proxies), frozenset(load))


@pytest.mark.parametrize("available", [set(), {0}])
def test_pinning_needs_two_cores(available: set[int]) -> None:
    with pytest.raises(BenchError, match="at least 2 usable cores"):
        plan_pinning(available)


def test_a_process_started_on_cpus_runs_there_and_the_bench_moves_back() -> None:
    cores = two_cores()
    before = os.sched_getaffinity(0)
    with on_cpus({cores[0]}):
        result = subprocess.run(
            [sys.executable, "-c", AFFINITY], capture_output=True, text=True, check=True
        )
    assert result.stdout.strip() == str(cores[0])
    assert os.sched_getaffinity(0) == before
    with on_cpus(None):
        assert os.sched_getaffinity(0) == before


def test_a_proxy_started_by_the_process_group_is_pinned(tmp_path: Path) -> None:
    cores = two_cores()
    port = free_port()
    with ProcessGroup(tmp_path) as group:
        process = group.start(
            "proxy", [sys.executable, "-c", LISTENER, str(port)], port, cpus={cores[-1]}
        )
        assert allowed_cpus(process.pid) == str(cores[-1])


# What the relay makes of `workers: auto`, in the process it is run as.
WORKER_COUNT = "from splicerelay.config import worker_count; print(worker_count('auto'))"


def test_workers_auto_and_haproxy_auto_count_the_proxies_cores() -> None:
    """A relay started on the proxies' cores resolves `workers: auto` to their number,
    which is the nbthread haproxy-auto is given: pinning before exec is all it takes."""
    cores = two_cores()
    for cpus in ({cores[-1]}, set(cores[:2])):
        with on_cpus(cpus):
            result = subprocess.run(
                [sys.executable, "-c", WORKER_COUNT],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
        assert int(result.stdout) == len(cpus) == usable_cores(frozenset(cpus))
    # Under --pin, the proxies' core set is the one the bench passes on.
    pinning = plan_pinning(cores)
    assert usable_cores(pinning.proxies) == len(pinning.proxies)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    resolve_defaults(args)
    return args


def test_pin_is_off_unless_asked() -> None:
    assert parse().pin is False
    assert parse("--pin").pin is True
    assert settings(parse("--pin"))["pin"] is None  # the cores are recorded once placed


def test_the_report_says_where_things_ran() -> None:
    environment = {"cpus": 2, "kernel": "6.1", "python": "3.11.7", "tools": {}}
    pinned = {"rounds": 1, "pin": {"proxies": [1], "load": [0]}}
    markdown = render_markdown(BenchReport([], ["direct", "relay"], environment, pinned))
    assert "Pinned (--pin): every proxy on CPU 1; the load generators" in markdown
    unpinned = {"rounds": 1, "pin": None}
    markdown = render_markdown(BenchReport([], ["direct", "relay"], environment, unpinned))
    assert "Pinned" not in markdown


def test_pin_on_one_core_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tools = {name: None for name in ("haproxy", "socat", "redis-server", "redis-benchmark")}
    monkeypatch.setattr(bench, "find_tools", lambda: {**tools, "iperf3": ["iperf3"]})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert bench.run(parse("--pin", "--workload", "bulk", "--target", "direct")) == 2
    assert capsys.readouterr().err == (
        "splicerelay bench: --pin needs at least 2 usable cores, and this process may use 1\n"
    )
