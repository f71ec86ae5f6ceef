"""The control socket's protocol: one command per line, one JSON reply per command.

Like HAProxy's runtime API it is plain text over a unix stream socket, small enough to
drive by hand with `socat` or `nc -U`:

    $ echo 'show upstreams web' | socat - UNIX-CONNECT:/run/splicerelay/control.sock
    {"ok":true,"data":[...]}
    $ echo 'set upstream web 10.0.0.2:8000 state drain' | nc -U /run/splicerelay/control.sock
    {"ok":true,"data":...}

**Commands.**

- `help`: the commands, with a line on each.
- `show info`: version, pid, uptime, workers, the config file, its sha256 and when it
  was loaded, and the last reload's result.
- `show routes`: the routes.
- `show upstreams [ROUTE]`: each upstream's address, resolved address, weight, admin
  state, health state and last check, active connections and connect errors.
- `show connections [ROUTE] [--limit N]`: each connection's id, route, client,
  upstream, age, idle time and bytes each way.
- `set upstream ROUTE ADDRESS state ready|drain|maint [--kill-connections]`: `ready`
  takes new connections; `drain` takes no new ones and lets open ones go on; `maint`
  drains and stops health checks too, and with `--kill-connections` (maint only) also
  closes the upstream's open connections.
- `set upstream ROUTE ADDRESS weight N`: N from 1 to 1000. (To stop new connections,
  use `state drain`.)
- `kill connection ID`: close one connection; ID as `show connections` shows it: a
  number, or `SLOT:NUMBER` when the relay runs workers (the worker's slot, then the
  connection's number within that worker).
- `reload`: load the config file again, as SIGHUP does, and answer how it went.

ROUTE and ADDRESS are written as `show routes` and `show upstreams` print them.

**Lines.** A command is one line of UTF-8 text of at most 4096 bytes, counting the
`\\n` that ends it; `\\r\\n` is accepted too. Words are separated by spaces or tabs.
Command words are lowercase. Control characters and other invisible characters are
refused. A word that starts with `--` is always an option, so a ROUTE or ADDRESS cannot
start with `--`. Input that ends without a final `\\n` is taken as one last command,
so `printf 'show info' | nc -U ...` works.

**Replies.** Every line gets exactly one reply, in the order sent, a blank line included
(it is an error: "empty command"). A client may therefore send several commands at once
and match the replies by counting lines. A reply is one line of compact JSON, ASCII only,
ending in `\\n`:

- `{"ok":true,"data":...}`: the command did what it says; `data` is its answer.
- `{"ok":false,"error":"..."}`: it did not; `error` says why, for a person. A failure
  may carry `data` too, e.g. which workers applied a change and which did not.

Readers should ignore keys they do not know.

**Limits.** Only the relay's own user and root may connect: the socket file has mode
0600, and every connection's peer is checked with `SO_PEERCRED`; any other user gets an
error reply and is disconnected before anything it sent is read. A line over 4096 bytes
gets an error reply, then the connection is closed. So does a client that takes longer
than 10 seconds to send a complete line (the first one, or the next after a reply), and
one that does not read its replies for 10 seconds is disconnected. At most 16 clients are
served at a time; the next one gets `{"ok":false,"error":"busy: ..."}` and is closed at
once, so try again. Malformed commands get an error reply and the connection stays usable.

Nothing here touches a socket: `parse_command` reads one line and `format_command`
writes one, and `HELP` is what `help` answers. The commands as data (`Command`, one
dataclass each, with `AdminState` and the bounds on their numbers) are in
control_command.py; `encode_reply` and `decode_reply` (from control_reply.py) read and
write replies. This module re-exports both modules' public names, so importing from here
is enough. The socket, its limits and its timeouts are relay/control_socket.py's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

from splicerelay.protocol.control_command import (
    MAX_CONNECTION_ID,
    MAX_LIST_LIMIT,
    MAX_SLOT,
    MAX_WEIGHT,
    MIN_WEIGHT,
    AdminState,
    Command,
    CommandError,
    CommandFailed,
    Help,
    KillConnection,
    Reload,
    SetUpstreamState,
    SetUpstreamWeight,
    ShowConnections,
    ShowInfo,
    ShowRoutes,
    ShowUpstreams,
    quote_word,
)
from splicerelay.protocol.control_reply import (
    MAX_REPLY_LENGTH,
    Reply,
    ReplyError,
    decode_reply,
    encode_reply,
    error_reply,
    ok_reply,
)

__all__ = [
    "COMMAND_NAMES",
    "HELP",
    "MAX_CONNECTION_ID",
    "MAX_LINE_LENGTH",
    "MAX_LIST_LIMIT",
    "MAX_REPLY_LENGTH",
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
    "Reply",
    "ReplyError",
    "SetUpstreamState",
    "SetUpstreamWeight",
    "ShowConnections",
    "ShowInfo",
    "ShowRoutes",
    "ShowUpstreams",
    "decode_reply",
    "encode_reply",
    "error_reply",
    "format_command",
    "ok_reply",
    "parse_command",
    "usage_of",
]

# One command line, counting its "\n". HAProxy's CLI reads into a buffer of about this
# size; a longer line cannot be a command and bounds what a client can make us hold.
MAX_LINE_LENGTH: Final = 4096

_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)

_USAGE: Final[dict[type[Any], str]] = {
    Help: "help",
    ShowInfo: "show info",
    ShowRoutes: "show routes",
    ShowUpstreams: "show upstreams [ROUTE]",
    ShowConnections: "show connections [ROUTE] [--limit N]",
    SetUpstreamState: "set upstream ROUTE ADDRESS state ready|drain|maint [--kill-connections]",
    SetUpstreamWeight: f"set upstream ROUTE ADDRESS weight N ({MIN_WEIGHT} to {MAX_WEIGHT})",
    KillConnection: "kill connection ID",
    Reload: "reload",
}
_SAYS: Final[dict[type[Any], str]] = {
    Help: "the commands, with a line on each",
    ShowInfo: "version, pid, uptime, workers, the config file and the last reload",
    ShowRoutes: "the routes",
    ShowUpstreams: "each upstream: weight, admin and health state, connections, errors",
    ShowConnections: "each connection: id, route, client, upstream, age, idle, bytes",
    SetUpstreamState: (
        "ready: takes connections; drain: no new ones, open ones go on; maint: drain"
        " and no health checks (--kill-connections closes its connections)"
    ),
    SetUpstreamWeight: "its share of new connections",
    KillConnection: "close one connection",
    Reload: "load the config file again and say how it went",
}
# What `help` answers: the usage of every command and a line on what it does.
HELP: Final[tuple[dict[str, str], ...]] = tuple(
    {"command": usage, "does": _SAYS[kind]} for kind, usage in _USAGE.items()
)
COMMAND_NAMES: Final = (
    "help",
    "show info",
    "show routes",
    "show upstreams",
    "show connections",
    "set upstream",
    "kill connection",
    "reload",
)


def usage_of(kind: type[Any]) -> str:
    """The usage line of a command class, e.g. `show upstreams [ROUTE]`."""
    return _USAGE[kind]


# -- parsing ----------------------------------------------------------------------------


def parse_command(line: bytes) -> Command:
    """The command on one line (its `\\n` or `\\r\\n` may be there or not).

    Raises CommandError, and nothing else, for any bytes that are not a command."""
    words = _words(line)
    verb, rest = words[0], words[1:]
    if verb in ("show", "set", "kill") and not rest:
        raise CommandError(f"incomplete command {quote_word(verb)}; usage: {_usages_of(verb)}")
    name = f"{verb} {rest[0]}" if verb in ("show", "set", "kill") else verb
    parse = _PARSERS.get(name)
    if parse is None:
        raise CommandError(
            f"unknown command {quote_word(name)}; the commands are: {', '.join(COMMAND_NAMES)}"
            " (send 'help' for their usage)"
        )
    return parse(rest[1:] if " " in name else rest)


def _words(line: bytes) -> list[str]:
    if len(line) > MAX_LINE_LENGTH:
        raise CommandError(f"line too long: more than {MAX_LINE_LENGTH} bytes")
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("the line is not UTF-8 text") from None
    for column, ch in enumerate(text, 1):
        # Why so strict: words end up in replies and logs, and an invisible or control
        # character there (an escape sequence, a right-to-left mark) could mislead the
        # person reading them.
        if ch != "\t" and not ch.isprintable():
            raise CommandError(
                f"character {ch!r} at column {column} is not allowed (one command per line,"
                " printable text)"
            )
    # After the check above the only whitespace left is spaces and tabs.
    words = text.split()
    if not words:
        raise CommandError("empty command; send 'help' for the commands")
    return words


def _usages_of(verb: str) -> str:
    return " | ".join(usage for kind, usage in _USAGE.items() if usage.split()[0] == verb)


class _Words:
    """The words after a command's name: positional ones and options, read once."""

    def __init__(self, words: Sequence[str], usage: str, options: dict[str, bool]) -> None:
        """`options`: each option this command takes, and whether it takes a value."""
        self.usage = usage
        self.positional: list[str] = []
        self.options: dict[str, str | None] = {}
        items = iter(words)
        for word in items:
            if not word.startswith("--"):
                self.positional.append(word)
                continue
            name, equals, value = word.partition("=")
            if name not in options:
                self.fail(f"unknown option {quote_word(name)}")
            if name in self.options:
                self.fail(f"{name} given twice")
            if options[name]:
                if not equals:
                    value = next(items, "")
                if not value or value.startswith("--"):
                    self.fail(f"{name} needs a value")
                self.options[name] = value
            elif equals:
                self.fail(f"{name} takes no value")
            else:
                self.options[name] = None

    def fail(self, problem: str) -> NoReturn:
        raise CommandError(f"{problem}; usage: {self.usage}")

    def expect(self, low: int, high: int) -> list[str]:
        """The positional words, when there are from `low` to `high` of them."""
        count = len(self.positional)
        if count < low:
            self.fail("missing arguments")
        if count > high:
            self.fail(f"unexpected {quote_word(self.positional[high])}")
        return self.positional + [""] * (high - count)

    def integer(self, word: str, what: str, low: int, high: int) -> int:
        if not _DIGITS.fullmatch(word) or not low <= int(word) <= high:
            self.fail(f"{what} must be a whole number from {low} to {high}, not {quote_word(word)}")
        return int(word)


