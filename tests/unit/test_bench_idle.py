"""The idle workload: its fd budget, the echo server, and one small real measurement."""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from splicerelay.bench import idle as bench_idle
from splicerelay.bench.idle import (
    client_skip_reason,
    connections_for,
    largest_fitting,
    per_connection,
    proxy_fds_needed,
    target_skip_reason,
)
from splicerelay.bench.parse import BenchError
from splicerelay.bench.procs import ProcessGroup, TreeUsage, free_port
from splicerelay.bench.progress import PlainProgress
from splicerelay.bench.report import describe_sample
from splicerelay.bench.targets import find_tools, relay_environment

# --- the fd budget ------------------------------------------------------------------------


def test_fd_budget_of_one_proxy_process() -> None:
    assert proxy_fds_needed(10_000) == 20_064
    assert largest_fitting(20_000) == 9_968
    assert proxy_fds_needed(largest_fitting(20_000)) <= 20_000
    assert proxy_fds_needed(largest_fitting(20_000) + 1) > 20_000
    assert largest_fitting(10) == 0


def test_forking_proxies_are_capped_and_not_held_to_one_process_limit() -> None:
    assert connections_for("socat", 10_000) == bench_idle.FORKING_CAP
    assert connections_for("socat", 10) == 10
    assert connections_for("relay", 10_000) == 10_000
    assert target_skip_reason("socat", 1000, 100) is None


def test_a_proxy_that_cannot_hold_the_connections_is_skipped_with_the_count_that_fits() -> None:
    assert target_skip_reason("relay", 9_968, 20_000) is None
    reason = target_skip_reason("haproxy", 10_000, 20_000)
    assert reason == (
        "needs about 20064 fds for 10000 relayed connections, but RLIMIT_NOFILE is 20000 "
        "(raise the hard limit, or use --idle-connections 9968)"
    )


def test_the_bench_itself_must_hold_its_client_sockets() -> None:
    assert client_skip_reason(10_000, 20_000) is None
    reason = client_skip_reason(10_000, 4096)
    assert reason is not None
    assert reason.startswith("the bench needs 10128 fds for 10000 client sockets")
    assert reason.endswith("--idle-connections 3968)")


def test_growth_per_connection() -> None:
    before = TreeUsage(processes=1, rss_kib=10_000, pss_kib=9_000, fds=10)
    after = TreeUsage(processes=1, rss_kib=12_000, pss_kib=10_000, fds=2_010)
    assert per_connection(before, after, 1000) == {
        "rss_kib_per_connection": 2.0,
        "pss_kib_per_connection": 1.0,
        "fds_per_connection": 2.0,
    }


def test_raised_nofile_limit_is_restored() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with bench_idle.raised_nofile_limit() as limit:
        assert limit >= soft
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (limit, hard)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


def test_every_target_is_skipped_when_the_limit_is_too_low(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @contextmanager
    def low_limit() -> Iterator[int]:
        yield 300

    monkeypatch.setattr(bench_idle, "raised_nofile_limit", low_limit)
    progress = PlainProgress()
    progress.start(2)
    result = bench_idle.run_idle(
        ["direct", "relay", "socat"], 500, 1, {}, tmp_path, progress, describe_sample
    )
    assert result.samples == []
    assert set(result.skipped) == {"relay", "socat"}
    assert result.skipped["socat"].startswith("the bench needs 628 fds for 500 client sockets")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (", 1)[0] for line in lines] == [
        "[1/2] idle round 1/1 relay: skipped",
        "[2/2] idle round 1/1 socat: skipped",
    ]
    assert lines[1].endswith(f"skipped ({result.skipped['socat']})")
    assert list(tmp_path.iterdir()) == []  # nothing was started


# --- real sockets -------------------------------------------------------------------------


def start_echo(group: ProcessGroup) -> int:
    port = free_port()
    group.start("echo", bench_idle.echo_server_command(port), port, env=relay_environment())
    return port


def test_echo_server_echoes_on_many_connections(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        port = start_echo(group)
        deadline = time.monotonic() + 30
        connections = bench_idle.open_connections(port, 20, deadline)
        try:
            assert len(connections) == 20
            for number, connection in enumerate(connections):
                message = f"message {number}\n".encode()
                connection.sendall(message)
                assert bench_idle.receive_exactly(connection, len(message)) == message
        finally:
            bench_idle.close_all(connections)


def test_opening_connections_to_nothing_is_an_error() -> None:
    with pytest.raises(BenchError, match=r"^connection 1 of 3: "):
        bench_idle.open_connections(free_port(), 3, time.monotonic() + 10)


def test_a_server_that_does_not_echo_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_idle, "CONNECT_TIMEOUT", 0.2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # Connected through the backlog, but nobody ever answers: the read times out.
        with pytest.raises(BenchError, match=r"^connection 1 of 2: timed out$"):
            bench_idle.open_connections(port, 2, time.monotonic() + 10)


def test_idle_connections_through_the_relay_cost_two_fds_each(tmp_path: Path) -> None:
    progress = PlainProgress()
    progress.start(1)
    result = bench_idle.run_idle(
        ["direct", "relay"], 200, 1, find_tools(), tmp_path, progress, describe_sample
    )
    assert result.skipped == {}
    (sample,) = result.samples
    assert sample.error is None, sample.error
    assert (sample.target, sample.amount) == ("relay", 200)
    # Each idle relayed connection holds its two sockets, and no pipe (pipes are pooled).
    assert 1.9 <= sample.values["fds_per_connection"] <= 2.5
    assert sample.values["rss_kib_per_connection"] > 0


def test_echo_server_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from splicerelay.bench import echo as bench_echo

    assert bench_echo.main([]) == 2
    assert bench_echo.main(["not-a-port"]) == 2
    assert "usage: python -m splicerelay.bench.echo PORT" in capsys.readouterr().err
