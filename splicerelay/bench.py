"""`splicerelay bench`: the relay, HAProxy and a direct connection, measured side by side.

The machines this runs on are small and shared, so absolute numbers drift from one minute
to the next. The bench therefore measures ratios within one run: every target gets its own
fresh load-generator server, rounds are interleaved (direct, relay, haproxy, direct, ...)
so that drift hits every target alike, and the report gives medians over the rounds.

Cases:

- ``bulk``: iperf3; throughput, and the proxy's CPU seconds per GB moved (GB = 1e9 bytes);
- ``small``: redis-benchmark GET; requests/s over kept-alive connections and with a new
  connection per request, and the proxy's CPU microseconds per request.

The proxy's CPU time is utime + stime (plus that of reaped children) of the proxy process
and its descendants, read from /proc just before and just after each load-generator run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

TARGETS = ("direct", "relay", "haproxy")
PROXIES = ("relay", "haproxy")
DIRECTIONS = ("forward", "reverse", "bidir")
DEFAULT_DIRECTIONS = ("forward", "reverse")
CASES = ("bulk", "small")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_MISSING_TOOL = 2
EXIT_INTERRUPTED = 130

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
# iperf3 serves one test at a time and refuses a client that arrives while the previous
# test is still being torn down; such a client is retried for this long.
IPERF3_BUSY_TIMEOUT = 10.0
IPERF3_SLACK = 30.0
REDIS_BENCHMARK_TIMEOUT = 300.0
HAPROXY_TIMEOUT = "10m"
TCP_LISTEN = "0A"


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# --- what is measured ---------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One measured load: which case, its name, and how its numbers are named and scaled."""

    case: str
    name: str
    rate_key: str
    amount_key: str
    cpu_key: str
    amount_per_cpu_unit: float
    rate_label: str
    rate_scale: float
    cpu_label: str

    @property
    def title(self) -> str:
        return f"{self.case} {self.name}"


def bulk_scenario(direction: str) -> Scenario:
    """The iperf3 scenario for one direction (forward, reverse or bidir)."""
    return Scenario(
        case="bulk",
        name=direction,
        rate_key="bits_per_second",
        amount_key="bytes",
        cpu_key="cpu_seconds_per_gb",
        amount_per_cpu_unit=1e9,
        rate_label="Gbit/s",
        rate_scale=1e-9,
        cpu_label="CPU s/GB",
    )


def small_scenario(new_connections: bool) -> Scenario:
    """The redis-benchmark GET scenario, kept-alive or with a new connection per request."""
    return Scenario(
        case="small",
        name="get_new_connection" if new_connections else "get",
        rate_key="requests_per_second",
        amount_key="requests",
        cpu_key="cpu_seconds_per_million_requests",
        amount_per_cpu_unit=1e6,
        rate_label="req/s",
        rate_scale=1.0,
        cpu_label="CPU us/req",
    )


@dataclass
class Sample:
    """One load-generator run against one target."""

    target: str
    round: int
    rate: float = 0.0
    amount: int = 0
    wall_seconds: float = 0.0
    proxy_cpu_seconds: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def cpu_per_unit(self, scenario: Scenario) -> float | None:
        """Proxy CPU seconds per unit of work (per GB, per million requests)."""
        if self.proxy_cpu_seconds is None or self.amount <= 0:
            return None
        return self.proxy_cpu_seconds / (self.amount / scenario.amount_per_cpu_unit)

    def cpu_share(self) -> float | None:
        """Proxy CPU seconds per wall second: 1.0 is one core kept busy."""
        if self.proxy_cpu_seconds is None or self.wall_seconds <= 0:
            return None
        return self.proxy_cpu_seconds / self.wall_seconds

    def to_json(self, scenario: Scenario) -> dict[str, Any]:
        return {
            "target": self.target,
            "round": self.round,
            scenario.rate_key: self.rate,
            scenario.amount_key: self.amount,
            "wall_seconds": self.wall_seconds,
            "proxy_cpu_seconds": self.proxy_cpu_seconds,
            scenario.cpu_key: self.cpu_per_unit(scenario),
            "proxy_cpu_share": self.cpu_share(),
            "error": self.error,
        }


