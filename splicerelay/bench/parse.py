"""Parsers for what the bench reads: load-generator output and /proc files (pure)."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def parse_iperf3_json(text: str) -> tuple[float, int]:
    """Received bits/s and bytes from `iperf3 -J` output (both directions with --bidir)."""
    try:
        report = json.loads(text)
    except json.JSONDecodeError as error:
        raise BenchError(f"iperf3 printed no JSON report: {error}") from None
    if not isinstance(report, dict):
        raise BenchError("iperf3 report is not a JSON object")
    if report.get("error"):
        raise BenchError(f"iperf3: {report['error']}")
    end = report.get("end")
    if not isinstance(end, dict) or not isinstance(end.get("sum_received"), dict):
        raise BenchError("iperf3 report has no end.sum_received")
    bits_per_second = 0.0
    received = 0
    for key in ("sum_received", "sum_received_bidir_reverse"):
        part = end.get(key)
        if isinstance(part, dict):
            bits_per_second += float(part["bits_per_second"])
            received += int(part["bytes"])
    return bits_per_second, received


@dataclass(frozen=True)
class RedisBenchmarkResult:
    """One test's line of `redis-benchmark --csv`, in base units."""

    requests_per_second: float
    p50_seconds: float
    p99_seconds: float


def parse_redis_benchmark_csv(output: str, test: str = "GET") -> RedisBenchmarkResult:
    """The `test` row of `redis-benchmark --csv` output.

    The columns are found by the header's names, not positions. Warnings (such as the one
    `-k 0` prints) and carriage-return progress lines around the CSV are ignored.
    """
    lines = [line for line in re.split(r"[\r\n]+", output) if line.startswith('"')]
    rows = list(csv.reader(lines))
    header = next((row for row in rows if "test" in row and "rps" in row), None)
    column = header.index("test") if header is not None else 0
    row = next((row for row in rows if len(row) > column and row[column] == test), None)
    if header is None or row is None:
        tail = output.strip().replace("\r", "\n").splitlines()[-1:] or ["no output"]
        raise BenchError(f"redis-benchmark printed no {test} result: {tail[0][:200]}")
    fields = dict(zip(header, row, strict=False))
    try:
        return RedisBenchmarkResult(
            requests_per_second=float(fields["rps"]),
            p50_seconds=float(fields["p50_latency_ms"]) / 1000,
            p99_seconds=float(fields["p99_latency_ms"]) / 1000,
        )
    except (KeyError, ValueError) as error:
        raise BenchError(f"redis-benchmark CSV without a usable {error} column") from None


@dataclass(frozen=True)
class ProcCpu:
    """CPU clock ticks of one process, from /proc/PID/stat."""

    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def total(self) -> int:
        """Own ticks plus those of reaped children, so a child exiting loses nothing."""
        return self.utime + self.stime + self.cutime + self.cstime


def parse_proc_stat(text: str) -> ProcCpu:
    """The CPU fields of a /proc/PID/stat line (fields 14-17, counted from 1).

    The command name (field 2) is in parentheses and may itself contain spaces and
    parentheses, so the fields are counted from the last ")".
    """
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 15:
        raise BenchError(f"not a /proc/PID/stat line: {text[:80]!r}")
    # fields[0] is field 3 (state), so field N is fields[N - 3].
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return ProcCpu(utime, stime, cutime, cstime)


def parse_kib_field(text: str, name: str) -> int | None:
    """The value of a `Name:   1234 kB` line, as in /proc/PID/status and smaps_rollup.

    None when the field is absent: a kernel thread or a zombie has no VmRSS line.
    """
    match = re.search(rf"^{re.escape(name)}:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) if match else None


VERSION_NUMBER = re.compile(r"\d+\.\d+[\w.+~-]*")


def version_line(output: str) -> str:
    """The line of a `--version` output that names the version.

    Most programs print it first; socat prints its authors first and "socat version
    1.7.4.4 on ..." second.
    """
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in lines:
        if " version " in f" {line.lower()} ":
            return line
    return lines[0] if lines else ""


def short_version(line: str) -> str:
    """ "HAProxy version 2.6.12-1 2023/01/01 - https://..." becomes "HAProxy 2.6.12-1"."""
    number = VERSION_NUMBER.search(line)
    name = line.split(maxsplit=1)[0] if line.strip() else ""
    return f"{name} {number.group(0)}" if number and name else line
