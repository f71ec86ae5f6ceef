"""Running the load generators (iperf3, redis-benchmark) through the targets, interleaved.

Every target gets its own fresh server, and rounds are interleaved (direct, relay,
haproxy, ..., direct, relay, ...) so that drift on a shared machine hits every target
alike. The proxy's CPU time is that of its whole process tree, read from /proc just
before and just after each run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from splicerelay.bench.model import (
    BITS_PER_SECOND,
    CPU_PER_GB,
    CPU_PER_MILLION_REQUESTS,
    P50_SECONDS,
    P99_SECONDS,
    REQUESTS_PER_SECOND,
    Measurement,
    Sample,
    Scenario,
    ScenarioResult,
)
from splicerelay.bench.parse import BenchError, parse_iperf3_json, parse_redis_benchmark_csv
from splicerelay.bench.procs import (
    LOOPBACK,
    POLL_INTERVAL,
    ProcessGroup,
    cpu_seconds,
    free_port,
    process_tree,
    run_tool,
)
from splicerelay.bench.progress import Progress
from splicerelay.bench.targets import Endpoint, StartOptions, Tools, start_proxy

# iperf3 serves one test at a time and refuses a client that arrives while the previous
# test is still being torn down; such a client is retried for this long.
IPERF3_BUSY_TIMEOUT = 10.0
IPERF3_SLACK = 30.0
REDIS_BENCHMARK_TIMEOUT = 300.0
CHILDREN_GONE_BOUND = 2.0

Load = Callable[[Endpoint], Measurement]


# --- commands -------------------------------------------------------------------------------


def iperf3_server_command(iperf3: list[str], port: int) -> list[str]:
    return [*iperf3, "-s", "-B", LOOPBACK, "-p", str(port)]


def iperf3_client_command(
    iperf3: list[str], port: int, duration: int, direction: str, streams: int
) -> list[str]:
    """`iperf3 -c` for one run; -R for reverse, --bidir for both directions at once."""
    command = [*iperf3, "-c", LOOPBACK, "-p", str(port), "-t", str(duration), "-J"]
    if streams > 1:
        command += ["-P", str(streams)]
    if direction == "reverse":
        command.append("-R")
    elif direction == "bidir":
        command.append("--bidir")
    return command


def redis_server_command(redis_server: list[str], port: int) -> list[str]:
    return [
        *redis_server,
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
    redis_benchmark: list[str], port: int, requests: int, clients: int, new_connections: bool
) -> list[str]:
    """GET load, CSV output; `-k 0` opens a new connection for every request."""
    command = [
        *redis_benchmark,
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
        "--csv",
    ]
    if new_connections:
        command += ["-k", "0"]
    return command


# --- scenarios ------------------------------------------------------------------------------


def bulk_scenario(workload: str, direction: str, duration: int, streams: int) -> Scenario:
    """iperf3 for one direction (forward, reverse or bidir); `streams` parallel streams."""
    name = workload if direction == "forward" else f"{workload}-{direction}"
    streams_text = "one stream" if streams == 1 else f"-P {streams}"
    return Scenario(
        name=name,
        workload=workload,
        title=f"iperf3 -t {duration}, {streams_text}, {direction}",
        metrics=(BITS_PER_SECOND,),
        cpu=CPU_PER_GB,
    )


def rr_scenario(requests: int, clients: int) -> Scenario:
    return Scenario(
        name="rr",
        workload="rr",
        title=f"redis-benchmark GET, {clients} keep-alive clients, {requests} requests",
        metrics=(REQUESTS_PER_SECOND,),
        cpu=CPU_PER_MILLION_REQUESTS,
    )


def conn_scenario(requests: int, clients: int) -> Scenario:
    return Scenario(
        name="conn",
        workload="conn",
        title=f"redis-benchmark GET -k 0 (a new connection per request), {clients} clients, "
        f"{requests} requests",
        metrics=(REQUESTS_PER_SECOND,),
        cpu=CPU_PER_MILLION_REQUESTS,
    )


def latency_scenario(requests: int) -> Scenario:
    """Round-trip latency of a small request, one at a time over one connection.

    Measured with redis-benchmark -c 1 rather than a Python ping-pong client: its timing
    loop is C with an HDR histogram (microsecond resolution) and no interpreter, garbage
    collector or GIL in the path, whose own jitter would be of the same order as the tens
    of microseconds a proxy adds. It is also the same peer as rr and conn, so the three
    small-request workloads share their servers.
    """
    return Scenario(
        name="latency",
        workload="latency",
        title=f"redis-benchmark GET, 1 client, {requests} sequential requests",
        metrics=(P50_SECONDS, P99_SECONDS),
        cpu=CPU_PER_MILLION_REQUESTS,
    )


# --- running --------------------------------------------------------------------------------


def run_iperf3(
    iperf3: list[str], port: int, duration: int, direction: str, streams: int
) -> Measurement:
    """One iperf3 client run; retried while the server still finishes the previous test."""
    argv = iperf3_client_command(iperf3, port, duration, direction, streams)
    deadline = time.monotonic() + IPERF3_BUSY_TIMEOUT
    while True:
        result = run_tool(argv, timeout=duration + IPERF3_SLACK)
        try:
            bits_per_second, received = parse_iperf3_json(result.stdout)
        except BenchError as error:
            if "busy" in str(error) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL * 5)
                continue
            raise
        return Measurement({BITS_PER_SECOND.key: bits_per_second}, received)


def run_redis_benchmark(
    redis_benchmark: list[str], port: int, requests: int, clients: int, new_connections: bool
) -> Measurement:
    """One redis-benchmark run: requests/s, p50 and p99, and the number of requests."""
    argv = redis_benchmark_command(redis_benchmark, port, requests, clients, new_connections)
    result = run_tool(argv, timeout=REDIS_BENCHMARK_TIMEOUT)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"redis-benchmark exited with {result.returncode}: {detail[0]}")
    parsed = parse_redis_benchmark_csv(result.stdout)
    values = {
        REQUESTS_PER_SECOND.key: parsed.requests_per_second,
        P50_SECONDS.key: parsed.p50_seconds,
        P99_SECONDS.key: parsed.p99_seconds,
    }
    return Measurement(values, requests)


def take_sample(endpoint: Endpoint, round_index: int, load: Callable[[], Measurement]) -> Sample:
    """Run `load` once against `endpoint`, reading the proxy's CPU time around it."""
    sample = Sample(endpoint.target, round_index)
    proxy = endpoint.proxy
    try:
        if proxy is not None and proxy.poll() is not None:
            raise BenchError(f"{endpoint.target} exited with code {proxy.returncode}")
        before = cpu_seconds(proxy.pid) if proxy is not None else None
        tree_size = len(process_tree(proxy.pid)) if proxy is not None else 0
        started = time.monotonic()
        measurement = load()
        sample.wall_seconds = time.monotonic() - started
        sample.values, sample.amount = dict(measurement.values), measurement.amount
        if proxy is not None and before is not None:
            wait_children_gone(proxy.pid, tree_size)
            sample.proxy_cpu_seconds = cpu_seconds(proxy.pid) - before
    except BenchError as error:
        sample.error = str(error)
    return sample


