"""What a running relay says about itself, shared by the single process and the supervisor.

Both kinds of process tell the service manager how many connections they hold, watch the
config file when asked to, and log a refused reload the same way; this module is the one
place that says how.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from splicerelay.config import Config, ConfigError, file_identity
from splicerelay.config.addresses import Address
from splicerelay.ops import logs

log = logging.getLogger("splicerelay")

WATCH_INTERVAL = 1.0  # seconds between looks at the config file with --watch
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to the service manager


@dataclass(frozen=True)
class RunOptions:
    """What the command line asked of `splicerelay run`, beyond the config itself."""

    config_path: str | None = None  # None: a one-off relay from --listen/--upstream
    watch: bool = False  # reload when the config file changes
    log_level: str | None = None  # overrides log.level
    log_format: str | None = None  # overrides log.format
    metrics_address: Address | None = None  # where /metrics is served, if anywhere


def configure_logs(options: RunOptions, config: Config, worker: int | None = None) -> None:
    """Logging as the config says, with the command line's overrides on top; `worker`
    is the slot of a worker process, for its access lines."""
    logs.configure(
        options.log_level or config.log.level,
        options.log_format or config.log.format,
        config.log.access_log,
        worker=worker,
    )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def status_line(connections: int, workers: int | None = None) -> str:
    """The STATUS= text: "3 connections", or "3 connections in 2 workers"."""
    line = plural(connections, "connection")
    return line if workers is None else f"{line} in {plural(workers, 'worker')}"


class FileWatch:
    """Tells when a config file has changed since the last look.

    It compares the file's identity (device, inode, size, mtime), so that it also sees a
    Kubernetes ConfigMap update, which swaps a symlink rather than writing the file. A
    file that has gone missing is not a change: the next version is waited for.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen = file_identity(path)

    def changed(self) -> bool:
        current = file_identity(self.path)
        if current is None or current == self._seen:
            return False
        self._seen = current
        return True


def log_reload_refused(reason: str, error: Exception | str) -> None:
    """One error line for a reload that did not happen: the running config stays."""
    if isinstance(error, ConfigError):
        log.error(
            "reload failed: invalid config; the running config stays",
            extra={"fields": {"reason": reason, "errors": error.errors}},
        )
    else:
        log.error(
            "reload failed; the running config stays",
            extra={"fields": {"reason": reason, "error": str(error)}},
        )


def warn_restart_only_changes(old: Config, new: Config, keys: Sequence[str]) -> None:
    """Warn about settings a reload cannot change in a running process."""
    if "metrics" in keys and new.metrics != old.metrics:
        log.warning("metrics.listen changed: it takes effect at the next restart")
    if "workers" in keys and new.workers != old.workers:
        log.warning("workers changed: it takes effect at the next restart")