@dataclass
class ScenarioResult:
    """Every sample of one scenario, in the order they were taken."""

    scenario: Scenario
    samples: list[Sample] = field(default_factory=list)

    def for_target(self, target: str) -> list[Sample]:
        return [sample for sample in self.samples if sample.target == target]


# --- pure helpers: parsing and statistics ---------------------------------------------------


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


REDIS_RATE = re.compile(r"^GET: ([0-9.]+) requests per second")


def parse_redis_benchmark(output: str) -> float:
    """Requests/s from `redis-benchmark -t get -q` output (its last GET summary line).

    The progress lines before it are separated by carriage returns, not newlines.
    """
    rate: float | None = None
    for line in re.split(r"[\r\n]+", output):
        match = REDIS_RATE.match(line.strip())
        if match:
            rate = float(match.group(1))
    if rate is None:
        tail = output.strip().replace("\r", "\n").splitlines()[-1:] or ["no output"]
        raise BenchError(f"redis-benchmark printed no GET rate: {tail[0][:200]}")
    return rate


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


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None when there are none."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def summarize(result: ScenarioResult, targets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Medians per target over its successful samples."""
    scenario = result.scenario
    medians: dict[str, dict[str, Any]] = {}
    for target in targets:
        good = [sample for sample in result.for_target(target) if sample.ok]
        medians[target] = {
            scenario.rate_key: median(sample.rate for sample in good),
            scenario.cpu_key: median(sample.cpu_per_unit(scenario) for sample in good),
            "proxy_cpu_share": median(sample.cpu_share() for sample in good),
            "samples": len(good),
            "failed": len(result.for_target(target)) - len(good),
        }
    return medians


def compare(
    scenario: Scenario, medians: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float | None]]:
    """relay/haproxy for rate and CPU per unit, relay/direct for rate."""

    def get(target: str, key: str) -> float | None:
        value = medians.get(target, {}).get(key)
        return None if value is None else float(value)

    return {
        "relay/haproxy": {
            scenario.rate_key: ratio(
                get("relay", scenario.rate_key), get("haproxy", scenario.rate_key)
            ),
            scenario.cpu_key: ratio(
                get("relay", scenario.cpu_key), get("haproxy", scenario.cpu_key)
            ),
        },
        "relay/direct": {
            scenario.rate_key: ratio(
                get("relay", scenario.rate_key), get("direct", scenario.rate_key)
            ),
        },
    }


# --- commands and configs -------------------------------------------------------------------


def relay_command(listen_port: int, upstream_port: int) -> list[str]:
    """The relay under test: a one-off relay from this interpreter, quiet but for warnings."""
    return [
        sys.executable,
        "-m",
        "splicerelay",
        "run",
        "--listen",
        f"{LOOPBACK}:{listen_port}",
        "--upstream",
        f"{LOOPBACK}:{upstream_port}",
        "--log-level",
        "warning",
    ]


def relay_environment() -> dict[str, str]:
    """The environment for the relay: this very package first on the import path.

    That way the relay measured is the code this bench belongs to, even when it runs from
    a source tree rather than an installed copy.
    """
    package_parent = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": package_parent + (os.pathsep + path if path else "")}


def haproxy_config(listen_port: int, upstream_port: int) -> str:
    """The HAProxy splice baseline: tcp mode, splice both ways, 1 MiB pipes, one thread.

    maxconn stays at 2000: HAProxy refuses to start when maxconn implies more fds than the
    limit allows.
    """
    return (
        "global\n"
        "    maxconn 2000\n"
        "    nbthread 1\n"
        "    tune.pipesize 1048576\n"
        "\n"
        "defaults\n"
        "    mode tcp\n"
        "    option splice-request\n"
        "    option splice-response\n"
        "    timeout connect 5s\n"
        f"    timeout client {HAPROXY_TIMEOUT}\n"
        f"    timeout server {HAPROXY_TIMEOUT}\n"
        "\n"
        "listen bench\n"
        f"    bind {LOOPBACK}:{listen_port}\n"
        f"    server upstream {LOOPBACK}:{upstream_port}\n"
    )


def iperf3_server_command(iperf3: str, port: int) -> list[str]:
    return [iperf3, "-s", "-B", LOOPBACK, "-p", str(port)]


