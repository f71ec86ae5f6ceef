"""The control protocol's commands as data: one frozen dataclass per command, and `Command`.

Each dataclass checks its own fields, so a command built in code (by `ctl`, a test or
the supervisor) is one that `parse_command` could have read. Also here: `AdminState`,
the bounds on the numbers a command carries, and the two errors a command can end in.
The protocol itself (what each command does, lines and replies) is described at the
top of control.py, which parses and formats these commands (and re-exports every name
here); replies are control_reply.py's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_CONNECTION_ID",
    "MAX_LIST_LIMIT",
    "MAX_SLOT",
    "MAX_WEIGHT",
    "MIN_WEIGHT",
    "AdminState",
    "Command",
    "CommandError",
    "CommandFailed",
    "Help",
    "KillConnection",
    "Reload",
    "SetUpstreamState",
    "SetUpstreamWeight",
    "ShowConnections",
    "ShowInfo",
    "ShowRoutes",
    "ShowUpstreams",
    "quote_word",
]

# The bounds of an upstream's weight. They are config.model's MIN/MAX too (the config
# layer and this one may not import each other; a unit test checks that they agree).
# The balancer takes positive weights only: weight 0 would mean "no new connections",
# which `state drain` already says.
MIN_WEIGHT: Final = 1
MAX_WEIGHT: Final = 1000
# `show connections --limit N`: at least one, and no more than a relay could hold.
MAX_LIST_LIMIT: Final = 10_000_000
MAX_CONNECTION_ID: Final = (1 << 63) - 1
# A worker's slot in `kill connection SLOT:ID`: 0 .. workers-1, and workers is at most
# config.model's MAX_WORKERS (1024); the bound here only keeps the number small.
MAX_SLOT: Final = 1 << 16

_QUOTE_MAX = 60


class CommandError(ValueError):
    """A line that is not a command; the message says why, for the person who typed it."""


class CommandFailed(Exception):
    """A command's handler refusing it (an unknown route, say): an error reply, not a bug.

    `data`, if given, goes into the reply beside the message."""

    def __init__(self, message: str, data: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class AdminState(enum.StrEnum):
    """What an operator set on an upstream (HAProxy's READY, DRAIN and MAINT)."""

    READY = "ready"  # takes new connections
    DRAIN = "drain"  # no new connections; open ones go on
    MAINT = "maint"  # drain, and no health checks either


def _check_word(value: object, what: str) -> str:
    """`value` as a word the parser could have read: printable, without spaces, not an option."""
    if not isinstance(value, str) or not value:
        raise CommandError(f"{what} must be a non-empty word")
    for ch in value:
        if ch.isspace() or not ch.isprintable():
            raise CommandError(
                f"{what} {quote_word(value)} holds a space or an invisible character"
            )
    if value.startswith("--"):
        raise CommandError(f"{what} {quote_word(value)} starts with '--', which marks an option")
    return value


def _check_int(value: object, what: str, low: int, high: int) -> int:
    # bool is an int to Python, but True is not a weight.
    if type(value) is not int or not low <= value <= high:
        raise CommandError(f"{what} must be a whole number from {low} to {high}")
    return value


@dataclass(frozen=True)
class Help:
    """`help`"""


@dataclass(frozen=True)
class ShowInfo:
    """`show info`"""


@dataclass(frozen=True)
class ShowRoutes:
    """`show routes`"""


@dataclass(frozen=True)
class ShowUpstreams:
    """`show upstreams [ROUTE]`: every route's upstreams, or one route's."""

    route: str | None = None

    def __post_init__(self) -> None:
        if self.route is not None:
            _check_word(self.route, "ROUTE")


@dataclass(frozen=True)
class ShowConnections:
    """`show connections [ROUTE] [--limit N]`"""

    route: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.route is not None:
            _check_word(self.route, "ROUTE")
        if self.limit is not None:
            _check_int(self.limit, "N", 1, MAX_LIST_LIMIT)


@dataclass(frozen=True)
class SetUpstreamState:
    """`set upstream ROUTE ADDRESS state ready|drain|maint [--kill-connections]`"""

    route: str
    address: str
    state: AdminState
    kill_connections: bool = False

    def __post_init__(self) -> None:
        _check_word(self.route, "ROUTE")
        _check_word(self.address, "ADDRESS")
        try:
            state = AdminState(self.state)
        except ValueError:
            raise CommandError(
                f"unknown state {quote_word(str(self.state))} (ready, drain or maint)"
            ) from None
        object.__setattr__(self, "state", state)
        if not isinstance(self.kill_connections, bool):
            raise CommandError("kill_connections must be true or false")
        if self.kill_connections and state is not AdminState.MAINT:
            raise CommandError("--kill-connections goes with state maint only")


@dataclass(frozen=True)
class SetUpstreamWeight:
    """`set upstream ROUTE ADDRESS weight N`"""

    route: str
    address: str
    weight: int

    def __post_init__(self) -> None:
        _check_word(self.route, "ROUTE")
        _check_word(self.address, "ADDRESS")
        _check_int(self.weight, "the weight", MIN_WEIGHT, MAX_WEIGHT)


@dataclass(frozen=True)
class KillConnection:
    """`kill connection ID`, ID being `NUMBER` or, with workers, `SLOT:NUMBER`.

    `slot` is None for a plain number (a relay without workers); with workers, each
    worker numbers its own connections, so the slot says whose number it is."""

    id: int
    slot: int | None = None

    def __post_init__(self) -> None:
        _check_int(self.id, "ID", 0, MAX_CONNECTION_ID)
        if self.slot is not None:
            _check_int(self.slot, "SLOT", 0, MAX_SLOT)

    @property
    def label(self) -> str:
        """The ID as `show connections` prints it and the command line takes it."""
        return str(self.id) if self.slot is None else f"{self.slot}:{self.id}"


@dataclass(frozen=True)
class Reload:
    """`reload`"""


Command = (
    Help
    | ShowInfo
    | ShowRoutes
    | ShowUpstreams
    | ShowConnections
    | SetUpstreamState
    | SetUpstreamWeight
    | KillConnection
    | Reload
)


def quote_word(word: str) -> str:
    """`word` quoted for an error message, cut short if it is long."""
    if len(word) > _QUOTE_MAX:
        word = word[:_QUOTE_MAX] + "..."
    return repr(word)