def _build(usage: str, make: Callable[[], Command]) -> Command:
    """Build a command; a field that the dataclass refuses gets the usage too."""
    try:
        return make()
    except CommandError as error:
        raise CommandError(f"{error}; usage: {usage}") from None


def _no_arguments(
    kind: type[Help | ShowInfo | ShowRoutes | Reload],
) -> Callable[[Sequence[str]], Command]:
    def parse(words: Sequence[str]) -> Command:
        _Words(words, _USAGE[kind], {}).expect(0, 0)
        return kind()

    return parse


def _show_upstreams(words: Sequence[str]) -> Command:
    usage = _USAGE[ShowUpstreams]
    [route] = _Words(words, usage, {}).expect(0, 1)
    return _build(usage, lambda: ShowUpstreams(route or None))


def _show_connections(words: Sequence[str]) -> Command:
    usage = _USAGE[ShowConnections]
    parsed = _Words(words, usage, {"--limit": True})
    [route] = parsed.expect(0, 1)
    text = parsed.options.get("--limit")
    limit = None if text is None else parsed.integer(text, "N", 1, MAX_LIST_LIMIT)
    return _build(usage, lambda: ShowConnections(route or None, limit))


def _set_upstream(words: Sequence[str]) -> Command:
    usage = _usages_of("set")
    parsed = _Words(words, usage, {"--kill-connections": False})
    route, address, what, value = parsed.expect(4, 4)
    kill = "--kill-connections" in parsed.options
    if what == "state":
        usage = _USAGE[SetUpstreamState]
        if value not in tuple(AdminState):
            raise CommandError(f"unknown state {quote_word(value)}; usage: {usage}")
        return _build(usage, lambda: SetUpstreamState(route, address, AdminState(value), kill))
    if what == "weight":
        usage = _USAGE[SetUpstreamWeight]
        if kill:
            raise CommandError(f"--kill-connections goes with state maint only; usage: {usage}")
        weight = _Words([], usage, {}).integer(value, "the weight", MIN_WEIGHT, MAX_WEIGHT)
        return _build(usage, lambda: SetUpstreamWeight(route, address, weight))
    raise CommandError(f"expected 'state' or 'weight', not {quote_word(what)}; usage: {usage}")