def iperf3_client_command(
    iperf3: str, port: int, duration: int, direction: str, parallel: int
) -> list[str]:
    """`iperf3 -c` for one run; -R for reverse, --bidir for both directions at once."""
    command = [iperf3, "-c", LOOPBACK, "-p", str(port), "-t", str(duration), "-J"]
    if parallel > 1:
        command += ["-P", str(parallel)]
    if direction == "reverse":
        command.append("-R")
    elif direction == "bidir":
        command.append("--bidir")
    return command


def redis_server_command(redis_server: str, port: int) -> list[str]:
    return [
        redis_server,
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
    ]


def redis_benchmark_command(
    redis_benchmark: str, port: int, requests: int, clients: int, new_connections: bool
) -> list[str]:
    """GET load; `-k 0` opens a new connection for every request."""
    command = [
        redis_benchmark,
        "-h",
        LOOPBACK,
        "-p",
        str(port),
        "-t",
        "get",
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-q",
    ]
    if new_connections:
        command += ["-k", "0"]
    return command


# --- processes, ports and /proc -------------------------------------------------------------


def free_port() -> int:
    """A loopback port that was free a moment ago (bind to 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def listening_ports(tables: Sequence[str] = ("/proc/net/tcp", "/proc/net/tcp6")) -> set[int]:
    """Ports with a socket in LISTEN state, from the kernel's TCP tables."""
    ports: set[int] = set()
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            columns = line.split()
            if len(columns) > 3 and columns[3] == TCP_LISTEN:
                ports.add(int(columns[1].rsplit(":", 1)[1], 16))
    return ports


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid`, over all its threads."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tasks:
        try:
            children += [
                int(child) for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            ]
        except OSError:
            continue
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a relay with several workers forks them)."""
    pids = [pid]
    index = 0
    while index < len(pids):
        pids += child_pids(pids[index])
        index += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU seconds so far of `pid` and its descendants, reaped children included."""
    ticks = 0
    for index, member in enumerate(process_tree(pid)):
        try:
            ticks += parse_proc_stat(Path(f"/proc/{member}/stat").read_text()).total
        except OSError:
            if index == 0:
                raise BenchError(f"process {pid} is gone") from None
            # A descendant that exited in the meantime; once reaped, its parent's
            # cutime/cstime hold its ticks.
    return ticks / os.sysconf("SC_CLK_TCK")


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines a process wrote, for error messages."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:])


class ProcessGroup:
    """Every process one case starts; each is stopped by its own pid, never by name."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` with its output in a log file; return once it listens on `port`."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=env,
                )
            except OSError as error:
                raise BenchError(f"{name}: cannot start {argv[0]}: {error}") from None
        self.processes.append((name, process))
        wait_listening(name, process, port, log_path)
        return process

    def stop_all(self) -> None:
        """SIGTERM each process still running, then SIGKILL whatever outlives the wait."""
        while self.processes:
            name, process = self.processes.pop()
            try:
                stop_process(process)
            except subprocess.TimeoutExpired:
                progress(f"{name} (pid {process.pid}) did not exit even after SIGKILL")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop one process we started; Popen only signals it while it is still unreaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=STOP_TIMEOUT)


