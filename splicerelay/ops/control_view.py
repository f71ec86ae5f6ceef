"""Control socket replies for people: what `splicerelay ctl` prints without `--json`.

Tables with aligned columns for `show routes|upstreams|connections`, `key: value` lines
for `show info`, one line for `set`, `kill` and `reload`. Pure: data in, text out. A
reply of a shape not foreseen here (a newer relay's, say) is printed as indented JSON
rather than half understood.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from splicerelay.protocol.control import (
    Command,
    Help,
    KillConnection,
    Reload,
    SetUpstreamState,
    SetUpstreamWeight,
    ShowConnections,
    ShowInfo,
    ShowRoutes,
    ShowUpstreams,
)

__all__ = ["render", "render_reload", "render_table", "seconds_text", "size_text"]

Row = Mapping[str, Any]
Column = tuple[str, Callable[[Row], str]]

EMPTY: Final = "-"


def size_text(count: object) -> str:
    """A byte count for people: 512 B, 1.5 KiB, 20.0 MiB."""
    if not isinstance(count, int | float) or isinstance(count, bool):
        return _text(count)
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def seconds_text(seconds: object) -> str:
    """A duration for people: 0.4s, 12s, 5m03s, 2h10m, 3d04h."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return _text(seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _text(value: object) -> str:
    if value is None:
        return EMPTY
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value or EMPTY
    if isinstance(value, Mapping):
        return ", ".join(f"{key} {_text(item)}" for key, item in value.items()) or EMPTY
    if isinstance(value, list | tuple):
        return ", ".join(_text(item) for item in value) or EMPTY
    return str(value)


def _field(*keys: str, show: Callable[[object], str] = _text) -> Callable[[Row], str]:
    """The first of `keys` that the row has, shown with `show`."""

    def get(row: Row) -> str:
        for key in keys:
            if key in row:
                return show(row[key])
        return EMPTY

    return get


