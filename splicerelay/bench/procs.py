"""The bench's processes: starting and stopping them by pid, and reading their cost in /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from splicerelay.bench.parse import BenchError, parse_kib_field, parse_proc_stat

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
TCP_LISTEN = "0A"


# Ports free_port has handed out in this process.
_handed_out: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A loopback port that was free a moment ago (bind to 0, read it back, close).

    Never the same port twice: once its probe is closed, the kernel may offer the same
    port again, and a run that takes two ports (a server and the proxy in front of it)
    must not get one port for both.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(1000):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError("no free loopback port that this process has not handed out already")


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
    """`pid` and all its descendants (relay workers, socat's per-connection children)."""
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


@dataclass(frozen=True)
class TreeUsage:
    """Memory and open fds of a process and its descendants, summed.

    RSS counts a page shared by several processes (after fork) once in each of them, so
    for a tree of processes it overstates; PSS divides each shared page among its sharers
    and adds up to what the tree really holds.
    """

    processes: int
    rss_kib: int
    pss_kib: int
    fds: int


def tree_usage(pid: int) -> TreeUsage:
    """RSS, PSS and fd count of `pid` and its descendants, from /proc."""
    rss = pss = fds = processes = 0
    for index, member in enumerate(process_tree(pid)):
        try:
            status = Path(f"/proc/{member}/status").read_text()
            member_fds = len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            if index == 0:
                raise BenchError(f"process {pid} is gone") from None
            continue
        try:
            rollup = Path(f"/proc/{member}/smaps_rollup").read_text()
        except OSError:  # kernels before 4.14: RSS stands in for PSS
            rollup = ""
        member_rss = parse_kib_field(status, "VmRSS") or 0
        rss += member_rss
        pss += parse_kib_field(rollup, "Pss") or member_rss
        fds += member_fds
        processes += 1
    return TreeUsage(processes, rss, pss, fds)


@dataclass(frozen=True)
class Pinning:
    """--pin: the core the proxies run on, and the cores of everything else the bench runs.

    On a small machine the load generators and their servers compete with the proxy for
    the same cores, and a proxy's CPU time per request then depends on who else ran on
    its core. Pinned, each proxy has a core to itself, and proxies compare per core.
    """

    proxies: frozenset[int]
    load: frozenset[int]


def plan_pinning(available: Collection[int]) -> Pinning:
    """The last usable core for the proxies, the others for the load; BenchError if < 2."""
    cores = sorted(available)
    if len(cores) < 2:
        raise BenchError(
            f"--pin needs at least 2 usable cores, and this process may use {len(cores)}"
        )
    return Pinning(frozenset(cores[-1:]), frozenset(cores[:-1]))


@contextmanager
def on_cpus(cpus: Collection[int] | None) -> Iterator[None]:
    """Run the block on `cpus`, and so every process it starts (None: as it is).

    Only the calling thread moves (Linux takes pid 0 as "this thread"), and a child
    inherits the affinity of the thread that forked it, from its first instruction: a
    relay with `workers: auto` counts its usable cores already pinned, and no process is
    ever seen running elsewhere, as it would be if it were moved after it started.
    """
    if cpus is None:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines a process wrote, for error messages."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:])


class ProcessGroup:
    """Every process one workload starts; each is stopped by its own pid, never by name."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
        cpus: Collection[int] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` (on `cpus`, if given) with its output in a log file; return once it
        listens on `port`."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log, on_cpus(cpus):
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
                print(
                    f"{name} (pid {process.pid}) did not exit even after SIGKILL",
                    file=sys.stderr,
                    flush=True,
                )


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
    except OSError as error:
        raise BenchError(f"cannot run {argv[0]}: {error}") from None