def wait_listening(name: str, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Wait, with a bound, until `port` is in LISTEN state.

    The kernel's table is read instead of probing with a connection: a probe would count
    as a test for iperf3 and, through a proxy, open a stray upstream connection.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while port not in listening_ports():
        code = process.poll()
        if code is not None:
            raise BenchError(f"{name} exited with code {code}: {log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{name} did not listen on port {port} within {STARTUP_TIMEOUT}s")
        time.sleep(POLL_INTERVAL)


def run_tool(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a load generator to completion; a timeout is an error, not a hang."""
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(argv[0]).name} did not finish within {timeout:.0f}s") from None


def tool_version(path: str) -> str:
    """The first line of `TOOL -v`, or "" when it prints none."""
    try:
        result = run_tool([path, "-v"], timeout=10)
    except BenchError:
        return ""
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0] if lines else ""


# --- targets --------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """Where the load generator connects for one target, and the proxy in between."""

    target: str
    port: int
    proxy: subprocess.Popen[bytes] | None


@dataclass
class Availability:
    """Targets that could not take part, with the reason."""

    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def start_proxy(
    group: ProcessGroup, target: str, upstream_port: int, case: str, haproxy: str | None
) -> Endpoint:
    """Start the relay or HAProxy (the program at `haproxy`) in front of `upstream_port`."""
    port = free_port()
    name = f"{case}-{target}"
    if target == "relay":
        process = group.start(
            name, relay_command(port, upstream_port), port, env=relay_environment()
        )
    else:
        config_path = group.workdir / f"{name}.cfg"
        config_path.write_text(haproxy_config(port, upstream_port))
        if haproxy is None:
            raise BenchError("haproxy is not on PATH")
        process = group.start(name, [haproxy, "-db", "-f", str(config_path)], port)
    return Endpoint(target, port, process)


def start_targets(
    group: ProcessGroup,
    case: str,
    targets: Sequence[str],
    server_command: Callable[[int], list[str]],
    availability: Availability,
    haproxy: str | None,
) -> list[Endpoint]:
    """A fresh server for each target, and the target's proxy in front of it."""
    endpoints: list[Endpoint] = []
    for target in targets:
        if target in availability.skipped:
            continue
        try:
            upstream_port = free_port()
            group.start(f"{case}-{target}-server", server_command(upstream_port), upstream_port)
            if target == "direct":
                endpoints.append(Endpoint(target, upstream_port, None))
            else:
                endpoints.append(start_proxy(group, target, upstream_port, case, haproxy))
        except BenchError as error:
            availability.failed[f"{case}/{target}"] = str(error)
            progress(f"{case}: {target} not measured: {error}")
    return endpoints


# --- running the load -----------------------------------------------------------------------


def progress(message: str) -> None:
    """A progress line on stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def take_sample(
    endpoint: Endpoint, round_index: int, load: Callable[[], tuple[float, int]]
) -> Sample:
    """Run `load` once against `endpoint`, reading the proxy's CPU time around it."""
    sample = Sample(endpoint.target, round_index)
    proxy = endpoint.proxy
    try:
        if proxy is not None and proxy.poll() is not None:
            raise BenchError(f"{endpoint.target} exited with code {proxy.returncode}")
        before = cpu_seconds(proxy.pid) if proxy is not None else None
        started = time.monotonic()
        sample.rate, sample.amount = load()
        sample.wall_seconds = time.monotonic() - started
        if proxy is not None and before is not None:
            sample.proxy_cpu_seconds = cpu_seconds(proxy.pid) - before
    except BenchError as error:
        sample.error = str(error)
    return sample


def run_iperf3(
    iperf3: str, port: int, args: argparse.Namespace, direction: str
) -> tuple[float, int]:
    """One iperf3 client run; retried while the server still finishes the previous test."""
    argv = iperf3_client_command(iperf3, port, args.duration, direction, args.parallel)
    deadline = time.monotonic() + IPERF3_BUSY_TIMEOUT
    while True:
        result = run_tool(argv, timeout=args.duration + IPERF3_SLACK)
        try:
            bits_per_second, received = parse_iperf3_json(result.stdout)
        except BenchError as error:
            if "busy" in str(error) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL * 5)
                continue
            raise
        return bits_per_second, received


def run_redis_benchmark(
    redis_benchmark: str, port: int, args: argparse.Namespace, new_connections: bool
) -> tuple[float, int]:
    """One redis-benchmark run; returns requests/s and the number of requests."""
    requests = args.new_connection_requests if new_connections else args.requests
    argv = redis_benchmark_command(redis_benchmark, port, requests, args.clients, new_connections)
    result = run_tool(argv, timeout=REDIS_BENCHMARK_TIMEOUT)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"redis-benchmark exited with {result.returncode}: {detail[0]}")
    return parse_redis_benchmark(result.stdout), requests


