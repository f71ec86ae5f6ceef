"""`splicerelay bench`: its pure parts exactly, its process handling, and one real run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from splicerelay import bench
from splicerelay.bench import (
    Availability,
    BenchError,
    Endpoint,
    ProcCpu,
    ProcessGroup,
    Sample,
    ScenarioResult,
    bulk_scenario,
    small_scenario,
)

FORWARD = bulk_scenario("forward")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    bench.resolve_defaults(args)
    return args


# --- iperf3 and redis-benchmark output --------------------------------------------------


def test_iperf3_json_gives_received_rate_and_bytes() -> None:
    report = {
        "start": {},
        "end": {
            "sum_sent": {"bytes": 2000, "bits_per_second": 16000.0},
            "sum_received": {"bytes": 1500, "bits_per_second": 12000.5},
        },
    }
    assert bench.parse_iperf3_json(json.dumps(report)) == (12000.5, 1500)


def test_iperf3_json_bidir_adds_both_directions() -> None:
    report = {
        "end": {
            "sum_sent": {"bytes": 1, "bits_per_second": 1.0},
            "sum_received": {"bytes": 1000, "bits_per_second": 8000.0},
            "sum_sent_bidir_reverse": {"bytes": 1, "bits_per_second": 1.0},
            "sum_received_bidir_reverse": {"bytes": 250, "bits_per_second": 2000.0},
        }
    }
    assert bench.parse_iperf3_json(json.dumps(report)) == (10000.0, 1250)


def test_iperf3_json_error_is_reported() -> None:
    text = json.dumps({"start": {}, "end": {}, "error": "unable to connect to server"})
    with pytest.raises(BenchError, match=r"^iperf3: unable to connect to server$"):
        bench.parse_iperf3_json(text)


@pytest.mark.parametrize("text", ["", "iperf3: error", "[]", '{"end": {}}'])
def test_iperf3_output_without_a_result_is_an_error(text: str) -> None:
    with pytest.raises(BenchError):
        bench.parse_iperf3_json(text)


def test_redis_benchmark_rate_is_the_last_summary_line() -> None:
    output = (
        "GET: rps=0.0 (overall: 0.0) avg_msec=-nan (overall: -nan)\r"
        "GET: rps=92372.0 (overall: 92004.0) avg_msec=0.294 (overall: 0.294)\r"
        "                                    \r"
        "GET: 80000.00 requests per second, p50=0.303 msec\n\n"
    )
    assert bench.parse_redis_benchmark(output) == 80000.0


def test_redis_benchmark_without_a_rate_is_an_error() -> None:
    with pytest.raises(BenchError, match="Could not connect"):
        bench.parse_redis_benchmark("Could not connect to Redis at 127.0.0.1:1\n")


# --- /proc ------------------------------------------------------------------------------

# A real-looking stat line whose command name holds spaces and both parentheses.
STAT = (
    "4242 (odd) name (x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 "
    "250 75 3 4 20 0 3 0 12345 100000000 2000 18446744073709551615"
)


def test_proc_stat_cpu_fields_are_counted_from_the_last_parenthesis() -> None:
    assert bench.parse_proc_stat(STAT) == ProcCpu(utime=250, stime=75, cutime=3, cstime=4)
    assert bench.parse_proc_stat(STAT).total == 332


@pytest.mark.parametrize("text", ["", "4242 (short) S 1 2 3", "no parenthesis " * 10])
def test_malformed_proc_stat_is_an_error(text: str) -> None:
    with pytest.raises(BenchError):
        bench.parse_proc_stat(text)


def test_cpu_seconds_of_a_reaped_process_is_an_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(BenchError, match=f"process {child.pid} is gone"):
        bench.cpu_seconds(child.pid)


def test_process_tree_includes_children() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in bench.process_tree(os.getpid())
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
    assert bench.listening_ports([str(table), str(table6), str(missing)]) == {8080, 80}


# --- statistics -------------------------------------------------------------------------


def test_median_ignores_missing_values() -> None:
    assert bench.median([3.0, None, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0]) == 2.5
    assert bench.median([None]) is None
    assert bench.median([]) is None


def test_ratio() -> None:
    assert bench.ratio(1.0, 4.0) == 0.25
    assert bench.ratio(None, 4.0) is None
    assert bench.ratio(1.0, None) is None
    assert bench.ratio(1.0, 0.0) is None


def sample(target: str, rate: float, amount: int = 0, cpu: float | None = None) -> Sample:
    return Sample(target, 0, rate=rate, amount=amount, wall_seconds=2.0, proxy_cpu_seconds=cpu)


def bulk_result() -> ScenarioResult:
    return ScenarioResult(
        FORWARD,
        [
            sample("direct", 32e9, 16_000_000_000),
            sample("relay", 8e9, 2_000_000_000, cpu=0.5),
            sample("haproxy", 16e9, 4_000_000_000, cpu=0.5),
            sample("direct", 30e9, 15_000_000_000),
            Sample("relay", 1, error="iperf3: the server has terminated"),
            sample("haproxy", 12e9, 4_000_000_000, cpu=0.25),
            sample("direct", 34e9, 17_000_000_000),
            sample("relay", 9e9, 2_000_000_000, cpu=0.5),
            sample("haproxy", 20e9, 2_000_000_000, cpu=0.25),
        ],
    )


def test_sample_cpu_per_gb_and_share() -> None:
    one = sample("relay", 8e9, 2_000_000_000, cpu=0.5)
    assert one.cpu_per_unit(FORWARD) == 0.25
    assert one.cpu_share() == 0.25
    assert sample("direct", 8e9, 2_000_000_000).cpu_per_unit(FORWARD) is None
    per_million = sample("relay", 1000.0, 500_000, cpu=2.0).cpu_per_unit(small_scenario(False))
    assert per_million == 4.0


def test_medians_use_successful_samples_only() -> None:
    medians = bench.summarize(bulk_result(), bench.TARGETS)
    assert medians == {
        "direct": {
            "bits_per_second": 32e9,
            "cpu_seconds_per_gb": None,
            "proxy_cpu_share": None,
            "samples": 3,
            "failed": 0,
        },
        "relay": {
            "bits_per_second": 8.5e9,
            "cpu_seconds_per_gb": 0.25,
            "proxy_cpu_share": 0.25,
            "samples": 2,
            "failed": 1,
        },
        "haproxy": {
            "bits_per_second": 16e9,
            "cpu_seconds_per_gb": 0.125,
            "proxy_cpu_share": 0.125,
            "samples": 3,
            "failed": 0,
        },
    }


def test_ratios_relay_to_haproxy_and_direct() -> None:
    medians = bench.summarize(bulk_result(), bench.TARGETS)
    assert bench.compare(FORWARD, medians) == {
        "relay/haproxy": {"bits_per_second": 0.53125, "cpu_seconds_per_gb": 2.0},
        "relay/direct": {"bits_per_second": 0.265625},
    }


def test_ratios_without_haproxy_are_none() -> None:
    medians = bench.summarize(bulk_result(), ["direct", "relay"])
    assert bench.compare(FORWARD, medians)["relay/haproxy"] == {
        "bits_per_second": None,
        "cpu_seconds_per_gb": None,
    }


# --- commands and configs ---------------------------------------------------------------


def test_haproxy_config_is_the_splice_baseline() -> None:
    config = bench.haproxy_config(8080, 9090)
    lines = [line.strip() for line in config.splitlines()]
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


def test_relay_command() -> None:
    assert bench.relay_command(8080, 9090) == [
        sys.executable,
        "-m",
        "splicerelay",
        "run",
        "--listen",
        "127.0.0.1:8080",
        "--upstream",
        "127.0.0.1:9090",
        "--log-level",
        "warning",
    ]


@pytest.mark.parametrize(
    ("direction", "flags"), [("forward", []), ("reverse", ["-R"]), ("bidir", ["--bidir"])]
)
def test_iperf3_client_command(direction: str, flags: list[str]) -> None:
    command = bench.iperf3_client_command("iperf3", 5201, 4, direction, 1)
    assert command == ["iperf3", "-c", "127.0.0.1", "-p", "5201", "-t", "4", "-J", *flags]


def test_iperf3_parallel_streams() -> None:
    command = bench.iperf3_client_command("iperf3", 5201, 2, "forward", 8)
    assert command[-2:] == ["-P", "8"]


def test_redis_benchmark_command_new_connections() -> None:
    assert bench.redis_benchmark_command("rb", 6379, 1000, 50, new_connections=True) == [
        "rb",
        *("-h", "127.0.0.1", "-p", "6379", "-t", "get", "-n", "1000", "-c", "50", "-q"),
        *("-k", "0"),
    ]


# --- options ----------------------------------------------------------------------------


def test_defaults() -> None:
    args = parse()
    assert args.cases == ["bulk"]
    assert args.targets == ["direct", "relay", "haproxy"]
    assert args.directions == ["forward", "reverse"]
    assert (args.duration, args.repeat, args.parallel, args.json) == (4, 3, 1, None)


def test_repeated_options_keep_canonical_order() -> None:
    args = parse("--direction", "bidir", "--direction", "forward", "--direction", "bidir")
    assert args.directions == ["forward", "bidir"]
    assert parse("--case", "small", "--case", "bulk").cases == ["bulk", "small"]


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_counts_must_be_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--repeat", value)
    assert "--repeat" in capsys.readouterr().err


def test_missing_iperf3_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench.run(parse()) == 2
    assert capsys.readouterr().err == (
        "splicerelay bench: iperf3 not found on PATH (Debian: apt-get install iperf3)\n"
    )


def test_missing_redis_for_the_small_case_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.shutil, "which", lambda name: None if "redis" in name else name)
    assert bench.run(parse("--case", "small")) == 2
    assert capsys.readouterr().err == (
        "splicerelay bench: redis-server, redis-benchmark not found on PATH "
        "(Debian: apt-get install redis-server redis-tools)\n"
    )


@pytest.mark.parametrize(
    ("line", "short"),
    [
        ("iperf 3.12 (cJSON 1.7.15)", "iperf 3.12"),
        (
            "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/",
            "HAProxy 2.6.12-1+deb12u4",
        ),
        ("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64", "Redis 7.0.15"),
        ("redis-benchmark 7.0.15", "redis-benchmark 7.0.15"),
        ("no version here", "no version here"),
    ],
)
def test_short_version(line: str, short: str) -> None:
    assert bench.short_version(line) == short


# --- the report -------------------------------------------------------------------------


def test_report_names_skipped_targets_and_ratios() -> None:
    availability = Availability(skipped={"haproxy": "haproxy is not on PATH"})
    environment = {"cpus": 2, "kernel": "6.1", "tools": {"iperf3": "iperf 3.12 (cJSON 1.7.15)"}}
    report = bench.render_report(
        [bulk_result()], bench.TARGETS, availability, environment, parse("--repeat", "3")
    )
    assert "peers: iperf 3.12\n" in report
    assert "skipped haproxy: haproxy is not on PATH" in report
    assert "  relay/haproxy: Gbit/s 0.53x, CPU s/GB 2.00x" in report
    assert "  relay/direct:  Gbit/s 0.27x" in report
    relay_row = next(line for line in report.splitlines() if line.startswith("  relay "))
    assert relay_row.split() == ["relay", "8.50", "0.250", "25%", "8.00", "FAILED", "9.00"]


def test_json_report_holds_samples_medians_and_ratios() -> None:
    document = bench.report_json(
        [bulk_result()], bench.TARGETS, Availability(), {"cpus": 2}, parse()
    )
    forward = document["results"]["bulk"]["forward"]
    assert len(forward["samples"]) == 9
    assert forward["samples"][1] == {
        "target": "relay",
        "round": 0,
        "bits_per_second": 8e9,
        "bytes": 2_000_000_000,
        "wall_seconds": 2.0,
        "proxy_cpu_seconds": 0.5,
        "cpu_seconds_per_gb": 0.25,
        "proxy_cpu_share": 0.25,
        "error": None,
    }
    assert forward["medians"]["haproxy"]["bits_per_second"] == 16e9
    assert forward["ratios"]["relay/haproxy"]["cpu_seconds_per_gb"] == 2.0
    assert document["settings"]["directions"] == ["forward", "reverse"]
    json.dumps(document)


# --- processes --------------------------------------------------------------------------

LISTENER = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen()\n"
    "time.sleep(600)\n"
)


def test_process_group_waits_for_listen_and_stops_by_pid(tmp_path: Path) -> None:
    port = bench.free_port()
    with ProcessGroup(tmp_path) as group:
        process = group.start("listener", [sys.executable, "-c", LISTENER, str(port)], port)
        assert port in bench.listening_ports()
        assert process.poll() is None
    assert process.returncode == -signal.SIGTERM


def test_process_that_exits_before_listening_is_an_error(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('no such backend'); sys.exit(3)"]
    with (
        ProcessGroup(tmp_path) as group,
        pytest.raises(BenchError, match=r"^early exited with code 3: no such backend$"),
    ):
        group.start("early", argv, bench.free_port())


def test_sample_of_a_load_and_of_a_failure(tmp_path: Path) -> None:
    port = bench.free_port()
    with ProcessGroup(tmp_path) as group:
        proxy = group.start("proxy", [sys.executable, "-c", LISTENER, str(port)], port)
        endpoint = Endpoint("relay", port, proxy)
        good = bench.take_sample(endpoint, 2, lambda: (5e9, 1_000_000))
        assert (good.target, good.round, good.rate, good.amount) == ("relay", 2, 5e9, 1_000_000)
        assert good.proxy_cpu_seconds is not None and good.proxy_cpu_seconds >= 0
        assert good.error is None

        def failing() -> tuple[float, int]:
            raise BenchError("iperf3: connection reset")

        bad = bench.take_sample(endpoint, 0, failing)
        assert bad.error == "iperf3: connection reset"
    gone = bench.take_sample(endpoint, 0, lambda: (1.0, 1))
    assert gone.error == f"relay exited with code {-signal.SIGTERM}"


# --- a real run -------------------------------------------------------------------------


@pytest.mark.peer
def test_short_bench_measures_all_three_targets(tmp_path: Path) -> None:
    for program in ("iperf3", "haproxy"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not on PATH")
    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "splicerelay", "bench", "--duration", "1", "--repeat", "1"]
    command += ["--direction", "forward", "--json", str(output)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(output.read_text())
    assert document["skipped"] == {} and document["failed"] == {}
    forward = document["results"]["bulk"]["forward"]
    assert {sample["target"] for sample in forward["samples"]} == set(bench.TARGETS)
    for target in bench.TARGETS:
        assert forward["medians"][target]["bits_per_second"] > 0, target
    for proxy in bench.PROXIES:
        assert forward["medians"][proxy]["cpu_seconds_per_gb"] > 0, proxy
    assert "relay/haproxy" in result.stdout