def render_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """Aligned columns under a header; the last column is not padded."""
    cells = [[header for header, _ in columns]]
    cells += [[show(row) for _, show in columns] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    lines = []
    for line in cells:
        padded = [cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=False)]
        lines.append("  ".join([*padded, line[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def _limits(limits: object) -> str:
    if not isinstance(limits, Mapping):
        return _text(limits)
    parts = [f"{_text(limits.get('max_connections'))} conns"]
    if limits.get("max_connections_per_source") is not None:
        parts.append(f"{_text(limits['max_connections_per_source'])}/source")
    if limits.get("connect_timeout_seconds") is not None:
        parts.append(f"connect {seconds_text(limits['connect_timeout_seconds'])}")
    if limits.get("idle_timeout_seconds") is not None:
        parts.append(f"idle {seconds_text(limits['idle_timeout_seconds'])}")
    if limits.get("max_duration_seconds") is not None:
        parts.append(f"max {seconds_text(limits['max_duration_seconds'])}")
    return ", ".join(parts)


ROUTE_COLUMNS: Final[tuple[Column, ...]] = (
    ("NAME", _field("name", "route")),
    ("LISTEN", _field("listen")),
    ("BALANCE", _field("balance")),
    ("UPSTREAMS", _field("upstreams")),
    ("ACTIVE", _field("active_connections")),
    ("LIMITS", _field("limits", show=_limits)),
)
UPSTREAM_COLUMNS: Final[tuple[Column, ...]] = (
    ("ROUTE", _field("route")),
    ("UPSTREAM", _field("upstream", "address")),
    ("RESOLVED", _field("resolved")),
    ("WEIGHT", _field("weight")),
    ("ADMIN", _field("admin_state")),
    ("HEALTH", _field("health")),
    ("LAST CHECK", _field("last_check")),
    ("ACTIVE", _field("active", "active_connections")),
    ("CONNECT ERRORS", _field("connect_errors")),
)
CONNECTION_COLUMNS: Final[tuple[Column, ...]] = (
    ("ID", _field("id")),
    ("ROUTE", _field("route")),
    ("CLIENT", _field("client")),
    ("UPSTREAM", _field("upstream")),
    ("STATE", _field("state")),
    ("AGE", _field("age_seconds", show=seconds_text)),
    ("IDLE", _field("idle_seconds", show=seconds_text)),
    ("IN", _field("bytes_in", show=size_text)),
    ("OUT", _field("bytes_out", show=size_text)),
)
HELP_COLUMNS: Final[tuple[Column, ...]] = (
    ("COMMAND", _field("command")),
    ("DOES", _field("does")),
)
WORKER_COLUMNS: Final[tuple[Column, ...]] = (
    ("SLOT", _field("slot")),
    ("PID", _field("pid")),
    ("STATE", _field("state")),
    ("UPTIME", _field("uptime_seconds", show=seconds_text)),
    ("CONNECTIONS", _field("connections")),
)


def _last_reload(value: object) -> str:
    if value is None:
        return "none since start"
    if not isinstance(value, Mapping):
        return _text(value)
    line = f"{_text(value.get('result'))} at {_text(value.get('time'))}"
    if value.get("trigger"):
        line += f" ({value['trigger']})"
    if value.get("error"):
        line += f": {value['error']}"
    return line


_INFO_SHOWN: Final[dict[str, Callable[[object], str]]] = {
    "uptime_seconds": seconds_text,
    "last_reload": _last_reload,
}


def _info(data: Mapping[str, Any]) -> str:
    items = {
        key.removesuffix("_seconds").replace("_", " "): _INFO_SHOWN.get(key, _text)(value)
        for key, value in data.items()
        if key != "worker_processes"
    }
    width = max((len(key) for key in items), default=0) + 1
    text = "".join(f"{(key + ':').ljust(width)} {value}\n" for key, value in items.items())
    workers = data.get("worker_processes")
    if isinstance(workers, list) and all(isinstance(row, Mapping) for row in workers):
        text += "\n" + render_table(workers, WORKER_COLUMNS)
    return text


def _workers_said(data: Mapping[str, Any]) -> str:
    """ ", applied by workers 0, 1" for a change a supervisor sent to its workers."""
    parts = []
    for key in ("applied", "failed", "pending"):
        entries = data.get(key)
        if isinstance(entries, list) and entries:
            slots = ", ".join(
                _text(entry.get("slot")) if isinstance(entry, Mapping) else _text(entry)
                for entry in entries
            )
            parts.append(f"{key} {'by ' if key != 'pending' else ''}workers {slots}")
    return f" ({'; '.join(parts)})" if parts else ""


def _one_change(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """One worker's answer from a supervisor's fan-out, or the data as it is."""
    applied = data.get("applied")
    if isinstance(applied, list) and applied and isinstance(applied[0], Mapping):
        inner = applied[0].get("data")
        if isinstance(inner, Mapping):
            return inner
    return data


def _set_line(command: SetUpstreamState | SetUpstreamWeight, data: Mapping[str, Any]) -> str:
    change = _one_change(data)
    target = f"{command.route} {command.address}"
    if isinstance(command, SetUpstreamState):
        line = f"{target}: state {command.state.value}"
        previous = change.get("upstreams")
        if isinstance(previous, list) and previous:
            was = [
                f"{_text(item.get('upstream'))} was {_text(item.get('previous'))}"
                for item in previous
                if isinstance(item, Mapping)
            ]
            line += f" ({'; '.join(was)})"
        killed = change.get("killed_connections")
        if killed:
            line += f", {killed} connections killed"
    else:
        line = f"{target}: weight {command.weight}"
    return line + _workers_said(data) + "\n"


def _kill_line(command: KillConnection, data: Mapping[str, Any]) -> str:
    row = data.get("data") if isinstance(data.get("data"), Mapping) else data
    assert isinstance(row, Mapping)
    line = f"connection {command.label}"
    if row.get("route"):
        line += (
            f" ({_text(row.get('route'))}: {_text(row.get('client'))} ->"
            f" {_text(row.get('upstream'))})"
        )
    line += f" {_text(row.get('outcome') or 'killed')}"
    if "bytes_in" in row or "bytes_out" in row:
        line += (
            f" after {seconds_text(row.get('age_seconds'))}, {size_text(row.get('bytes_in'))}"
            f" in, {size_text(row.get('bytes_out'))} out"
        )
    if row.get("closed") is False:
        line += " (still closing)"
    return line + "\n"


def render_reload(data: object, ok: bool, error: str | None = None) -> tuple[str, str]:
    """(stdout, stderr) for the outcome of a reload; `data` as the reply carries it."""
    info = data if isinstance(data, Mapping) else {}
    workers = [w for w in info.get("workers") or () if isinstance(w, Mapping)]
    details = "".join(
        f"  worker {_text(w.get('slot'))} (pid {_text(w.get('pid'))}): {_text(w.get('result'))}"
        + (f": {w['error']}" if w.get("error") else "")
        + "\n"
        for w in workers
    )
    if ok:
        where = f" in {len(workers)} workers" if workers else ""
        return f"reloaded: the new config is live{where}\n", ""
    return "", f"reload refused; the running config stays: {error or 'no reason given'}\n{details}"


def render(command: Command | None, data: object) -> str:
    """What `ctl` prints for an ok reply to `command` (None: a command not parsed here)."""
    try:
        text = _render(command, data)
    except (AssertionError, AttributeError, KeyError, TypeError, ValueError):
        text = None
    return text if text is not None else json.dumps(data, indent=2) + "\n"


def _rows(data: object) -> list[Row] | None:
    if isinstance(data, list) and all(isinstance(row, Mapping) for row in data):
        return data
    return None


def _render(command: Command | None, data: object) -> str | None:
    rows = _rows(data)
    mapping = data if isinstance(data, Mapping) else None
    match command:
        case ShowInfo() if mapping is not None:
            return _info(mapping)
        case ShowRoutes() if rows is not None:
            return render_table(rows, ROUTE_COLUMNS)
        case ShowUpstreams() if rows is not None:
            return render_table(rows, UPSTREAM_COLUMNS)
        case ShowConnections() if rows is not None:
            columns = CONNECTION_COLUMNS
            if any("worker" in row for row in rows):
                columns = (columns[0], ("WORKER", _field("worker")), *columns[1:])
            return render_table(rows, columns)
        case Help() if rows is not None:
            return render_table(rows, HELP_COLUMNS)
        case SetUpstreamState() | SetUpstreamWeight() if mapping is not None:
            return _set_line(command, mapping)
        case KillConnection() if mapping is not None:
            return _kill_line(command, mapping)
        case Reload():
            return render_reload(data, True)[0]
    return None
