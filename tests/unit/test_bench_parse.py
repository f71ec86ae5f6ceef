"""The bench's parsers: load-generator output and /proc files."""

from __future__ import annotations

import json

import pytest

from splicerelay.bench.parse import (
    BenchError,
    ProcCpu,
    parse_iperf3_json,
    parse_kib_field,
    parse_proc_stat,
    parse_redis_benchmark_csv,
    short_version,
    version_line,
)

# --- iperf3 -------------------------------------------------------------------------------


def test_iperf3_json_gives_received_rate_and_bytes() -> None:
    report = {
        "start": {},
        "end": {
            "sum_sent": {"bytes": 2000, "bits_per_second": 16000.0},
            "sum_received": {"bytes": 1500, "bits_per_second": 12000.5},
        },
    }
    assert parse_iperf3_json(json.dumps(report)) == (12000.5, 1500)


def test_iperf3_json_bidir_adds_both_directions() -> None:
    report = {
        "end": {
            "sum_sent": {"bytes": 1, "bits_per_second": 1.0},
            "sum_received": {"bytes": 1000, "bits_per_second": 8000.0},
            "sum_sent_bidir_reverse": {"bytes": 1, "bits_per_second": 1.0},
            "sum_received_bidir_reverse": {"bytes": 250, "bits_per_second": 2000.0},
        }
    }
    assert parse_iperf3_json(json.dumps(report)) == (10000.0, 1250)


def test_iperf3_json_error_is_reported() -> None:
    text = json.dumps({"start": {}, "end": {}, "error": "unable to connect to server"})
    with pytest.raises(BenchError, match=r"^iperf3: unable to connect to server$"):
        parse_iperf3_json(text)


@pytest.mark.parametrize("text", ["", "iperf3: error", "[]", '{"end": {}}'])
def test_iperf3_output_without_a_result_is_an_error(text: str) -> None:
    with pytest.raises(BenchError):
        parse_iperf3_json(text)


# --- redis-benchmark --csv ------------------------------------------------------------------

CSV_HEADER = (
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
    '"p99_latency_ms","max_latency_ms"\n'
)


def test_redis_csv_gives_rate_and_percentiles_in_seconds() -> None:
    output = CSV_HEADER + '"GET","37037.04","0.022","0.008","0.015","0.039","0.055","3.159"\n'
    result = parse_redis_benchmark_csv(output)
    assert result.requests_per_second == 37037.04
    assert result.p50_seconds == pytest.approx(15e-6)
    assert result.p99_seconds == pytest.approx(55e-6)


def test_redis_csv_ignores_warnings_progress_and_other_tests() -> None:
    output = (
        "WARNING: Keepalive disabled. You probably need 'echo 1 > ...'\n"
        "GET: rps=0.0 (overall: 0.0) avg_msec=-nan\r"
        + CSV_HEADER
        + '"SET","1.0","1","1","1.000","1","1.000","1"\r\n'
        + '"GET","2500.00","1","1","2.407","1","4.367","1"\r\n'
        + "trailing text\n"
    )
    result = parse_redis_benchmark_csv(output)
    assert result.requests_per_second == 2500.0
    assert result.p50_seconds == pytest.approx(0.002407)
    assert result.p99_seconds == pytest.approx(0.004367)


def test_redis_csv_columns_are_found_by_name() -> None:
    output = '"p99_latency_ms","test","p50_latency_ms","rps"\n"2.000","GET","1.000","10.5"\n'
    result = parse_redis_benchmark_csv(output)
    assert (result.requests_per_second, result.p50_seconds, result.p99_seconds) == (
        10.5,
        0.001,
        0.002,
    )


def test_redis_csv_without_the_test_row_is_an_error() -> None:
    with pytest.raises(BenchError, match="Could not connect"):
        parse_redis_benchmark_csv("Could not connect to Redis at 127.0.0.1:1\n")
    with pytest.raises(BenchError, match="no GET result"):
        parse_redis_benchmark_csv(CSV_HEADER + '"SET","1","1","1","1","1","1","1"\n')


def test_redis_csv_without_a_percentile_column_is_an_error() -> None:
    with pytest.raises(BenchError, match="p99_latency_ms"):
        parse_redis_benchmark_csv('"test","rps","p50_latency_ms"\n"GET","1","1"\n')


def test_redis_csv_with_a_non_number_is_an_error() -> None:
    with pytest.raises(BenchError):
        parse_redis_benchmark_csv(
            '"test","rps","p50_latency_ms","p99_latency_ms"\n"GET","x","1","1"\n'
        )


# --- /proc --------------------------------------------------------------------------------

# A real-looking stat line whose command name holds spaces and both parentheses.
STAT = (
    "4242 (odd) name (x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 "
    "250 75 3 4 20 0 3 0 12345 100000000 2000 18446744073709551615"
)


def test_proc_stat_cpu_fields_are_counted_from_the_last_parenthesis() -> None:
    assert parse_proc_stat(STAT) == ProcCpu(utime=250, stime=75, cutime=3, cstime=4)
    assert parse_proc_stat(STAT).total == 332


@pytest.mark.parametrize("text", ["", "4242 (short) S 1 2 3", "no parenthesis " * 10])
def test_malformed_proc_stat_is_an_error(text: str) -> None:
    with pytest.raises(BenchError):
        parse_proc_stat(text)


STATUS = "Name:\tpython3\nVmPeak:\t  30000 kB\nVmRSS:\t   12345 kB\nRssAnon:\t    4000 kB\n"
ROLLUP = "55550000-7ffd0000 ---p 00000000 00:00 0    [rollup]\nRss:   12345 kB\nPss:    9876 kB\n"


def test_kib_fields_of_status_and_smaps_rollup() -> None:
    assert parse_kib_field(STATUS, "VmRSS") == 12345
    assert parse_kib_field(STATUS, "RssAnon") == 4000
    assert parse_kib_field(ROLLUP, "Pss") == 9876
    assert parse_kib_field(ROLLUP, "Rss") == 12345


def test_kib_field_absent_or_only_a_prefix_is_none() -> None:
    assert parse_kib_field("Name:\tkthreadd\nState:\tS\n", "VmRSS") is None
    assert parse_kib_field("VmRSSx:\t5 kB\n", "VmRSS") is None
    assert parse_kib_field("", "Pss") is None


# --- versions -----------------------------------------------------------------------------


def test_version_line_picks_the_line_naming_the_version() -> None:
    socat = (
        "socat by Gerhard Rieger and contributors - see www.dest-unreach.org\n"
        "socat version 1.7.4.4 on 06 Nov 2022 08:15:51\n"
        "   running on Linux version #1 SMP\n"
    )
    assert version_line(socat) == "socat version 1.7.4.4 on 06 Nov 2022 08:15:51"
    assert version_line("\niperf 3.12 (cJSON 1.7.15)\nLinux host 6.1\n") == (
        "iperf 3.12 (cJSON 1.7.15)"
    )
    assert version_line("") == ""


@pytest.mark.parametrize(
    ("line", "short"),
    [
        ("iperf 3.12 (cJSON 1.7.15)", "iperf 3.12"),
        (
            "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/",
            "HAProxy 2.6.12-1+deb12u4",
        ),
        ("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64", "Redis 7.0.15"),
        ("socat version 1.7.4.4 on 06 Nov 2022 08:15:51", "socat 1.7.4.4"),
        ("redis-benchmark 7.0.15", "redis-benchmark 7.0.15"),
        ("no version here", "no version here"),
    ],
)
def test_short_version(line: str, short: str) -> None:
    assert short_version(line) == short