def measure_interleaved(
    scenarios: Sequence[Scenario],
    endpoints: Sequence[Endpoint],
    repeat: int,
    load: Callable[[Scenario, Endpoint], tuple[float, int]],
) -> list[ScenarioResult]:
    """For each scenario, `repeat` rounds, each round visiting every target in turn."""
    results: list[ScenarioResult] = []
    for scenario in scenarios:
        result = ScenarioResult(scenario)
        for round_index in range(repeat):
            for endpoint in endpoints:
                sample = take_sample(endpoint, round_index, partial(load, scenario, endpoint))
                result.samples.append(sample)
                progress(
                    f"{scenario.title} round {round_index + 1}/{repeat} "
                    f"{endpoint.target}: {describe_sample(scenario, sample)}"
                )
        results.append(result)
    return results


def describe_sample(scenario: Scenario, sample: Sample) -> str:
    if sample.error is not None:
        return f"FAILED ({sample.error})"
    text = f"{format_number(sample.rate * scenario.rate_scale)} {scenario.rate_label}"
    cpu = sample.cpu_per_unit(scenario)
    if cpu is not None:
        text += f", {format_number(cpu)} {scenario.cpu_label}"
    return text


def run_bulk(
    args: argparse.Namespace,
    tools: dict[str, str | None],
    workdir: Path,
    availability: Availability,
) -> list[ScenarioResult]:
    """The bulk case: iperf3 through every target, each direction asked for."""
    iperf3 = tools["iperf3"]
    assert iperf3 is not None
    with ProcessGroup(workdir) as group:
        endpoints = start_targets(
            group,
            "bulk",
            args.targets,
            lambda port: iperf3_server_command(iperf3, port),
            availability,
            tools["haproxy"],
        )
        return measure_interleaved(
            [bulk_scenario(direction) for direction in args.directions],
            endpoints,
            args.repeat,
            lambda scenario, endpoint: run_iperf3(iperf3, endpoint.port, args, scenario.name),
        )


def run_small(
    args: argparse.Namespace,
    tools: dict[str, str | None],
    workdir: Path,
    availability: Availability,
) -> list[ScenarioResult]:
    """The small case: redis GETs through every target, kept-alive and new connections."""
    redis_server, redis_benchmark = tools["redis-server"], tools["redis-benchmark"]
    assert redis_server is not None and redis_benchmark is not None
    with ProcessGroup(workdir) as group:
        endpoints = start_targets(
            group,
            "small",
            args.targets,
            lambda port: redis_server_command(redis_server, port),
            availability,
            tools["haproxy"],
        )
        return measure_interleaved(
            [small_scenario(False), small_scenario(True)],
            endpoints,
            args.repeat,
            lambda scenario, endpoint: run_redis_benchmark(
                redis_benchmark, endpoint.port, args, scenario.name == "get_new_connection"
            ),
        )


# --- the report -----------------------------------------------------------------------------


