"""One answer from many workers: how the supervisor merges its workers' `show` replies
and words the outcome of a command sent to all of them. Pure: no sockets.

Every worker runs the same routes and upstreams but counts its own connections and
errors, and may see an upstream's health differently (each one checks it). So rows
that describe the same thing (one route, one upstream) become one row:

- counters (connections, errors, bytes: see COUNTER_SUFFIXES) are summed, a dict of
  counters (errors by reason, say) key by key;
- ages (`..._age_seconds`, such as the time since the last health check) take the
  youngest: each worker checks on its own, and the latest check is the news;
- any other field that every worker reports alike is shown once;
- a field the workers disagree on (health seen differently, an admin state one worker
  refused) reads "mixed", and the row gets a `workers` list with each worker's own
  value of every such field.

Connections are each one worker's: they are listed one after another, each with its
worker's slot in `worker` and an id that is unique across workers, `SLOT:ID`, which
`kill connection` takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COUNTER_SUFFIXES",
    "MIXED",
    "ROUTE_KEYS",
    "UPSTREAM_KEYS",
    "Outcome",
    "WorkerRef",
    "fan_out_summary",
    "merge_connections",
    "merge_rows",
]

MIXED = "mixed"
# A field whose name ends so is a count: summed over the workers.
COUNTER_SUFFIXES = ("connections", "errors", "_total", "bytes", "bytes_in", "bytes_out")
COUNTER_NAMES = frozenset({"active"})  # `show upstreams`: connections open now
AGE_SUFFIX = "_age_seconds"
# What names the thing a row describes; the ones a row has make its identity.
ROUTE_KEYS = ("route", "name")
UPSTREAM_KEYS = ("route", "address", "member", "label", "upstream")

Row = dict[str, Any]


@dataclass(frozen=True)
class WorkerRef:
    """A worker as a reply names it."""

    slot: int
    pid: int

    def describe(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"


@dataclass(frozen=True)
class Outcome:
    """What one worker said to a command sent to every worker."""

    worker: WorkerRef
    ok: bool
    data: object = None  # its reply's data
    error: str | None = None  # its error reply, or why there was no reply


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_counter(name: str) -> bool:
    return name in COUNTER_NAMES or name.endswith(COUNTER_SUFFIXES)


def _summed(values: Sequence[object]) -> object | None:
    """The sum of counters (numbers, or dicts of numbers by key); None if they are not."""
    if all(_is_number(value) for value in values):
        return sum(values)  # type: ignore[arg-type]
    if all(isinstance(value, dict) for value in values):
        total: dict[str, object] = {}
        for value in values:
            assert isinstance(value, dict)
            for key, count in value.items():
                if not _is_number(count):
                    return None
                total[key] = total.get(key, 0) + count
        return total
    return None


def _identity(row: Mapping[str, Any], keys: Sequence[str]) -> tuple[object, ...]:
    return tuple((key, _hashable(row[key])) for key in keys if key in row)


def _hashable(value: object) -> object:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def merge_rows(answers: Sequence[tuple[int, Sequence[Row]]], keys: Sequence[str]) -> list[Row]:
    """One row per thing that the workers' rows describe (see the module docstring).

    `answers`: each worker's slot and rows, in slot order; the result keeps the order in
    which rows first appear. `keys`: the fields that name what a row describes."""
    groups: dict[tuple[object, ...], list[tuple[int, Row]]] = {}
    for slot, rows in answers:
        for row in rows:
            groups.setdefault(_identity(row, keys), []).append((slot, row))
    return [_merge_group(group, keys) for group in groups.values()]


def _merge_group(group: list[tuple[int, Row]], keys: Sequence[str]) -> Row:
    merged: Row = {}
    differ: dict[int, Row] = {}
    fields: dict[str, None] = {}
    for _slot, row in group:
        fields.update(dict.fromkeys(row))
    for name in fields:
        present = [(slot, row[name]) for slot, row in group if name in row]
        values = [value for _slot, value in present]
        if name in keys:
            merged[name] = values[0]
            continue
        if _is_counter(name):
            total = _summed(values)
            if total is not None:
                merged[name] = total
                continue
        if name.endswith(AGE_SUFFIX) and any(_is_number(value) for value in values):
            merged[name] = min(value for value in values if _is_number(value))
            continue
        if all(value == values[0] for value in values) and len(present) == len(group):
            merged[name] = values[0]
            continue
        merged[name] = MIXED
        for slot, value in present:
            differ.setdefault(slot, {})[name] = value
    if differ:
        merged["workers"] = [{"slot": slot, **fields_} for slot, fields_ in differ.items()]
    return merged


def merge_connections(
    answers: Sequence[tuple[int, Sequence[Row]]], limit: int | None = None
) -> list[Row]:
    """Every worker's connections, each with its `worker` and an id made `SLOT:ID`;
    at most `limit` of them when given."""
    rows: list[Row] = []
    for slot, answer in answers:
        for row in answer:
            copy = {**row, "worker": slot}
            if "id" in row:
                copy["id"] = f"{slot}:{row['id']}"
            rows.append(copy)
    return rows if limit is None else rows[:limit]


def _listed(outcomes: Iterable[Outcome]) -> str:
    return ", ".join(outcome.worker.describe() for outcome in outcomes)


def fan_out_summary(
    outcomes: Sequence[Outcome], pending: Sequence[WorkerRef] = ()
) -> tuple[dict[str, object], str | None]:
    """The reply to a change sent to every worker: its data, and the error message when
    some worker did not apply it (None when all did).

    `pending`: workers still starting, which get the change once they are ready."""
    applied = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    data: dict[str, object] = {
        "applied": [{"slot": o.worker.slot, "pid": o.worker.pid, "data": o.data} for o in applied],
        "failed": [{"slot": o.worker.slot, "pid": o.worker.pid, "error": o.error} for o in failed],
    }
    if pending:
        data["pending"] = [{"slot": w.slot, "pid": w.pid} for w in pending]
    if not failed:
        return data, None
    errors = {o.error for o in failed}
    if not applied and len(errors) == 1:
        # The same refusal everywhere (an unknown route, say): say it as one relay would.
        return data, f"{errors.pop()} (in every worker)"
    reasons = "; ".join(f"{o.worker.describe()}: {o.error}" for o in failed)
    if applied:
        return data, f"applied by {_listed(applied)}, but not by {_listed(failed)}: {reasons}"
    return data, f"not applied by any worker: {reasons}"
