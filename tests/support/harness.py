"""Test harness: run the real relay as a subprocess and look at it from outside.

The relay under test is the installed program, started the way users start it, so the
tests see its real sockets, its real /metrics and its real exit code. Its fd count and
RSS come from /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

# A port handed out once per test process: see free_port's docstring.
from splicerelay.bench.procs import free_port

STARTUP_TIMEOUT = 15.0
SETTLE_TIMEOUT = 10.0


def refused_port() -> int:
    """A port where connects are refused: bound, never listening, then released."""
    return free_port()


def poll_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Wait for `condition` with a bound; never a bare sleep standing in for a state."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def child_pids(pid: int) -> list[int]:
    """The direct children of process `pid` (e.g. a supervisor's workers), from /proc."""
    children: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return children
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children") as file:
                children += [int(child) for child in file.read().split()]
        except FileNotFoundError:
            continue
    return sorted(set(children))


def is_running(pid: int) -> bool:
    """Does process `pid` exist and not yet reaped as a zombie?"""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@dataclass
class Metrics:
    """One scrape of /metrics: samples by name and labels."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, name: str, default: float | None = None, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels`.

        With no such sample, `default` if given, else KeyError.
        """
        wanted = set(labels.items())
        found = [
            value
            for (sample_name, sample_labels), value in self.samples.items()
            if sample_name == name and wanted <= sample_labels
        ]
        if not found and default is not None:
            return default
        if not found:
            raise KeyError(f"no sample {name} with {labels}")
        return sum(found)


def parse_metrics(text: str) -> Metrics:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Metrics(samples)


@dataclass
class Relay:
    """A running relay subprocess."""

    process: subprocess.Popen[bytes]
    config_path: Path
    metrics_port: int
    stdout_path: Path
    stderr_path: Path
    baseline_fds: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def scrape_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def metrics(self) -> Metrics:
        return parse_metrics(self.scrape_text())

    def fds(self) -> int:
        return fd_count(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def fds_held_for_connections(self) -> int:
        """fds beyond the startup baseline, not counting the pool's idle pipes.

        Empty pipes kept for reuse are the pool's, not any connection's (two fds each,
        bounded by the pool size); every other fd above baseline would be a leak.
        """
        idle_pipes = int(self.metrics().get("splicerelay_pipes", state="idle"))
        return self.fds() - 2 * idle_pipes - self.baseline_fds

    def wait_settled(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until no connection is active and no fd beyond baseline is held."""

        def settled() -> bool:
            metrics = self.metrics()
            return (
                metrics.get("splicerelay_connections_active") == 0
                and metrics.get("splicerelay_pipes", state="in_use") == 0
                and self.fds_held_for_connections() <= 0
            )

        poll_until(settled, timeout, "the relay to release every connection's fds")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


class RelayFactory:
    """Starts relays for one test and checks them when it ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.relays: list[Relay] = []

    def start(
        self,
        config_text: str,
        *,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        config_dir: Path | None = None,
        after_launch: Callable[[], None] | None = None,
        extra_args: list[str] | None = None,
    ) -> Relay:
        """Run `splicerelay run -c` on `config_text` (`{metrics_port}` is filled in).

        Returns once the relay says it is ready, with its fd baseline recorded.
        `after_launch` runs right after the process starts (e.g. to make the first
        connection that socket activation waits for).
        """
        index = len(self.relays)
        metrics_port = free_port()
        # `config_dir` lets a relay that drops privileges read its config.
        config_path = (config_dir or self.tmp_path) / f"relay{index}.yaml"
        config_path.write_text(config_text.replace("{metrics_port}", str(metrics_port)))
        stdout_path = self.tmp_path / f"relay{index}.out"
        stderr_path = self.tmp_path / f"relay{index}.err"
        command = [sys.executable, "-m", "splicerelay", "run", "-c", str(config_path)]
        command += extra_args or []
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                (prefix or []) + command,
                stdout=stdout,
                stderr=stderr,
                env={**os.environ, **(env or {})},
            )
        relay = Relay(process, config_path, metrics_port, stdout_path, stderr_path)
        self.relays.append(relay)
        if after_launch is not None:
            after_launch()

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"relay exited with {process.returncode}: {relay.stderr()}")
            # Every listener is bound before "ready" is logged; probing the routes with
            # connections instead would hand the test's upstreams stray sessions.
            log = relay.stderr()
            return '"message": "ready"' in log or " info ready " in log

        poll_until(ready, STARTUP_TIMEOUT, "the relay to log that it is ready")
        # Counted before the first scrape: a scrape's own socket may linger for a moment
        # after it, and would inflate the baseline.
        baseline = relay.fds()
        idle_pipes = int(relay.metrics().get("splicerelay_pipes", state="idle"))
        relay.baseline_fds = baseline - 2 * idle_pipes
        return relay

    async def astart(self, config_text: str, **options: object) -> Relay:
        """`start` from a trio test, without blocking its event loop meanwhile."""
        return await trio.to_thread.run_sync(lambda: self.start(config_text, **options))  # type: ignore[arg-type]

    def check_and_stop_all(self) -> None:
        for relay in self.relays:
            if relay.process.poll() is not None:
                continue
            relay.wait_settled()
            code = relay.stop()
            assert code == 0, f"relay exited with {code} on SIGTERM: {relay.stderr()}"

    def kill_all(self) -> None:
        for relay in self.relays:
            if relay.process.poll() is None:
                relay.process.kill()
                relay.process.wait(timeout=10)


def relay_config(listen_port: int, *upstream_ports: int, extra: str = "") -> str:
    upstreams = "".join(f"      - address: 127.0.0.1:{port}\n" for port in upstream_ports)
    return (
        "metrics:\n"
        "  listen: 127.0.0.1:{metrics_port}\n"
        "log: {level: info, format: json, access_log: true}\n"
        "shutdown_timeout: 5s\n"
        "routes:\n"
        "  - name: test\n"
        f"    listen: 127.0.0.1:{listen_port}\n"
        "    upstreams:\n"
        f"{upstreams}{extra}"
    )
