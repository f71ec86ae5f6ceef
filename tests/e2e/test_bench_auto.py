"""The bench's `relay-auto` and `haproxy-auto` for real: one worker, or one thread, per core
the proxies may use, pinned (--pin) or not."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from splicerelay.bench.procs import ProcessGroup, free_port, process_tree
from splicerelay.bench.targets import StartOptions, find_tools, start_proxy
from tests.support.harness import poll_until


def two_cores() -> list[int]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip(f"needs 2 usable cores, this process may use {len(cores)}")
    return cores


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def cpu_list(cpus: set[int]) -> str:
    """The kernel's Cpus_allowed_list spelling of `cpus`, for the sets used here."""
    low, high = min(cpus), max(cpus)
    if len(cpus) == 1:
        return str(low)
    assert cpus == set(range(low, high + 1))
    return f"{low}-{high}"


def cores_for(count: int) -> set[int]:
    """`count` usable cores: one (as --pin gives the proxies on a 2-core machine), or two."""
    return set(two_cores()[-count:])


@pytest.mark.parametrize("count", [1, 2])
def test_relay_auto_runs_one_worker_per_core_it_is_started_on(tmp_path: Path, count: int) -> None:
    cpus = cores_for(count)
    with ProcessGroup(tmp_path) as group:
        options = StartOptions(cpus=frozenset(cpus))
        endpoint = start_proxy(group, "relay-auto", free_port(), "t", find_tools(), options)
        assert endpoint.proxy is not None
        pid = endpoint.proxy.pid
        # One core: a plain relay process. More: a supervisor and a worker per core.
        expected = 1 if count == 1 else 1 + count
        poll_until(lambda: len(process_tree(pid)) == expected, 15, f"{expected} relay processes")
        for member in process_tree(pid):
            assert status_field(member, "Cpus_allowed_list") == cpu_list(cpus)


@pytest.mark.peer
@pytest.mark.parametrize("count", [1, 2])
def test_haproxy_auto_runs_one_thread_per_core_it_is_started_on(tmp_path: Path, count: int) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (Debian package haproxy)")
    cpus = cores_for(count)
    with ProcessGroup(tmp_path) as group:
        options = StartOptions(cpus=frozenset(cpus))
        endpoint = start_proxy(group, "haproxy-auto", free_port(), "t", find_tools(), options)
        assert endpoint.proxy is not None
        pid = endpoint.proxy.pid
        poll_until(
            lambda: int(status_field(pid, "Threads")) == count, 15, f"haproxy with {count} threads"
        )
        assert status_field(pid, "Cpus_allowed_list") == cpu_list(cpus)