def wait_children_gone(pid: int, tree_size: int, bound: float = CHILDREN_GONE_BOUND) -> None:
    """Wait, with a bound, until the tree of `pid` is back to `tree_size` processes.

    A forking proxy's per-connection children exit as the load generator's connections
    close. Their CPU time moves into the parent's cutime/cstime only once reaped; read in
    between, a child's time could be missed (gone from its own stat, not yet in the
    parent's).
    """
    deadline = time.monotonic() + bound
    while len(process_tree(pid)) > tree_size and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)


@dataclass
class StartReport:
    """The endpoints that started, and why the others did not."""

    endpoints: list[Endpoint]
    skipped: dict[str, str]


def start_targets(
    group: ProcessGroup,
    label: str,
    targets: Sequence[str],
    server_command: Callable[[int], list[str]],
    tools: Tools,
    options: StartOptions | None = None,
) -> StartReport:
    """A fresh server for each target, and the target's proxy in front of it.

    A target that fails to start is skipped with the reason, not a crash: e.g. a relay
    build that refuses `workers: auto`.
    """
    report = StartReport([], {})
    for target in targets:
        try:
            upstream_port = free_port()
            group.start(f"{label}-{target}-server", server_command(upstream_port), upstream_port)
            if target == "direct":
                report.endpoints.append(Endpoint(target, upstream_port, None))
            else:
                report.endpoints.append(
                    start_proxy(group, target, upstream_port, label, tools, options)
                )
        except BenchError as error:
            report.skipped[target] = f"did not start: {error}"
    return report


def measure_interleaved(
    jobs: Sequence[tuple[Scenario, Load]],
    endpoints: Sequence[Endpoint],
    rounds: int,
    progress: Progress,
    describe: Callable[[Scenario, Sample], str],
) -> list[ScenarioResult]:
    """For each scenario, `rounds` rounds, each round visiting every target in turn."""
    results: list[ScenarioResult] = []
    for scenario, load in jobs:
        result = ScenarioResult(scenario)
        for round_index in range(rounds):
            for endpoint in endpoints:
                sample = take_sample(endpoint, round_index, partial(load, endpoint))
                result.samples.append(sample)
                progress.step(
                    f"{scenario.name} round {round_index + 1}/{rounds} "
                    f"{endpoint.target}: {describe(scenario, sample)}"
                )
        results.append(result)
    return results
