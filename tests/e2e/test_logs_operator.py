"""Logs an operator can act on, seen from outside the real relay process.

systemd connects a service's stdout and stderr to one journald stream and names it in
JOURNAL_STREAM (device:inode). Here the relay's output goes to real pipes, and
JOURNAL_STREAM names the pipe the way systemd names its socket, from fstat(): the relay
must tell from that alone where `<N>` priority prefixes belong. (Real journald, in a
booted container, is tested elsewhere.) Upstreams that refuse are ports bound and never
listening, held for the whole test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from splicerelay.relay.connector import CONNECT_WARNING_INTERVAL
from tests.support.harness import (
    STARTUP_TIMEOUT,
    free_port,
    parse_metrics,
    poll_until,
    relay_config,
)
from tests.support.logfmt import text_line_fields
from tests.support.scripted import bound_port, refusing_port

WAIT = 10.0  # bound on every wait for a line


class Lines:
    """Lines read from a pipe as they come, by a thread of their own."""

    def __init__(self, read_fd: int) -> None:
        self.lines: list[str] = []
        self._file: BinaryIO = os.fdopen(read_fd, "rb")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._file:
            for raw in self._file:
                self.lines.append(raw.decode().rstrip("\n"))

    def join(self) -> None:
        self._thread.join(timeout=WAIT)
        assert not self._thread.is_alive(), "the relay's output did not end"


class PipedRelay:
    """`splicerelay run` with stderr (and stdout: the same pipe if `shared`) on pipes.

    `journal`: "stderr" sets JOURNAL_STREAM to the stderr pipe's device:inode, "other"
    to a device:inode that is not it, None leaves it unset.
    """

    def __init__(self, tmp_path: Path, config_text: str, shared: bool, journal: str | None):
        self.metrics_port = free_port()
        config_path = tmp_path / "relay.yaml"
        config_path.write_text(config_text.replace("{metrics_port}", str(self.metrics_port)))
        err_read, err_write = os.pipe()
        out_read, out_write = (err_read, err_write) if shared else os.pipe()
        status = os.fstat(err_write)
        env = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
        if journal == "stderr":
            env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        elif journal == "other":
            env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino + 1}"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "splicerelay", "run", "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out_write,
                stderr=err_write,
                env=env,
            )
        finally:
            # The child has its own copies; ours would keep the pipes from ever ending.
            os.close(err_write)
            if not shared:
                os.close(out_write)
        self.stderr = Lines(err_read)
        self.stdout = self.stderr if shared else Lines(out_read)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"relay exited: {self.stderr.lines}")
            return any(
                '"message": "ready"' in line or " info ready" in line for line in self.stderr.lines
            )

        poll_until(ready, STARTUP_TIMEOUT, "the relay to log that it is ready")

    def metric(self, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return parse_metrics(text).get(name, 0.0, **labels)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0, self.stderr.lines
        self.stderr.join()
        self.stdout.join()


@pytest.fixture
def piped(tmp_path: Path) -> Iterator[list[PipedRelay]]:
    """Relays started by the test; any still running at the end is killed, by pid."""
    started: list[PipedRelay] = []
    yield started
    for relay in started:
        if relay.process.poll() is None:
            relay.process.kill()
            relay.process.wait(timeout=10)


def start(
    piped: list[PipedRelay],
    tmp_path: Path,
    config_text: str,
    *,
    shared: bool,
    journal: str | None,
) -> PipedRelay:
    relay = PipedRelay(tmp_path, config_text, shared, journal)
    piped.append(relay)
    relay.wait_ready()
    return relay


def connect_and_fail(port: int) -> None:
    """A client whose connection the relay closes because no upstream accepted."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        assert client.recv(1) == b""  # closed with a FIN, nothing relayed


def count_lines(lines: list[str], needle: str) -> int:
    return sum(needle in line for line in lines)


def priority(line: str) -> str:
    """The `<N>` a line starts with, or "" for none."""
    if line[:1] == "<" and line[2:3] == ">" and line[1:2].isdigit():
        return line[:3]
    return ""


