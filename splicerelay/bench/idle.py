"""The idle workload: what an idle relayed connection costs each proxy, in memory and fds.

For each proxy target: start an echo server and the proxy in front of it, read the proxy
tree's RSS, PSS and open fds from /proc, open N connections through the proxy (each
after one echoed round trip, so that both legs are established and have carried data),
read them again, and divide the difference by N.

The bench process holds the N client sockets itself, so it raises its own soft
RLIMIT_NOFILE to the hard limit (the proxies it starts inherit that); the echo server is
a process of its own with its own limit. When a limit cannot hold the connections, the
workload or the target is skipped with the reason, instead of measuring a proxy that is
out of fds.
"""

from __future__ import annotations

import resource
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from splicerelay.bench.model import (
    FDS_PER_CONNECTION,
    PSS_PER_CONNECTION,
    RSS_PER_CONNECTION,
    Measurement,
    Sample,
    Scenario,
    ScenarioResult,
)
from splicerelay.bench.parse import BenchError
from splicerelay.bench.procs import LOOPBACK, ProcessGroup, TreeUsage, free_port, tree_usage
from splicerelay.bench.progress import Progress
from splicerelay.bench.targets import (
    FORKING,
    Endpoint,
    StartOptions,
    Tools,
    relay_environment,
    start_proxy,
)

IDLE_MESSAGE = b"ping\n"
# fds a proxy holds besides its two sockets per connection: listener, epoll, stdio, logs,
# pooled pipes.
PROXY_FD_RESERVE = 64
# fds the bench holds besides its client sockets (and a margin for the interpreter).
CLIENT_FD_RESERVE = 128
# A forking proxy (socat) costs a whole process per connection: on a small shared machine
# thousands of them are not worth the risk, and a per-connection cost needs no more.
FORKING_CAP = 1000
HAPROXY_MAXCONN_MARGIN = 100
CONNECT_TIMEOUT = 10.0
SECONDS_PER_CONNECTION_BOUND = 0.02
SETTLE_BOUND = 3.0
SETTLE_INTERVAL = 0.1


def idle_scenario(connections: int) -> Scenario:
    return Scenario(
        name="idle",
        workload="idle",
        title=f"{connections} idle connections through each proxy, each after one echoed "
        "round trip; the proxy tree's growth per connection",
        metrics=(RSS_PER_CONNECTION, PSS_PER_CONNECTION, FDS_PER_CONNECTION),
        proxies_only=True,
    )


def proxy_fds_needed(connections: int) -> int:
    """The fds one proxy process needs for `connections` relayed connections."""
    return 2 * connections + PROXY_FD_RESERVE


def largest_fitting(limit: int) -> int:
    """The most connections one proxy process can relay within an fd limit of `limit`."""
    return max(0, (limit - PROXY_FD_RESERVE) // 2)


def connections_for(target: str, requested: int) -> int:
    """How many idle connections `target` is measured with (forking proxies are capped)."""
    return min(requested, FORKING_CAP) if target in FORKING else requested


def client_skip_reason(connections: int, limit: int) -> str | None:
    """Why the bench itself cannot hold `connections` sockets under fd limit `limit`."""
    needed = connections + CLIENT_FD_RESERVE
    if limit >= needed:
        return None
    return (
        f"the bench needs {needed} fds for {connections} client sockets, but RLIMIT_NOFILE "
        f"can only be raised to {limit} (raise the hard limit, or use --idle-connections "
        f"{max(1, limit - CLIENT_FD_RESERVE)})"
    )


def target_skip_reason(target: str, connections: int, limit: int) -> str | None:
    """Why `target` cannot relay `connections` connections in one process under `limit`.

    A forking proxy spreads them over one process per connection, so no one process
    comes near the limit.
    """
    if target in FORKING or proxy_fds_needed(connections) <= limit:
        return None
    return (
        f"needs about {proxy_fds_needed(connections)} fds for {connections} relayed "
        f"connections, but RLIMIT_NOFILE is {limit} (raise the hard limit, or use "
        f"--idle-connections {largest_fitting(limit)})"
    )


@contextmanager
def raised_nofile_limit() -> Iterator[int]:
    """Raise this process's soft fd limit to its hard limit for the block; yield the limit.

    The processes started inside the block inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as nr_open:
            ceiling = int(nr_open.read())
    raised = soft
    if soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            raised = ceiling
        except (ValueError, OSError):
            pass
    try:
        yield raised
    finally:
        if raised != soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_connections(port: int, count: int, deadline: float) -> list[socket.socket]:
    """`count` connections to `port`, each after one echoed round trip; all or an error."""
    connections: list[socket.socket] = []
    try:
        for index in range(count):
            if time.monotonic() > deadline:
                raise BenchError(f"opened only {index} of {count} connections in time")
            try:
                connection = socket.create_connection((LOOPBACK, port), timeout=CONNECT_TIMEOUT)
            except OSError as error:
                raise BenchError(f"connection {index + 1} of {count}: {error}") from None
            connections.append(connection)
            try:
                connection.sendall(IDLE_MESSAGE)
                echoed = receive_exactly(connection, len(IDLE_MESSAGE))
            except OSError as error:
                raise BenchError(f"connection {index + 1} of {count}: {error}") from None
            if echoed != IDLE_MESSAGE:
                raise BenchError(
                    f"connection {index + 1} of {count}: got {echoed!r} back, not the echo"
                )
    except BaseException:
        close_all(connections)
        raise
    return connections


def receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def close_all(connections: Sequence[socket.socket]) -> None:
    for connection in connections:
        connection.close()


def per_connection(before: TreeUsage, after: TreeUsage, connections: int) -> dict[str, float]:
    """The growth from `before` to `after`, per connection."""
    return {
        RSS_PER_CONNECTION.key: (after.rss_kib - before.rss_kib) / connections,
        PSS_PER_CONNECTION.key: (after.pss_kib - before.pss_kib) / connections,
        FDS_PER_CONNECTION.key: (after.fds - before.fds) / connections,
    }


def wait_settled(pid: int, bound: float = SETTLE_BOUND) -> TreeUsage:
    """The tree's usage once its fd count reads the same twice in a row (within `bound`).

    The last echo can reach the client a moment before the proxy is done with that
    connection's bookkeeping (e.g. a pipe going back to its pool).
    """
    deadline = time.monotonic() + bound
    usage = tree_usage(pid)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_INTERVAL)
        latest = tree_usage(pid)
        if (latest.fds, latest.processes) == (usage.fds, usage.processes):
            return latest
        usage = latest
    return usage


def measure_idle(endpoint: Endpoint, connections: int) -> Measurement:
    """Open `connections` idle connections through the endpoint's proxy; its cost each."""
    if endpoint.proxy is None:
        raise BenchError("idle measures a proxy; this target has none")
    pid = endpoint.proxy.pid
    before = wait_settled(pid)
    deadline = time.monotonic() + max(60.0, connections * SECONDS_PER_CONNECTION_BOUND)
    opened = open_connections(endpoint.port, connections, deadline)
    try:
        after = wait_settled(pid)
    finally:
        close_all(opened)
    return Measurement(per_connection(before, after, connections), connections)


def echo_server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "splicerelay.bench.echo", str(port)]