def format_number(value: float | None) -> str:
    """Three significant digits, plain notation; "-" for a missing value."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def scenario_header(scenario: Scenario, args: argparse.Namespace) -> str:
    if scenario.case == "bulk":
        streams = f", -P {args.parallel}" if args.parallel > 1 else ""
        return f"bulk, {scenario.name}: iperf3 -t {args.duration}{streams}"
    if scenario.name == "get":
        return f"small, get: redis-benchmark -t get -n {args.requests} -c {args.clients}"
    return (
        f"small, get with a new connection per request: redis-benchmark -t get "
        f"-n {args.new_connection_requests} -c {args.clients} -k 0"
    )


def render_scenario(
    result: ScenarioResult, targets: Sequence[str], args: argparse.Namespace
) -> list[str]:
    """The table for one scenario: medians per target, every round, and the ratios."""
    scenario = result.scenario
    medians = summarize(result, targets)
    ratios = compare(scenario, medians)
    lines = [
        scenario_header(scenario, args),
        f"  {'target':<9} {scenario.rate_label:>10} {scenario.cpu_label:>11} "
        f"{'proxy CPU':>10}   rounds ({scenario.rate_label})",
    ]
    for target in targets:
        samples = result.for_target(target)
        if not samples:
            continue
        median_row = medians[target]
        rounds = " ".join(
            format_number(sample.rate * scenario.rate_scale) if sample.ok else "FAILED"
            for sample in samples
        )
        rate = median_row[scenario.rate_key]
        scaled = None if rate is None else rate * scenario.rate_scale
        lines.append(
            f"  {target:<9} {format_number(scaled):>10} "
            f"{format_number(median_row[scenario.cpu_key]):>11} "
            f"{format_share(median_row['proxy_cpu_share']):>10}   {rounds}"
        )
    relay_haproxy = ratios["relay/haproxy"]
    lines.append(
        f"  relay/haproxy: {scenario.rate_label} {format_ratio(relay_haproxy[scenario.rate_key])}, "
        f"{scenario.cpu_label} {format_ratio(relay_haproxy[scenario.cpu_key])}"
    )
    lines.append(
        f"  relay/direct:  {scenario.rate_label} "
        f"{format_ratio(ratios['relay/direct'][scenario.rate_key])}"
    )
    return lines


VERSION_NUMBER = re.compile(r"\d+\.\d+[\w.+~-]*")


def short_version(line: str) -> str:
    """ "HAProxy version 2.6.12-1 2023/01/01 - https://..." becomes "HAProxy 2.6.12-1"."""
    number = VERSION_NUMBER.search(line)
    name = line.split(maxsplit=1)[0] if line.strip() else ""
    return f"{name} {number.group(0)}" if number and name else line


def render_report(
    results: Sequence[ScenarioResult],
    targets: Sequence[str],
    availability: Availability,
    environment: dict[str, Any],
    args: argparse.Namespace,
) -> str:
    """The whole human-readable report."""
    lines = [
        f"splicerelay bench: medians of {args.repeat} interleaved round(s) per target; "
        f"{environment['cpus']} CPUs, Linux {environment['kernel']}",
        "proxy CPU = the proxy's CPU seconds per wall second of the run (100% = one core)",
    ]
    versions = [short_version(line) for line in environment.get("tools", {}).values() if line]
    if versions:
        lines.append("peers: " + "; ".join(versions))
    lines += [f"skipped {target}: {reason}" for target, reason in availability.skipped.items()]
    lines += [f"FAILED {target}: {reason}" for target, reason in availability.failed.items()]
    for result in results:
        lines.append("")
        lines += render_scenario(result, targets, args)
    return "\n".join(lines) + "\n"


def report_json(
    results: Sequence[ScenarioResult],
    targets: Sequence[str],
    availability: Availability,
    environment: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every raw sample, the medians and the ratios, by case and scenario."""
    document: dict[str, Any] = {
        "settings": settings(args),
        "environment": environment,
        "skipped": dict(availability.skipped),
        "failed": dict(availability.failed),
        "results": {},
    }
    for result in results:
        scenario = result.scenario
        medians = summarize(result, targets)
        document["results"].setdefault(scenario.case, {})[scenario.name] = {
            "scenario": asdict(scenario),
            "samples": [sample.to_json(scenario) for sample in result.samples],
            "medians": medians,
            "ratios": compare(scenario, medians),
        }
    return document


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "cases": list(args.cases),
        "targets": list(args.targets),
        "directions": list(args.directions),
        "duration": args.duration,
        "parallel": args.parallel,
        "repeat": args.repeat,
        "requests": args.requests,
        "new_connection_requests": args.new_connection_requests,
        "clients": args.clients,
    }


def describe_environment(tools: dict[str, str | None], used: Iterable[str]) -> dict[str, Any]:
    """The machine, and the version of each peer program this run uses."""
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": {name: tool_version(path) for name in used if (path := tools[name])},
    }


