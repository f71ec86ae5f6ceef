"""Which addresses of an upstream host name are members, and in what order (pure).

A host name may resolve to several addresses. With ``resolve: all`` (the default) every
distinct address is a member of the route's balancer, as nginx makes every address of a
name in an ``upstream`` block a server; with ``resolve: first`` only the first address
the resolver returns is.

How the configured weight is shared: each member gets the whole configured weight, not
a part of it. That is nginx's semantics (each resolved address is a server with the
weight of the line it came from), so a config moved from nginx balances the same way.
It also keeps the weight meaning "the share of one backend host": a name for a pool of
three hosts, beside a literal address of the same weight, gives each of the four hosts a
quarter of the connections, and the pool's share grows and shrinks with its size as the
name's records change. Splitting instead would need integer shares (a weight of 1 over
three addresses cannot be split) and would shift every member's share whenever a record
was added or removed.

Members are identified by their resolved address. A refresh keeps the members that are
still resolved, in the order they already have, and appends new ones in the resolver's
order: a resolver that rotates its answers (DNS round-robin) then changes nothing, and a
member that stays keeps its place, its health and its open connections.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["RESOLVE_MODES", "MemberChange", "chosen_addresses", "distinct", "merge_members"]

RESOLVE_MODES: tuple[str, ...] = ("all", "first")

Key = TypeVar("Key", bound=Hashable)


def distinct(addresses: Iterable[Key]) -> list[Key]:
    """`addresses` without repeats, first occurrence first (a name may list an address
    twice, e.g. in two lines of /etc/hosts)."""
    return list(dict.fromkeys(addresses))


def chosen_addresses(addresses: Iterable[Key], mode: str) -> list[Key]:
    """The addresses that become members, in the resolver's order: every distinct one
    for ``all``, only the first for ``first``. Raises ValueError on another mode."""
    unique = distinct(addresses)
    if mode == "all":
        return unique
    if mode == "first":
        return unique[:1]
    raise ValueError(f"unknown resolve mode {mode!r}; expected one of {', '.join(RESOLVE_MODES)}")


@dataclass(frozen=True)
class MemberChange(Generic[Key]):
    """The members after a refresh, and which of them came or went."""

    members: tuple[Key, ...]
    added: tuple[Key, ...]
    removed: tuple[Key, ...]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def merge_members(current: Sequence[Key], wanted: Iterable[Key]) -> MemberChange[Key]:
    """The members once `wanted` (freshly resolved and chosen) replaces `current`.

    Members of `current` that are still wanted keep their order; new ones follow in the
    order of `wanted`. An empty `wanted` is taken as it is (no members): a lookup that
    failed must not reach here, it keeps the last good members instead.
    """
    wanted_set = dict.fromkeys(wanted)
    kept = [key for key in distinct(current) if key in wanted_set]
    kept_set = set(kept)
    added = [key for key in wanted_set if key not in kept_set]
    removed = [key for key in distinct(current) if key not in wanted_set]
    return MemberChange(tuple(kept + added), tuple(added), tuple(removed))
