"""`splicerelay bench`: the relay and other TCP proxies, measured side by side in one run.

The machines this runs on are small and shared, so absolute numbers drift from one minute
to the next. The bench therefore measures ratios within one run: every target gets its own
fresh load-generator server, rounds are interleaved (direct, relay, haproxy, direct, ...)
so that drift hits every target alike, and the report gives medians over the rounds and
each target's ratio to HAProxy, the splice baseline. The relay runs with its defaults,
access log on, because that is what users run; ``relay-nolog`` beside it is the same
relay without its access log, and the report sets the two side by side.

The options are defined in `options`, the targets in `targets`, the workloads here:

- ``bulk``: iperf3, one stream; throughput, and the proxy's CPU seconds per GB moved;
- ``bulk8``: the same with 8 parallel streams (iperf3 -P 8);
- ``rr``: redis-benchmark GET with 50 keep-alive clients; requests/s, CPU us per request;
- ``conn``: the same with a new connection per request (redis-benchmark -k 0);
- ``latency``: p50 and p99 of a GET round trip, one request at a time (`load`);
- ``idle``: RSS, PSS and fds per idle relayed connection of each proxy (`idle`).

The proxy's CPU time is utime + stime (plus that of reaped children) of the proxy process
and its descendants, read from /proc just before and just after each load-generator run.
With --pin, every proxy runs on one core and everything else the bench runs on the others
(`procs.Pinning`); ``relay-auto`` and ``haproxy-auto`` then size themselves to the
proxies' cores, and unpinned to every core the bench may use. What was measured with all
this, change by change, is in `journal`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from splicerelay.bench.chart import write_png
from splicerelay.bench.idle import run_idle
from splicerelay.bench.load import (
    Load,
    bulk_scenario,
    conn_scenario,
    iperf3_server_command,
    latency_scenario,
    measure_interleaved,
    redis_server_command,
    rr_scenario,
    run_iperf3,
    run_redis_benchmark,
    start_targets,
)
from splicerelay.bench.model import Measurement, Scenario, ScenarioResult
from splicerelay.bench.options import (
    WORKLOADS,
    add_arguments,
    resolve_defaults,
    settings,
)
from splicerelay.bench.parse import BenchError
from splicerelay.bench.procs import (
    Pinning,
    ProcessGroup,
    listening_ports,
    on_cpus,
    plan_pinning,
)
from splicerelay.bench.progress import Progress, make_progress
from splicerelay.bench.report import BenchReport, describe_sample, render_markdown, report_json
from splicerelay.bench.targets import (
    TARGET_PROGRAMS,
    Endpoint,
    StartOptions,
    Tools,
    find_tools,
    missing_reason,
    target_skip_reason,
    tool_version,
)

__all__ = [
    "WORKLOADS",
    "add_arguments",
    "listening_ports",
    "main",
    "resolve_defaults",
    "run",
    "settings",
]

BULK_STREAMS = {"bulk": 1, "bulk8": 8}
IPERF3_WORKLOADS = ("bulk", "bulk8")
REDIS_WORKLOADS = ("rr", "conn", "latency")
WORKLOAD_PROGRAMS: dict[str, tuple[str, ...]] = {
    "bulk": ("iperf3",),
    "bulk8": ("iperf3",),
    "rr": ("redis-server", "redis-benchmark"),
    "conn": ("redis-server", "redis-benchmark"),
    "latency": ("redis-server", "redis-benchmark"),
    "idle": (),
}

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_MISSING_TOOL = 2
EXIT_INTERRUPTED = 130


# --- what runs ------------------------------------------------------------------------------


def skipped_workloads(workloads: Sequence[str], tools: Tools) -> dict[str, str]:
    """The workloads whose load generators are not installed, with the reason."""
    return {
        workload: reason
        for workload in workloads
        if (reason := missing_reason(WORKLOAD_PROGRAMS[workload], tools)) is not None
    }


def skipped_targets(targets: Sequence[str], tools: Tools) -> dict[str, str]:
    """The targets whose programs are not installed, with the reason."""
    return {
        target: reason
        for target in targets
        if (reason := target_skip_reason(target, tools)) is not None
    }


def iperf3_load(
    iperf3: list[str], duration: int, direction: str, streams: int, endpoint: Endpoint
) -> Measurement:
    return run_iperf3(iperf3, endpoint.port, duration, direction, streams)


def redis_load(
    redis_benchmark: list[str],
    requests: int,
    clients: int,
    new_connections: bool,
    endpoint: Endpoint,
) -> Measurement:
    return run_redis_benchmark(redis_benchmark, endpoint.port, requests, clients, new_connections)


def iperf3_jobs(
    args: argparse.Namespace, workloads: Sequence[str], iperf3: list[str]
) -> list[tuple[Scenario, Load]]:
    """The bulk scenarios asked for, each with its iperf3 run."""
    jobs: list[tuple[Scenario, Load]] = []
    for workload in IPERF3_WORKLOADS:
        if workload not in workloads:
            continue
        streams = BULK_STREAMS[workload]
        for direction in args.directions:
            scenario = bulk_scenario(workload, direction, args.duration, streams)
            jobs.append((scenario, partial(iperf3_load, iperf3, args.duration, direction, streams)))
    return jobs


def redis_jobs(
    args: argparse.Namespace, workloads: Sequence[str], redis_benchmark: list[str]
) -> list[tuple[Scenario, Load]]:
    """The rr, conn and latency scenarios asked for, each with its redis-benchmark run."""
    load = partial(redis_load, redis_benchmark)
    jobs: list[tuple[Scenario, Load]] = []
    if "rr" in workloads:
        scenario = rr_scenario(args.requests, args.clients)
        jobs.append((scenario, partial(load, args.requests, args.clients, False)))
    if "conn" in workloads:
        scenario = conn_scenario(args.new_connection_requests, args.clients)
        jobs.append((scenario, partial(load, args.new_connection_requests, args.clients, True)))
    if "latency" in workloads:
        scenario = latency_scenario(args.latency_requests)
        jobs.append((scenario, partial(load, args.latency_requests, 1, False)))
    return jobs


def total_steps(jobs: int, idle: bool, targets: Sequence[str], rounds: int) -> int:
    """Measurements the run will take: one per scenario, round and target."""
    proxies = [target for target in targets if target != "direct"]
    return rounds * (jobs * len(targets) + (len(proxies) if idle else 0))


def run_group(
    label: str,
    jobs: Sequence[tuple[Scenario, Load]],
    server: list[str],
    server_command: Callable[[list[str], int], list[str]],
    targets: Sequence[str],
    tools: Tools,
    workdir: Path,
    rounds: int,
    progress: Progress,
    pinning: Pinning | None = None,
) -> list[ScenarioResult]:
    """Start a server and proxy per target, then measure `jobs` interleaved over them."""
    if not jobs:
        return []
    options = StartOptions(cpus=pinning.proxies if pinning else None)
    with ProcessGroup(workdir) as group:
        server_for = partial(server_command, server)
        started = start_targets(group, label, targets, server_for, tools, options)
        for target, reason in started.skipped.items():
            progress.skip(len(jobs) * rounds, f"{label}: {target} skipped: {reason}")
        results = measure_interleaved(jobs, started.endpoints, rounds, progress, describe_sample)
    for result in results:
        result.skipped.update(started.skipped)
    return results


def run_workloads(
    args: argparse.Namespace,
    targets: Sequence[str],
    tools: Tools,
    workloads: Sequence[str],
    workdir: Path,
    progress: Progress,
    pinning: Pinning | None = None,
) -> list[ScenarioResult]:
    """Every workload asked for, group by group; with `pinning`, the proxies on their core
    and everything else (the bench itself included) on the others."""
    with on_cpus(pinning.load if pinning else None):
        return measure_workloads(args, targets, tools, workloads, workdir, progress, pinning)


def measure_workloads(
    args: argparse.Namespace,
    targets: Sequence[str],
    tools: Tools,
    workloads: Sequence[str],
    workdir: Path,
    progress: Progress,
    pinning: Pinning | None,
) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    if any(workload in workloads for workload in IPERF3_WORKLOADS):
        iperf3 = tools["iperf3"]
        assert iperf3 is not None
        results += run_group(
            "iperf3",
            iperf3_jobs(args, workloads, iperf3),
            iperf3,
            iperf3_server_command,
            targets,
            tools,
            workdir,
            args.rounds,
            progress,
            pinning,
        )
    if any(workload in workloads for workload in REDIS_WORKLOADS):
        redis_server, redis_benchmark = tools["redis-server"], tools["redis-benchmark"]
        assert redis_server is not None and redis_benchmark is not None
        results += run_group(
            "redis",
            redis_jobs(args, workloads, redis_benchmark),
            redis_server,
            redis_server_command,
            targets,
            tools,
            workdir,
            args.rounds,
            progress,
            pinning,
        )
    if "idle" in workloads:
        results.append(
            run_idle(
                targets,
                args.idle_connections,
                args.rounds,
                tools,
                workdir,
                progress,
                describe_sample,
                pinning.proxies if pinning else None,
            )
        )
    return results


def programs_in_use(workloads: Sequence[str], targets: Sequence[str]) -> list[str]:
    """The peer programs this run starts, each once."""
    programs = [program for workload in workloads for program in WORKLOAD_PROGRAMS[workload]]
    programs += [TARGET_PROGRAMS[target] for target in targets if target in TARGET_PROGRAMS]
    return list(dict.fromkeys(programs))


def describe_environment(tools: Tools, used: Iterable[str]) -> dict[str, Any]:
    """The machine, and the version of each peer program this run uses."""
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": {name: tool_version(name, prefix) for name in used if (prefix := tools[name])},
    }


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


# --- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the report, write the files asked for; return the exit code."""
    resolve_defaults(args)
    tools = find_tools()
    missing_workloads = skipped_workloads(args.workloads, tools)
    workloads = [workload for workload in args.workloads if workload not in missing_workloads]
    if not workloads:
        for workload, reason in missing_workloads.items():
            print(f"splicerelay bench: {workload}: {reason}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    recorded = settings(args)
    pinning = None
    if args.pin:
        try:
            pinning = plan_pinning(os.sched_getaffinity(0))
        except BenchError as error:
            print(f"splicerelay bench: {error}", file=sys.stderr)
            return EXIT_MISSING_TOOL
        recorded["pin"] = {"proxies": sorted(pinning.proxies), "load": sorted(pinning.load)}
    missing_targets = skipped_targets(args.targets, tools)
    targets = [target for target in args.targets if target not in missing_targets]
    environment = describe_environment(tools, programs_in_use(workloads, targets))
    progress = make_progress()
    for name, reason in {**missing_workloads, **missing_targets}.items():
        progress.note(f"{name} skipped: {reason}")
    jobs = len(iperf3_jobs(args, workloads, [])) + len(redis_jobs(args, workloads, []))
    progress.start(total_steps(jobs, "idle" in workloads, targets, args.rounds))
    try:
        with (
            interrupt_on_sigterm(),
            tempfile.TemporaryDirectory(prefix="splicerelay-bench-") as workdir,
        ):
            results = run_workloads(
                args, targets, tools, workloads, Path(workdir), progress, pinning
            )
    except KeyboardInterrupt:
        progress.close()
        print("splicerelay bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.close()
    report = BenchReport(
        results, list(args.targets), environment, recorded, missing_targets, missing_workloads
    )
    return finish(report, args)


def finish(report: BenchReport, args: argparse.Namespace) -> int:
    """Print and write the report; the exit code says whether every measurement worked."""
    markdown = render_markdown(report)
    sys.stdout.write(markdown)
    sys.stdout.flush()
    if args.markdown:
        Path(args.markdown).write_text(markdown)
    if args.json:
        write_json(args.json, report_json(report))
    if args.png:
        reason = write_png(args.png, report.results, report.targets)
        if reason is not None:
            print(f"splicerelay bench: no chart written: {reason}", file=sys.stderr)
    failed = any(not sample.ok for result in report.results for sample in result.samples)
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
