"""Python calls per connection in a real relay: `python -m splicerelay.bench.calls`.

The relay runs as its own process (calls_bootstrap.py: the relay's command line with a
call counter hooked in, in that process only) in front of an echo server of its own
(echo.py), and this process is the client: one connection after another, each sending a
small request, reading the reply and closing, as `redis-benchmark -k 0` does. After a
warm-up the counter is emptied, the measured connections run, and once the relay is idle
again the counts are taken: every Python function entered and every C function called in
the relay, divided by the number of measured connections.

    python -m splicerelay.bench.calls --connections 1000 --access-log off --json calls.json

A resumed coroutine counts as one call each time it resumes (see calls_bootstrap.py), so
the trio tasks' wake-ups are in the list too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from splicerelay.bench.calls_bootstrap import SNAPSHOT_SIGNAL
from splicerelay.bench.parse import BenchError
from splicerelay.bench.procs import LOOPBACK, ProcessGroup, free_port
from splicerelay.bench.targets import relay_environment

REQUEST = b"*1\r\n$4\r\nPING\r\n"
IO_TIMEOUT = 5.0  # seconds for one connect, send or receive
SNAPSHOT_TIMEOUT = 30.0  # seconds for the relay to write a snapshot (it is slowed down)
IDLE_TIMEOUT = 30.0  # seconds for the relay to end its last connections
IDLE_POLLS = 3  # consecutive polls that must agree that the relay is idle
POLL_INTERVAL = 0.02


@dataclass(frozen=True)
class CallRow:
    name: str
    kind: str  # "python" or "c"
    calls: int
    per_connection: float


@dataclass(frozen=True)
class CallReport:
    connections: int
    warmup: int
    access_log: bool
    total_per_connection: float
    python_per_connection: float
    c_per_connection: float
    rows: tuple[CallRow, ...]  # most calls first


def relay_config(listen_port: int, upstream_port: int, access_log: bool, control: Path) -> str:
    """The relay's defaults (as users run it) with one route; the control socket in the
    work directory, so that it never takes the place of another relay's."""
    log = "" if access_log else "log: {access_log: false}\n"
    return (
        "workers: 1\n"
        f"{log}"
        f"control: {{socket: {json.dumps(str(control))}}}\n"
        "routes:\n"
        "  - name: calls\n"
        f"    listen: {LOOPBACK}:{listen_port}\n"
        "    upstreams:\n"
        f"      - address: {LOOPBACK}:{upstream_port}\n"
    )


def connect_once(port: int) -> None:
    """One connection: send the request, read its echo, close."""
    with socket.create_connection((LOOPBACK, port), timeout=IO_TIMEOUT) as client:
        client.sendall(REQUEST)
        received = 0
        while received < len(REQUEST):
            chunk = client.recv(len(REQUEST) - received)
            if not chunk:
                raise BenchError(f"the relay closed after {received} of {len(REQUEST)} bytes")
            received += len(chunk)


def drive(port: int, connections: int) -> None:
    for _ in range(connections):
        connect_once(port)


