"""What an operator set on upstreams through the supervisor, for workers started later.

Each worker keeps its own admin states (`set upstream ... state|weight`) in its
relay/admin_store.AdminStore, which keeps them across reloads while the route and
address stay in the config. A worker started after the command, to replace one that
died, knows nothing of it. So the supervisor keeps an AdminStore of its own, fed with
every such command that some worker applied: the same code, so the same rules (the last
setting naming a member wins; a reload that drops the route or address, or changes the
configured weight under an operator's weight, drops the setting). A new worker gets its
snapshot at start (contract.py) and, once it answers on its control socket, the same
settings again as commands (control.py), which change nothing where they already hold.

The store is read from the supervisor's loop (when it starts a worker) and written from
the control socket's thread, hence the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from splicerelay.config import Config
from splicerelay.protocol.control import AdminState, SetUpstreamState, SetUpstreamWeight
from splicerelay.relay.admin_store import AdminStore, Weight, address_of_label

AdminCommand = SetUpstreamState | SetUpstreamWeight

__all__ = ["AdminCommand", "AdminMemory", "Undo", "configured_weight"]


@dataclass(frozen=True)
class Undo:
    """The settings before and after one `remember`."""

    before: list[dict[str, object]]
    after: list[dict[str, object]]


def configured_weight(config: Config, route: str, address: str) -> int | None:
    """The weight `config` gives ADDRESS (configured, or one member's label) of `route`;
    None if the config has no such upstream."""
    for candidate in config.routes:
        if candidate.name != route:
            continue
        for upstream in candidate.upstreams:
            if str(upstream.address) == address_of_label(address):
                return upstream.weight
    return None


class AdminMemory:
    """The admin settings to give a new worker, as the workers' own store keeps them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._store = AdminStore()

    def __len__(self) -> int:
        with self._lock:
            return len(self._store)

    def snapshot(self) -> list[dict[str, object]]:
        """The settings as relay/admin.apply_admin_snapshot takes them."""
        with self._lock:
            return self._store.snapshot()

    def commands(self) -> list[AdminCommand]:
        """The settings as the commands that make them, in order.

        (`--kill-connections` is never among them: it acts on the connections open at
        the time, and a new worker has none of those.)"""
        commands: list[AdminCommand] = []
        for row in self.snapshot():
            route, address = str(row["route"]), str(row["address"])
            if "state" in row:
                commands.append(SetUpstreamState(route, address, AdminState(str(row["state"]))))
            else:
                weight = row["weight"]
                assert isinstance(weight, int)
                commands.append(SetUpstreamWeight(route, address, weight))
        return commands

    def remember(self, command: AdminCommand, config: Config) -> Undo | None:
        """Keep `command` (`config`: what the workers run). Returns what to give
        `restore` to undo it, or None when it names nothing in `config` (then it is not
        kept: the workers refuse it too)."""
        setting: AdminState | Weight
        if isinstance(command, SetUpstreamState):
            if configured_weight(config, command.route, command.address) is None:
                return None
            setting = command.state
        else:
            configured = configured_weight(config, command.route, command.address)
            if configured is None:
                return None
            setting = Weight(command.weight, configured)
        with self._lock:
            before = self._store.snapshot()
            self._store.record(command.route, command.address, setting)
            return Undo(before, self._store.snapshot())

    def restore(self, undo: Undo) -> None:
        """Go back to the settings before `remember`: no worker applied the command.

        Only if nothing was remembered since: a later command that some worker applied
        must stay (and it was made on top of this one, which no worker holds anyway)."""
        store = AdminStore()
        store.load(undo.before)
        with self._lock:
            if self._store.snapshot() == undo.after:
                self._store = store

    def prune(self, config: Config) -> list[tuple[str, str]]:
        """Forget what `config` no longer has, as a worker's reload does; returns the
        (route, address) pairs dropped."""
        with self._lock:
            return self._store.prune(config)