def _kill_connection(words: Sequence[str]) -> Command:
    usage = _USAGE[KillConnection]
    parsed = _Words(words, usage, {})
    [word] = parsed.expect(1, 1)
    slot_word, colon, number = word.rpartition(":")
    if not colon:
        return KillConnection(parsed.integer(word, "ID", 0, MAX_CONNECTION_ID))
    if not _DIGITS.fullmatch(slot_word) or not _DIGITS.fullmatch(number):
        parsed.fail(f"ID must be a number or SLOT:NUMBER, not {quote_word(word)}")
    slot = parsed.integer(slot_word, "SLOT", 0, MAX_SLOT)
    return KillConnection(parsed.integer(number, "ID", 0, MAX_CONNECTION_ID), slot)


_PARSERS: Final[dict[str, Callable[[Sequence[str]], Command]]] = {
    "help": _no_arguments(Help),
    "show info": _no_arguments(ShowInfo),
    "show routes": _no_arguments(ShowRoutes),
    "show upstreams": _show_upstreams,
    "show connections": _show_connections,
    "set upstream": _set_upstream,
    "kill connection": _kill_connection,
    "reload": _no_arguments(Reload),
}


def format_command(command: Command) -> str:
    """The line that `parse_command` reads back as `command`, without its `\\n`."""
    match command:
        case Help():
            return "help"
        case ShowInfo():
            return "show info"
        case ShowRoutes():
            return "show routes"
        case ShowUpstreams(route=route):
            return " ".join(["show upstreams", *([route] if route is not None else [])])
        case ShowConnections(route=route, limit=limit):
            words = ["show connections"]
            if route is not None:
                words.append(route)
            if limit is not None:
                words += ["--limit", str(limit)]
            return " ".join(words)
        case SetUpstreamState(route=route, address=address, state=state, kill_connections=kill):
            line = f"set upstream {route} {address} state {state.value}"
            return line + " --kill-connections" if kill else line
        case SetUpstreamWeight(route=route, address=address, weight=weight):
            return f"set upstream {route} {address} weight {weight}"
        case KillConnection() as kill:
            return f"kill connection {kill.label}"
        case Reload():
            return "reload"
