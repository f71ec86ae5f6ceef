"""Starting a worker process, and the private directory the processes share."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping

from splicerelay.ops.service import RunOptions
from splicerelay.workers.contract import WORKER_ENV, WorkerSetup, encode

# The environment a worker must not inherit: socket activation is the supervisor's (the
# worker gets its sockets through WORKER_ENV), and so is systemd's watchdog.
NOT_FOR_WORKERS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


def runtime_directory() -> str:
    """A private directory for the snapshot and the sockets between the processes.

    Under systemd's RUNTIME_DIRECTORY when the unit has one, else the temp directory.
    Why 0700 (mkdtemp's mode): whoever can reach the notify socket could claim a worker
    is ready, and whoever can reach a worker's socket could read its metrics.
    """
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    return tempfile.mkdtemp(prefix="splicerelay-", dir=base)


def worker_environment(
    environ: Mapping[str, str], setup: WorkerSetup, notify_path: str, watchdog: float
) -> dict[str, str]:
    """The environment of a worker: the supervisor's, less NOT_FOR_WORKERS, plus its
    setup, the supervisor's notify socket and the hung-worker watchdog."""
    environment = {key: value for key, value in environ.items() if key not in NOT_FOR_WORKERS}
    environment[WORKER_ENV] = encode(setup)
    environment["NOTIFY_SOCKET"] = notify_path
    if watchdog:
        # The worker's own sd_notify code then sends WATCHDOG=1 at half of this.
        environment["WATCHDOG_USEC"] = str(int(watchdog * 1e6))
    return environment


def worker_command(options: RunOptions, snapshot: str) -> list[str]:
    """`splicerelay run -c SNAPSHOT`, with the command line's log overrides."""
    command = [sys.executable, "-m", "splicerelay", "run", "-c", snapshot]
    if options.log_level:
        command += ["--log-level", options.log_level]
    if options.log_format:
        command += ["--log-format", options.log_format]
    return command


def start_worker(
    command: list[str], environment: dict[str, str], setup: WorkerSetup
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        env=environment,
        stdin=subprocess.DEVNULL,
        # Why pass_fds: every descriptor the supervisor opens is close-on-exec (Python's
        # default), and Popen closes all the others in the child; only the listeners
        # are meant to cross into the worker, at the numbers WORKER_ENV lists.
        pass_fds=[item.fd for item in setup.sockets],
        # Why a process group of its own: Ctrl-C in a terminal signals the whole
        # foreground group; the workers must hear SIGINT once, from the supervisor,
        # or the forwarded copy would look like a second one.
        process_group=0,
    )
