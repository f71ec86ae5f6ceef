"""Starting a worker process: its command line, its environment and its descriptors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

from splicerelay.ops.service import RunOptions
from splicerelay.workers.contract import WORKER_ENV, WorkerSetup, encode
from splicerelay.workers.rendezvous import for_environment

# The environment a worker must not inherit: socket activation is the supervisor's (the
# worker gets its sockets through WORKER_ENV), and so is systemd's watchdog.
NOT_FOR_WORKERS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


def worker_environment(
    environ: Mapping[str, str], setup: WorkerSetup, notify_address: str, watchdog: float
) -> dict[str, str]:
    """The environment of a worker: the supervisor's, less NOT_FOR_WORKERS, plus its
    setup, the supervisor's notify socket and the hung-worker watchdog."""
    environment = {key: value for key, value in environ.items() if key not in NOT_FOR_WORKERS}
    environment[WORKER_ENV] = encode(setup)
    environment["NOTIFY_SOCKET"] = for_environment(notify_address)
    if watchdog:
        # The worker's own sd_notify code then sends WATCHDOG=1 at half of this.
        environment["WATCHDOG_USEC"] = str(int(watchdog * 1e6))
    return environment


def worker_command(options: RunOptions, config_path: str) -> list[str]:
    """`splicerelay run -c CONFIG_PATH`, with the command line's log overrides."""
    command = [sys.executable, "-m", "splicerelay", "run", "-c", config_path]
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
        # and its config's memfd are meant to cross into the worker, at the numbers
        # WORKER_ENV lists.
        pass_fds=[setup.config_fd, *(item.fd for item in setup.sockets)],
        # Why a process group of its own: Ctrl-C in a terminal signals the whole
        # foreground group; the workers must hear SIGINT once, from the supervisor,
        # or the forwarded copy would look like a second one.
        process_group=0,
    )