@pytest.mark.parametrize("workers", [1, 2])
def test_refused_connects_are_journal_warnings_once_per_upstream_and_the_access_log_is_info(
    tmp_path: Path, piped: list[PipedRelay], workers: int
) -> None:
    """StandardOutput=journal and StandardError=journal: one stream for both."""
    failures = 40
    with refusing_port() as dead:
        upstream = f"127.0.0.1:{bound_port(dead)}"
        listen = free_port()
        config = f"workers: {workers}\n" + relay_config(listen, bound_port(dead))
        relay = start(piped, tmp_path, config, shared=True, journal="stderr")
        began = time.monotonic()
        for _ in range(failures):
            connect_and_fail(listen)
        elapsed = time.monotonic() - began
        poll_until(
            lambda: count_lines(relay.stdout.lines, '"message": "connection"') == failures,
            WAIT,
            "an access line for every connection",
        )
        # Rate limiting leaves the metrics alone: every failure is counted.
        counted = relay.metric(
            "splicerelay_upstream_connect_errors_total", route="test", reason="refused"
        )
        assert counted == failures
        relay.stop()
    lines = relay.stderr.lines
    # Every line, diagnostics and access log alike, carries a priority for journald.
    assert all(priority(line) for line in lines), [line for line in lines if not priority(line)]

    warnings = [line for line in lines if "upstream connect failed" in line]
    assert warnings and all(priority(line) == "<4>" for line in warnings)
    for line in warnings:
        entry = json.loads(line[3:])
        assert entry["level"] == "warning"
        assert (entry["route"], entry["upstream"], entry["reason"]) == ("test", upstream, "refused")
    # One warning per upstream per interval, in each process (each worker has its own).
    windows = 1 + int(elapsed // CONNECT_WARNING_INTERVAL)
    assert 1 <= len(warnings) <= windows * workers, (elapsed, warnings)
    assert json.loads(warnings[0][3:])["suppressed"] == 0

    access = [line for line in lines if '"message": "connection"' in line]
    assert len(access) == failures and all(priority(line) == "<6>" for line in access)
    for line in access:
        entry = json.loads(line[3:])
        # The access line names the upstream that was tried, though none was reached.
        assert (entry["outcome"], entry["upstream"]) == ("connect_failed", upstream)
    assert any(priority(line) == "<6>" and '"message": "ready"' in line for line in lines)


def test_the_next_warning_after_the_interval_counts_the_ones_held_back(
    tmp_path: Path, piped: list[PipedRelay]
) -> None:
    """Text format this time. The test takes one rate-limit interval: the count of the
    lines held back only comes with the next line.

    stdout and stderr share one pipe, as they share journald's stream, so the lines come
    in the order they were written: once a connection's access line is there, so is any
    warning its failure caused.
    """
    with refusing_port() as dead:
        upstream = f"127.0.0.1:{bound_port(dead)}"
        listen = free_port()
        config = relay_config(listen, bound_port(dead)).replace("format: json", "format: text")
        relay = start(piped, tmp_path, config, shared=True, journal="stderr")
        lines = relay.stderr.lines
        made = 0
        deadline = time.monotonic() + CONNECT_WARNING_INTERVAL + WAIT
        while count_lines(lines, "upstream connect failed") < 2:
            assert time.monotonic() < deadline, lines
            connect_and_fail(listen)
            made += 1
            poll_until(
                lambda made=made: count_lines(lines, " info connection ") == made,  # type: ignore[misc]
                WAIT,
                "the access line of the last connection",
            )
            time.sleep(0.25)  # pacing the clients: a few dozen over the interval
        relay.stop()
    first, second = [line for line in lines if "upstream connect failed" in line]
    for line in (first, second):
        assert priority(line) == "<4>"
        assert " warning upstream connect failed " in line
    fields = text_line_fields(first, "upstream connect failed")
    assert fields == {"route": "test", "upstream": upstream, "reason": "refused", "suppressed": "0"}
    fields = text_line_fields(second, "upstream connect failed")
    # The second warning came with the last client; all but the first and it were held.
    assert fields == {
        "route": "test",
        "upstream": upstream,
        "reason": "refused",
        "suppressed": str(made - 2),
    }
    access = [line for line in lines if " info connection " in line]
    assert len(access) == made and all(priority(line) == "<6>" for line in access)
    record = text_line_fields(access[0], "connection")
    assert (record["route"], record["upstream"], record["outcome"]) == (
        "test",
        upstream,
        "connect_failed",
    )


@pytest.mark.parametrize(
    ("journal", "shared", "prefixed"),
    [
        # StandardError=journal, StandardOutput=file:...: only stderr is the journal's.
        ("stderr", False, {"stderr"}),
        # Run by hand from a shell inside a unit: the variable is inherited, the streams
        # are elsewhere.
        ("other", True, set()),
        (None, True, set()),
    ],
)
def test_only_the_stream_journal_stream_names_gets_prefixes(
    tmp_path: Path, piped: list[PipedRelay], journal: str | None, shared: bool, prefixed: set[str]
) -> None:
    with refusing_port() as dead:
        listen = free_port()
        config = relay_config(listen, bound_port(dead))
        relay = start(piped, tmp_path, config, shared=shared, journal=journal)
        connect_and_fail(listen)
        poll_until(
            lambda: count_lines(relay.stdout.lines, '"message": "connection"') == 1,
            WAIT,
            "the access line",
        )
        relay.stop()
    warnings = [line for line in relay.stderr.lines if "upstream connect failed" in line]
    [warning] = warnings
    assert priority(warning) == ("<4>" if "stderr" in prefixed else "")
    for name, stream in (("stderr", relay.stderr), ("stdout", relay.stdout)):
        expected = "<" if name in prefixed else "{"
        assert stream.lines and all(line.startswith(expected) for line in stream.lines), (
            name,
            stream.lines,
        )