# --- the command ----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `splicerelay bench`."""
    parser.description = (
        "Measure the relay, HAProxy (splice baseline) and a direct connection side by side, "
        "with rounds interleaved, and report medians and ratios."
    )
    parser.add_argument(
        "--case",
        dest="cases",
        action="append",
        choices=CASES,
        help="bulk (iperf3) or small (redis-benchmark); repeat for both (default: bulk)",
    )
    parser.add_argument(
        "--target",
        dest="targets",
        action="append",
        choices=TARGETS,
        help="measure only these; repeat for several (default: direct, relay, haproxy)",
    )
    parser.add_argument(
        "--direction",
        dest="directions",
        action="append",
        choices=DIRECTIONS,
        help="bulk direction: forward, reverse (-R) or bidir (--bidir); repeat for several "
        "(default: forward and reverse)",
    )
    parser.add_argument(
        "--duration", type=positive_int, default=4, metavar="SECONDS", help="iperf3 -t (default: 4)"
    )
    parser.add_argument(
        "--parallel",
        type=positive_int,
        default=1,
        metavar="N",
        help="iperf3 -P streams (default: 1)",
    )
    parser.add_argument(
        "--repeat", type=positive_int, default=3, metavar="R", help="rounds per target (default: 3)"
    )
    parser.add_argument(
        "--requests",
        type=positive_int,
        default=100_000,
        metavar="N",
        help="small case: GETs over kept-alive connections (default: 100000)",
    )
    parser.add_argument(
        "--new-connection-requests",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="small case: GETs with a new connection each (default: 10000)",
    )
    parser.add_argument(
        "--clients",
        type=positive_int,
        default=50,
        metavar="C",
        help="small case: redis-benchmark -c (default: 50)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write raw samples and medians here")


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the repeatable options left out, in canonical order and without duplicates."""
    args.cases = ordered(args.cases or ["bulk"], CASES)
    args.targets = ordered(args.targets or list(TARGETS), TARGETS)
    args.directions = ordered(args.directions or list(DEFAULT_DIRECTIONS), DIRECTIONS)


def ordered(chosen: Iterable[str], canonical: Sequence[str]) -> list[str]:
    wanted = set(chosen)
    return [name for name in canonical if name in wanted]


def find_tools() -> dict[str, str | None]:
    """Where each peer program is on PATH, or None."""
    return {
        name: shutil.which(name)
        for name in ("iperf3", "haproxy", "redis-server", "redis-benchmark")
    }


DEBIAN_PACKAGES = {
    "iperf3": "iperf3",
    "haproxy": "haproxy",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
}
CASE_TOOLS = {"bulk": ["iperf3"], "small": ["redis-server", "redis-benchmark"]}


def missing_tools(cases: Sequence[str], tools: dict[str, str | None]) -> list[str]:
    """Load generators and servers the chosen cases cannot run without."""
    return [name for case in cases for name in CASE_TOOLS[case] if tools[name] is None]


def tools_in_use(args: argparse.Namespace) -> list[str]:
    """The peer programs this run starts."""
    used = [name for case in args.cases for name in CASE_TOOLS[case]]
    return used + (["haproxy"] if "haproxy" in args.targets else [])


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the bench runs, so its processes are still stopped."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the report, write --json; return the exit code."""
    resolve_defaults(args)
    tools = find_tools()
    missing = missing_tools(args.cases, tools)
    if missing:
        packages = " ".join(dict.fromkeys(DEBIAN_PACKAGES[name] for name in missing))
        print(
            f"splicerelay bench: {', '.join(missing)} not found on PATH "
            f"(Debian: apt-get install {packages})",
            file=sys.stderr,
        )
        return EXIT_MISSING_TOOL
    availability = Availability()
    if "haproxy" in args.targets and tools["haproxy"] is None:
        availability.skipped["haproxy"] = "haproxy is not on PATH (Debian: apt-get install haproxy)"
    environment = describe_environment(tools, tools_in_use(args))
    results: list[ScenarioResult] = []
    try:
        with (
            interrupt_on_sigterm(),
            tempfile.TemporaryDirectory(prefix="splicerelay-bench-") as workdir,
        ):
            if "bulk" in args.cases:
                results += run_bulk(args, tools, Path(workdir), availability)
            if "small" in args.cases:
                results += run_small(args, tools, Path(workdir), availability)
    except KeyboardInterrupt:
        print("splicerelay bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    sys.stdout.write(render_report(results, args.targets, availability, environment, args))
    if args.json:
        write_json(args.json, report_json(results, args.targets, availability, environment, args))
    failed = availability.failed or any(not s.ok for r in results for s in r.samples)
    return EXIT_FAILED if failed else EXIT_OK


def write_json(path: str, document: dict[str, Any]) -> None:
    with open(path, "w") as out:
        json.dump(document, out, indent=2)
        out.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m splicerelay.bench`: the same as `splicerelay bench`."""
    parser = argparse.ArgumentParser(prog="splicerelay bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
