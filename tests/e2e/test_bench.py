"""`splicerelay bench`: its options, its process handling, and real short runs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from splicerelay import bench
from splicerelay.bench import targets as bench_targets
from splicerelay.bench.load import (
    iperf3_client_command,
    redis_benchmark_command,
    start_targets,
    take_sample,
)
from splicerelay.bench.model import Measurement
from splicerelay.bench.parse import BenchError
from splicerelay.bench.procs import (
    ProcessGroup,
    cpu_seconds,
    free_port,
    listening_ports,
    process_tree,
    tree_usage,
)
from splicerelay.bench.targets import Endpoint, Tools


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    bench.resolve_defaults(args)
    return args


NO_TOOLS: Tools = {
    name: None
    for name in ("iperf3", "haproxy", "socat", "redis-server", "redis-benchmark", "pproxy")
}


# --- options ------------------------------------------------------------------------------


def test_defaults_run_every_workload_on_every_target() -> None:
    args = parse()
    assert args.workloads == ["bulk", "bulk8", "rr", "conn", "latency", "idle"]
    assert args.targets == [
        "direct",
        "relay",
        "relay-nolog",
        "relay-auto",
        "relay-copy",
        "haproxy",
        "haproxy-auto",
        "socat",
        "pproxy",
    ]
    assert args.directions == ["forward"]
    assert (args.rounds, args.duration, args.requests, args.clients) == (3, 4, 100_000, 50)
    assert (args.new_connection_requests, args.latency_requests) == (10_000, 20_000)
    assert args.idle_connections == 10_000
    assert (args.json, args.markdown, args.png) == (None, None, None)


def test_quick_is_small_and_takes_direct_and_relay_only() -> None:
    args = parse("--quick")
    assert args.targets == ["direct", "relay"]
    assert args.workloads == ["bulk", "bulk8", "rr", "conn", "latency"]
    assert args.rounds == 1
    assert args.duration == 1
    assert args.requests < 100_000 and args.new_connection_requests < 10_000
    assert args.latency_requests < 20_000 and args.idle_connections < 10_000


def test_explicit_options_win_over_quick() -> None:
    args = parse("--quick", "--rounds", "2", "--workload", "idle", "--target", "haproxy")
    assert (args.rounds, args.workloads, args.targets) == (2, ["idle"], ["haproxy"])
    assert args.idle_connections == parse("--quick").idle_connections


def test_repeated_options_keep_canonical_order() -> None:
    args = parse("--direction", "bidir", "--direction", "forward", "--direction", "bidir")
    assert args.directions == ["forward", "bidir"]
    assert parse("--workload", "idle", "--workload", "bulk").workloads == ["bulk", "idle"]
    assert parse("--target", "pproxy", "--target", "direct").targets == ["direct", "pproxy"]


def test_old_option_names_still_work() -> None:
    assert parse("--case", "small").workloads == ["rr", "conn"]
    assert parse("--workload", "small", "--workload", "latency").workloads == [
        "rr",
        "conn",
        "latency",
    ]
    assert parse("--repeat", "5").rounds == 5


@pytest.mark.parametrize("option", ["--rounds", "--repeat", "--idle-connections"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_counts_must_be_positive(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse(option, value)
    assert option in capsys.readouterr().err


def test_unknown_workload_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--workload", "huge")
    assert "unknown workload 'huge'" in capsys.readouterr().err


def test_settings_record_what_was_run() -> None:
    settings = bench.settings(parse("--quick", "--direction", "reverse"))
    assert settings["quick"] is True
    assert settings["directions"] == ["reverse"]
    assert settings["rounds"] == 1
    assert json.dumps(settings)


# --- what runs ----------------------------------------------------------------------------


def test_workloads_without_their_load_generator_are_skipped() -> None:
    tools = {**NO_TOOLS, "iperf3": ["/usr/bin/iperf3"]}
    skipped = bench.skipped_workloads(list(bench.WORKLOADS), tools)
    assert set(skipped) == {"rr", "conn", "latency"}  # idle needs no peer program
    assert skipped["rr"].startswith("redis-server, redis-benchmark are not installed")


def test_targets_without_their_program_are_skipped() -> None:
    skipped = bench.skipped_targets(list(bench_targets.TARGETS), NO_TOOLS)
    assert list(skipped) == ["haproxy", "haproxy-auto", "socat", "pproxy"]


def test_total_steps_counts_every_measurement() -> None:
    targets = ["direct", "relay", "haproxy"]
    assert bench.total_steps(jobs=4, idle=False, targets=targets, rounds=3) == 36
    assert bench.total_steps(jobs=4, idle=True, targets=targets, rounds=3) == 42


def test_jobs_follow_the_workloads_and_directions() -> None:
    args = parse("--direction", "forward", "--direction", "reverse")
    names = [scenario.name for scenario, _ in bench.iperf3_jobs(args, args.workloads, [])]
    assert names == ["bulk", "bulk-reverse", "bulk8", "bulk8-reverse"]
    names = [scenario.name for scenario, _ in bench.redis_jobs(args, ["conn", "latency"], [])]
    assert names == ["conn", "latency"]


def test_programs_in_use() -> None:
    assert bench.programs_in_use(["bulk", "bulk8", "rr"], ["direct", "relay", "socat"]) == [
        "iperf3",
        "redis-server",
        "redis-benchmark",
        "socat",
    ]


def test_missing_load_generators_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "find_tools", lambda: dict(NO_TOOLS))
    assert bench.run(parse("--workload", "bulk", "--workload", "rr")) == 2
    assert capsys.readouterr().err.splitlines() == [
        "splicerelay bench: bulk: iperf3 is not installed (Debian: apt-get install iperf3)",
        "splicerelay bench: rr: redis-server, redis-benchmark are not installed "
        "(Debian: apt-get install redis-server; Debian: apt-get install redis-tools)",
    ]


def test_iperf3_client_command() -> None:
    assert iperf3_client_command(["iperf3"], 5201, 4, "reverse", 8) == [
        *("iperf3", "-c", "127.0.0.1", "-p", "5201", "-t", "4", "-J"),
        *("-P", "8", "-R"),
    ]
    assert iperf3_client_command(["iperf3"], 5201, 2, "bidir", 1)[-1] == "--bidir"


def test_redis_benchmark_command() -> None:
    assert redis_benchmark_command(["rb"], 6379, 1000, 50, new_connections=True) == [
        "rb",
        *("-h", "127.0.0.1", "-p", "6379", "-t", "get", "-n", "1000", "-c", "50", "--csv"),
        *("-k", "0"),
    ]
    assert "-k" not in redis_benchmark_command(["rb"], 6379, 1000, 1, new_connections=False)


# --- processes and /proc ------------------------------------------------------------------

LISTENER = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen()\n"
    "time.sleep(600)\n"
)


def test_cpu_seconds_of_a_reaped_process_is_an_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(BenchError, match=f"process {child.pid} is gone"):
        cpu_seconds(child.pid)
    with pytest.raises(BenchError, match=f"process {child.pid} is gone"):
        tree_usage(child.pid)


def test_process_tree_and_its_usage_include_children() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in process_tree(os.getpid())
        alone = tree_usage(child.pid)
        with_child = tree_usage(os.getpid())
        assert alone.processes == 1 and alone.fds >= 3 and alone.rss_kib > 0
        assert with_child.processes >= 2
        assert with_child.rss_kib > alone.rss_kib and with_child.fds > alone.fds
        assert with_child.pss_kib > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)


def test_listening_ports_reads_only_listen_state(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt\n"
    table = tmp_path / "tcp"
    table.write_text(
        header
        + "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n"
        + "   1: 0100007F:1F91 0100007F:C350 01 00000000:00000000 00:00000000 00000000\n"
    )
    table6 = tmp_path / "tcp6"
    table6.write_text(
        header
        + "   0: 00000000000000000000000000000000:0050 "
        + "00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000\n"
    )
    missing = tmp_path / "absent"
    assert listening_ports([str(table), str(table6), str(missing)]) == {8080, 80}


def test_process_group_waits_for_listen_and_stops_by_pid(tmp_path: Path) -> None:
    port = free_port()
    with ProcessGroup(tmp_path) as group:
        process = group.start("listener", [sys.executable, "-c", LISTENER, str(port)], port)
        assert port in listening_ports()
        assert process.poll() is None
    assert process.returncode == -signal.SIGTERM


def test_process_that_exits_before_listening_is_an_error(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('no such backend'); sys.exit(3)"]
    with (
        ProcessGroup(tmp_path) as group,
        pytest.raises(BenchError, match=r"^early exited with code 3: no such backend$"),
    ):
        group.start("early", argv, free_port())


def test_a_target_that_fails_to_start_is_skipped_with_the_reason(tmp_path: Path) -> None:
    refusing = [sys.executable, "-c", "import sys; print('Cannot raise FD limit'); sys.exit(1)"]
    tools: Tools = {**NO_TOOLS, "haproxy": refusing}
    with ProcessGroup(tmp_path) as group:
        started = start_targets(
            group,
            "t",
            ["direct", "haproxy", "socat"],
            lambda port: [sys.executable, "-c", LISTENER, str(port)],
            tools,
        )
        assert [endpoint.target for endpoint in started.endpoints] == ["direct"]
    assert started.skipped["haproxy"] == (
        "did not start: t-haproxy exited with code 1: Cannot raise FD limit"
    )
    assert started.skipped["socat"].startswith("did not start: socat is not installed")


def test_sample_of_a_load_and_of_a_failure(tmp_path: Path) -> None:
    port = free_port()
    with ProcessGroup(tmp_path) as group:
        proxy = group.start("proxy", [sys.executable, "-c", LISTENER, str(port)], port)
        endpoint = Endpoint("relay", port, proxy)
        good = take_sample(endpoint, 2, lambda: Measurement({"bits_per_second": 5e9}, 1_000_000))
        assert (good.target, good.round, good.amount) == ("relay", 2, 1_000_000)
        assert good.values == {"bits_per_second": 5e9}
        assert good.proxy_cpu_seconds is not None and good.proxy_cpu_seconds >= 0
        assert good.error is None

        def failing() -> Measurement:
            raise BenchError("iperf3: connection reset")

        bad = take_sample(endpoint, 0, failing)
        assert bad.error == "iperf3: connection reset"
    gone = take_sample(endpoint, 0, lambda: Measurement({}, 1))
    assert gone.error == f"relay exited with code {-signal.SIGTERM}"


# --- real runs ----------------------------------------------------------------------------


def require_programs(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None:
            package = bench_targets.DEBIAN_PACKAGES[program]
            pytest.skip(f"{program} is not installed (Debian package {package})")


def run_bench(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "splicerelay", "bench", *options, "--json", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr
    return result, json.loads(output.read_text())


def number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.peer
def test_quick_bench_measures_direct_and_relay_in_every_workload(tmp_path: Path) -> None:
    require_programs("iperf3", "redis-server", "redis-benchmark")
    markdown = tmp_path / "bench.md"
    result, document = run_bench(tmp_path, "--quick", "--markdown", str(markdown))
    assert document["settings"]["quick"] is True
    assert document["skipped_workloads"] == {}
    workloads = document["workloads"]
    assert set(workloads) == {"bulk", "bulk8", "rr", "conn", "latency"}
    for name, workload in workloads.items():
        assert {sample["target"] for sample in workload["samples"]} == {"direct", "relay"}, name
        assert all(sample["error"] is None for sample in workload["samples"]), name
        for target in ("direct", "relay"):
            medians = workload["medians"][target]
            for metric in workload["metrics"]:
                assert number(medians[metric["key"]]) and medians[metric["key"]] > 0, (
                    name,
                    target,
                    metric["key"],
                )
        relay_cpu = workload["medians"]["relay"][workload["cpu"]["key"]]
        assert number(relay_cpu) and relay_cpu >= 0, name
        assert workload["medians"]["direct"][workload["cpu"]["key"]] is None, name
    assert markdown.read_text() == result.stdout
    assert "## latency" in result.stdout


@pytest.mark.peer
def test_bench_against_haproxy_gives_ratios(tmp_path: Path) -> None:
    require_programs("iperf3", "haproxy")
    png = tmp_path / "bench.png"
    _, document = run_bench(
        tmp_path,
        *("--quick", "--workload", "bulk", "--png", str(png)),
        *("--target", "direct", "--target", "relay", "--target", "haproxy"),
    )
    bulk = document["workloads"]["bulk"]
    assert bulk["skipped"] == {}
    for proxy in ("relay", "haproxy"):
        assert bulk["medians"][proxy]["cpu_seconds_per_gb"] > 0, proxy
    ratios = bulk["ratios_to_haproxy"]
    assert ratios["haproxy"]["bits_per_second"] == 1.0
    assert ratios["relay"]["bits_per_second"] == pytest.approx(
        bulk["medians"]["relay"]["bits_per_second"] / bulk["medians"]["haproxy"]["bits_per_second"]
    )
    if bench_chart_available():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bench_chart_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    """The kernel may offer a released port again at once; two ports one test or one
    bench run takes (a server and the proxy in front of it) must differ. 500 draws
    from the ~28,000 ephemeral ports would repeat one almost surely without this."""
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
