"""The supervisor's reloads, besides the rounds (reload_rounds.py) and the signals to the
workers (pool.py): which config file text a reload may go ahead with, and what is said
of each reload: the counts its metrics export, `show info`'s last reload, the log lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from splicerelay.config import Config, read_config
from splicerelay.config.addresses import ListenAddress, UnixAddress
from splicerelay.datapath.stats import ReloadRecord
from splicerelay.ops.service import log_reload_refused, warn_restart_only_changes
from splicerelay.workers.control_link import reload_record, text_sha256
from splicerelay.workers.reload_rounds import RoundOutcome

log = logging.getLogger("splicerelay")


@dataclass(frozen=True)
class Snapshot:
    """A config the supervisor accepted, and the text the workers load it from."""

    config: Config
    text: str
    loaded_at: float = field(default_factory=time.time)  # unix time it was accepted

    @cached_property
    def sha256(self) -> str:
        return text_sha256(self.text)


class ReloadRefused(Exception):
    """A reload the supervisor refuses before any worker sees it; str() says why."""


def new_unix_listener(config: Config, addresses: Collection[ListenAddress]) -> str | None:
    """Why a reload to `config` cannot happen with workers, or None.

    Why: a TCP listener that a reload adds is bound by every worker with SO_REUSEPORT,
    but a unix socket path can be bound only once, so workers cannot share a new one.
    """
    for route in config.routes:
        if isinstance(route.listen, UnixAddress) and route.listen not in addresses:
            return (
                f"route {route.name}: a new unix socket listener"
                f" ({route.listen}) needs a restart when workers > 1"
            )
    return None


def read_reload(path: str, running: Config, addresses: Collection[ListenAddress]) -> Snapshot:
    """The config file at `path`, read for a reload from `running` (the supervisor holds
    the listeners at `addresses`), with a warning for each change that waits for a
    restart. Raises ConfigError, or ReloadRefused."""
    config, text = read_config(path)
    refusal = new_unix_listener(config, addresses)
    if refusal is not None:
        raise ReloadRefused(refusal)
    warn_restart_only_changes(running, config, ("metrics", "workers"))
    if config.control != running.control:
        log.warning("control.socket changed: it takes effect at the next restart")
    return Snapshot(config, text)


class ReloadHistory:
    """What the supervisor says of its reloads, as each one is refused or ends."""

    def __init__(self) -> None:
        self.record = ReloadRecord()  # the counts of splicerelay_config_reloads_total
        # `show info`'s last reload: {"result": "ok"|"refused", "time", "trigger", "error"}
        self.last: dict[str, object] | None = None
        self._triggers: dict[int, str] = {}  # reload round -> what asked for it

    def started(self, number: int, trigger: str) -> None:
        """Round `number` started; `trigger` asked for it."""
        self._triggers[number] = trigger

    def refused(self, trigger: str, error: Exception) -> None:
        """The supervisor refused a reload before any worker saw it."""
        self.record.record("failure")
        self.last = reload_record(trigger, str(error))
        log_reload_refused(trigger, error)

    def ended(self, outcome: RoundOutcome[Any]) -> None:
        """A round ended: count it, remember it, and log what went wrong."""
        if outcome.timed_out:
            log.warning(
                "workers did not report a reload in time",
                extra={"fields": {"workers": list(outcome.timed_out)}},
            )
        self.record.record(outcome.result)
        trigger = self._triggers.pop(outcome.number, "reload")
        self.last = reload_record(trigger, None)
        if outcome.result == "failure":
            self.last = reload_record(
                trigger,
                "every worker refused the new config"
                if outcome.refused_by_all
                else "the new config is not live in every worker",
            )
            log.error(
                "reload failed in every worker; the running config stays"
                if outcome.refused_by_all
                else "reload failed in some workers; see their log lines",
                extra={"fields": {"workers": list(outcome.failed)}},
            )