def run_idle(
    targets: Sequence[str],
    requested: int,
    rounds: int,
    tools: Tools,
    workdir: Path,
    progress: Progress,
    describe: Callable[[Scenario, Sample], str],
    proxy_cpus: frozenset[int] | None = None,
) -> ScenarioResult:
    """The idle workload over every proxy target: a fresh echo server and proxy per round
    (the proxy on `proxy_cpus` with --pin)."""
    result = ScenarioResult(idle_scenario(requested))
    proxies = [target for target in targets if target != "direct"]
    with raised_nofile_limit() as limit:
        reason = client_skip_reason(requested, limit)
        for target in proxies:
            target_reason = reason or target_skip_reason(
                target, connections_for(target, requested), limit
            )
            if target_reason is not None:
                result.skipped[target] = target_reason
        for round_index in range(rounds):
            for target in proxies:
                if target in result.skipped:
                    progress.step(
                        f"idle round {round_index + 1}/{rounds} {target}: "
                        f"skipped ({result.skipped[target]})"
                    )
                    continue
                sample = idle_sample(
                    target, round_index, requested, tools, workdir, result, proxy_cpus
                )
                if sample is not None:
                    result.samples.append(sample)
                    message = describe(result.scenario, sample)
                else:
                    message = f"skipped ({result.skipped[target]})"
                progress.step(f"idle round {round_index + 1}/{rounds} {target}: {message}")
    return result


def idle_sample(
    target: str,
    round_index: int,
    requested: int,
    tools: Tools,
    workdir: Path,
    result: ScenarioResult,
    proxy_cpus: frozenset[int] | None = None,
) -> Sample | None:
    """One idle measurement of `target`; None (and a skip reason) if it did not start."""
    connections = connections_for(target, requested)
    options = StartOptions(haproxy_maxconn=connections + HAPROXY_MAXCONN_MARGIN, cpus=proxy_cpus)
    label = f"idle{round_index + 1}"
    with ProcessGroup(workdir) as group:
        try:
            upstream_port = free_port()
            group.start(
                f"{label}-{target}-server",
                echo_server_command(upstream_port),
                upstream_port,
                env=relay_environment(),
            )
            endpoint = start_proxy(group, target, upstream_port, label, tools, options)
        except BenchError as error:
            result.skipped[target] = f"did not start: {error}"
            return None
        sample = Sample(target, round_index)
        try:
            started = time.monotonic()
            measurement = measure_idle(endpoint, connections)
            sample.wall_seconds = time.monotonic() - started
            sample.values, sample.amount = measurement.values, measurement.amount
        except BenchError as error:
            sample.error = str(error)
        return sample
