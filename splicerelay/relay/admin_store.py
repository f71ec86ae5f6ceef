"""What an operator set on upstreams, kept by route and address so that it outlives reloads.

This is HAProxy's server-state file, held in memory: `set upstream ROUTE ADDRESS state
drain` is recorded here under (ROUTE, ADDRESS) as well as applied to the members it names.
A reload builds new members, and a DNS refresh adds some; both get their settings from
here, for as long as the route and the address are in the config. A reload that drops
the route or the address drops the setting with it.

ADDRESS is either a configured upstream address as the config writes it
(`backend.internal:8000`: every member of the name) or one member's label
(`backend.internal:8000@10.0.0.3`; an IP literal or a unix path is its own and only
member). The settings apply in the order they were given, so the last one that names a
member wins: drain a name, then set one of its addresses `ready`, and that one takes
connections while the others do not. A setting by address replaces the earlier ones
on its members' labels.

A weight remembers the configured weight it replaced. If a reload brings a different
configured weight for that address, the config wins and the operator's weight is
dropped (HAProxy does the same with the weights in its state file): whoever edited the
config meant the new number.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from splicerelay.config import Config, Route
from splicerelay.protocol.control import MAX_WEIGHT, MIN_WEIGHT, AdminState
from splicerelay.relay.upstreams import UpstreamRuntime

log = logging.getLogger("splicerelay")

__all__ = ["AdminStore", "SnapshotError", "Weight", "address_of_label", "names_member"]


class SnapshotError(ValueError):
    """A snapshot that `AdminStore.load` cannot take."""


@dataclass(frozen=True)
class Weight:
    """An operator's weight, and the configured weight it stands in for."""

    weight: int
    configured: int


Setting = AdminState | Weight
# (route, address or member label, "state" or "weight")
Key = tuple[str, str, str]


def address_of_label(target: str) -> str:
    """The configured address a member label belongs to ("name:80@10.0.0.3" → "name:80");
    a configured address is its own."""
    base, at, _ip = target.rpartition("@")
    return base if at else target


def names_member(target: str, member: UpstreamRuntime) -> bool:
    """Whether ADDRESS `target` names `member`: its configured address, or its label."""
    return target in (str(member.config.address), member.label)


def _kind(setting: Setting) -> str:
    return "weight" if isinstance(setting, Weight) else "state"


class AdminStore:
    """The operator's settings, in the order they were given (see the module docstring)."""

    def __init__(self) -> None:
        self._settings: dict[Key, Setting] = {}

    def __len__(self) -> int:
        return len(self._settings)

    def record(self, route: str, target: str, setting: Setting) -> None:
        """Remember `setting` for ADDRESS `target` of `route`, after every earlier one.

        A setting by configured address replaces those of the same kind on its members'
        labels, which it overrides anyway; and `ready` or a weight equal to the
        configured one, left with nothing to override, is not kept at all.
        """
        kind = _kind(setting)
        if address_of_label(target) == target:
            for key in [k for k in self._settings if k[0] == route and k[2] == kind]:
                if key[1] != target and address_of_label(key[1]) == target:
                    del self._settings[key]
        key = (route, target, kind)
        self._settings.pop(key, None)
        if self._is_default(route, target, setting):
            return
        self._settings[key] = setting

    def _is_default(self, route: str, target: str, setting: Setting) -> bool:
        """A setting that changes nothing, with nothing earlier on the same members."""
        if isinstance(setting, Weight):
            default = setting.weight == setting.configured
        else:
            default = setting is AdminState.READY
        if not default:
            return False
        # A `ready` on one label after a drain of the whole name must be kept.
        address = address_of_label(target)
        return not any(
            k[0] == route and k[2] == _kind(setting) and address_of_label(k[1]) == address
            for k in self._settings
        )

    def apply(self, route: str, members: Iterable[UpstreamRuntime]) -> bool:
        """Give `members` of `route` their settings (ready and the configured weight where
        none names them); True if a weight changed, so the strategy needs rebuilding."""
        settings = [(key[1], value) for key, value in self._settings.items() if key[0] == route]
        weights_changed = False
        for member in members:
            state = AdminState.READY
            weight: int | None = None
            for target, setting in settings:
                if not names_member(target, member):
                    continue
                if isinstance(setting, Weight):
                    if setting.configured == member.config.weight:
                        weight = setting.weight
                else:
                    state = setting
            member.set_admin(state)
            before = member.weight
            member.set_weight(weight)
            weights_changed |= member.weight != before
        return weights_changed

    def prune(self, config: Config) -> list[tuple[str, str]]:
        """Forget what names a route or address that `config` no longer has, and weights
        whose configured weight it changed; returns the (route, address) pairs dropped."""
        routes = {route.name: route for route in config.routes}
        dropped: list[tuple[str, str]] = []
        for key, setting in list(self._settings.items()):
            route = routes.get(key[0])
            if route is None or not _still_configured(route, key[1], setting):
                del self._settings[key]
                dropped.append((key[0], key[1]))
        return dropped

    def snapshot(self) -> list[dict[str, object]]:
        """The settings as JSON-able dicts, in order: what `load` takes back."""
        rows: list[dict[str, object]] = []
        for (route, target, _kind_name), setting in self._settings.items():
            row: dict[str, object] = {"route": route, "address": target}
            if isinstance(setting, Weight):
                row["weight"] = setting.weight
                row["configured_weight"] = setting.configured
            else:
                row["state"] = setting.value
            rows.append(row)
        return rows

    def load(self, rows: Sequence[object]) -> None:
        """Record every setting of a `snapshot`, in its order, after the ones held.
        Raises SnapshotError, recording nothing, if a row is not one of a snapshot's."""
        parsed = [_parse_row(row) for row in rows]
        for route, target, setting in parsed:
            self.record(route, target, setting)


def _still_configured(route: Route, target: str, setting: Setting) -> bool:
    address = address_of_label(target)
    for upstream in route.upstreams:
        if str(upstream.address) != address:
            continue
        if isinstance(setting, Weight):
            return upstream.weight == setting.configured
        return True
    return False


def _parse_row(row: object) -> tuple[str, str, Setting]:
    if not isinstance(row, dict):
        raise SnapshotError(f"an admin setting must be an object, not {row!r}")
    route, target = row.get("route"), row.get("address")
    if not isinstance(route, str) or not isinstance(target, str) or not route or not target:
        raise SnapshotError(f"an admin setting needs a route and an address: {row!r}")
    if "state" in row:
        try:
            return route, target, AdminState(row["state"])
        except ValueError:
            raise SnapshotError(f"unknown admin state in {row!r}") from None
    weight, configured = row.get("weight"), row.get("configured_weight")
    for value in (weight, configured):
        if type(value) is not int or not MIN_WEIGHT <= value <= MAX_WEIGHT:
            raise SnapshotError(f"an admin setting needs a state or two weights: {row!r}")
    assert isinstance(weight, int) and isinstance(configured, int)
    return route, target, Weight(weight, configured)