def socket_count(pid: int) -> int:
    """The sockets `pid` holds open. Pipes are left out: the relay keeps emptied pipes in a
    pool, which may hold a few more after a run than before it."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # closed since the listing
    return count


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat: "S" while it sleeps (in epoll_wait), "R" running."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rpartition(")")[2].split()[0]


def wait_idle(pid: int, sockets_at_most: int | None) -> int:
    """Wait, with a bound, until the relay has ended its connections and sleeps; its sockets.

    Idle means: asleep, with no more sockets than `sockets_at_most` (its count when it was
    idle before; None to take whatever it settles on), and the same count, for IDLE_POLLS
    polls in a row. The client has closed every connection by now, but the relay ends
    each one a little later: after the upstream's answer to its own FIN.
    """
    deadline = time.monotonic() + IDLE_TIMEOUT
    last = -1
    agreeing = 0
    while True:
        sockets = socket_count(pid)
        state = process_state(pid)
        if state in ("Z", "X"):
            raise BenchError(f"the relay (pid {pid}) exited")
        quiet = state == "S" and (sockets_at_most is None or sockets <= sockets_at_most)
        agreeing = agreeing + 1 if quiet and sockets == last else 0
        if agreeing >= IDLE_POLLS:
            return sockets
        if time.monotonic() > deadline:
            raise BenchError(f"the relay (pid {pid}) was not idle within {IDLE_TIMEOUT}s")
        last = sockets
        time.sleep(POLL_INTERVAL)


def take_snapshot(pid: int, prefix: Path, index: int) -> list[dict[str, object]]:
    """Ask the relay for the counts since its last snapshot (and to start again from zero)."""
    path = Path(f"{prefix}.{index}.json")
    os.kill(pid, SNAPSHOT_SIGNAL)
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT
    while not path.exists():
        if process_state(pid) in ("Z", "X"):
            raise BenchError(f"the relay (pid {pid}) exited before its snapshot {path.name}")
        if time.monotonic() > deadline:
            raise BenchError(f"the relay wrote no snapshot {path.name} in {SNAPSHOT_TIMEOUT}s")
        time.sleep(POLL_INTERVAL)
    rows = json.loads(path.read_text())
    assert isinstance(rows, list)
    return rows


def make_report(
    raw: list[dict[str, object]], connections: int, warmup: int, access_log: bool
) -> CallReport:
    rows = sorted(
        (
            CallRow(str(row["name"]), str(row["kind"]), calls, calls / connections)
            for row in raw
            if isinstance(calls := row["calls"], int)
        ),
        key=lambda row: (-row.calls, row.name),
    )
    python = sum(row.calls for row in rows if row.kind == "python")
    c_calls = sum(row.calls for row in rows if row.kind == "c")
    return CallReport(
        connections=connections,
        warmup=warmup,
        access_log=access_log,
        total_per_connection=(python + c_calls) / connections,
        python_per_connection=python / connections,
        c_per_connection=c_calls / connections,
        rows=tuple(rows),
    )


def measure(connections: int, warmup: int, access_log: bool, workdir: Path) -> CallReport:
    """Start the echo server and the counting relay, drive them, and count."""
    env = relay_environment()
    upstream_port = free_port()
    relay_port = free_port()
    config = workdir / "relay.yaml"
    config.write_text(relay_config(relay_port, upstream_port, access_log, workdir / "control"))
    prefix = workdir / "calls"
    with ProcessGroup(workdir) as group:
        group.start(
            "echo",
            [sys.executable, "-m", "splicerelay.bench.echo", str(upstream_port)],
            upstream_port,
            env=env,
        )
        relay = group.start(
            "relay",
            [
                sys.executable,
                "-m",
                "splicerelay.bench.calls_bootstrap",
                str(prefix),
                "run",
                "-c",
                str(config),
                "--metrics-listen",
                "none",
            ],
            relay_port,
            env=env,
        )
        drive(relay_port, warmup)
        baseline = wait_idle(relay.pid, None)
        take_snapshot(relay.pid, prefix, 1)  # start-up and warm-up: not counted
        drive(relay_port, connections)
        wait_idle(relay.pid, baseline)
        raw = take_snapshot(relay.pid, prefix, 2)
    return make_report(raw, connections, warmup, access_log)


def format_report(report: CallReport, top: int | None = None) -> str:
    log = "on" if report.access_log else "off"
    lines = [
        f"calls per connection in the relay, {report.connections} connections measured "
        f"after {report.warmup} to warm up, access log {log}",
        f"total {report.total_per_connection:.1f} = python {report.python_per_connection:.1f}"
        f" + c {report.c_per_connection:.1f}",
        "",
        f"{'per conn':>9}  {'kind':6}  function",
    ]
    rows = report.rows if top is None else report.rows[:top]
    lines += [f"{row.per_connection:9.2f}  {row.kind:6}  {row.name}" for row in rows]
    if top is not None and len(report.rows) > top:
        rest = sum(row.per_connection for row in report.rows[top:])
        lines.append(f"{rest:9.2f}  {'':6}  ({len(report.rows) - top} more functions)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m splicerelay.bench.calls",
        description="Count the Python and C function calls per connection in a real relay.",
    )
    parser.add_argument("--connections", type=positive, default=1000, metavar="N")
    parser.add_argument("--warmup", type=positive, default=100, metavar="N")
    parser.add_argument("--access-log", choices=("on", "off"), default="on")
    parser.add_argument("--top", type=positive, default=None, metavar="N", help="rows shown")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE")
    return parser


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="splicerelay-calls-") as workdir:
            report = measure(args.connections, args.warmup, args.access_log == "on", Path(workdir))
    except (BenchError, OSError) as error:
        print(f"calls: {error}", file=sys.stderr)
        return 1
    print(format_report(report, args.top))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
