"""Members of an upstream host name: which resolved addresses, in what order (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.config.model import UPSTREAM_RESOLVE_MODES
from splicerelay.protocol.membership import (
    RESOLVE_MODES,
    chosen_addresses,
    distinct,
    merge_members,
)

PROPERTY = settings(max_examples=300, database=None, derandomize=True, deadline=None)
ADDRESSES = st.lists(st.sampled_from("abcdefgh"), max_size=12)


def test_the_modes_are_the_configs():
    assert RESOLVE_MODES == UPSTREAM_RESOLVE_MODES


@pytest.mark.parametrize(
    ("resolved", "mode", "members"),
    [
        (["a", "b", "c"], "all", ["a", "b", "c"]),
        (["a", "b", "a", "c", "b"], "all", ["a", "b", "c"]),  # a repeated record counts once
        (["b", "a"], "all", ["b", "a"]),  # the resolver's order, not sorted
        (["a", "b", "c"], "first", ["a"]),
        (["b", "b", "a"], "first", ["b"]),
        (["a"], "all", ["a"]),
        ([], "all", []),
        ([], "first", []),
    ],
)
def test_chosen_addresses(resolved: list[str], mode: str, members: list[str]):
    assert chosen_addresses(resolved, mode) == members


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown resolve mode 'some'"):
        chosen_addresses(["a"], "some")


@pytest.mark.parametrize(
    ("current", "wanted", "members", "added", "removed"),
    [
        ("ab", "ab", "ab", "", ""),
        ("ab", "ba", "ab", "", ""),  # a rotating resolver changes nothing
        ("ab", "abc", "abc", "c", ""),
        ("ab", "cab", "abc", "c", ""),  # new members come after the ones that stay
        ("abc", "ac", "ac", "", "b"),
        ("abc", "dcb", "bcd", "d", "a"),
        ("ab", "cd", "cd", "cd", "ab"),
        ("a", "", "", "", "a"),
        ("", "ba", "ba", "ba", ""),
    ],
)
def test_merge_members(current: str, wanted: str, members: str, added: str, removed: str):
    change = merge_members(list(current), list(wanted))
    assert "".join(change.members) == members
    assert "".join(change.added) == added
    assert "".join(change.removed) == removed
    assert change.changed == bool(added or removed)


@PROPERTY
@given(current=ADDRESSES, wanted=ADDRESSES)
def test_merge_members_properties(current: list[str], wanted: list[str]):
    change = merge_members(distinct(current), wanted)
    # Exactly the wanted addresses, once each.
    assert sorted(change.members) == sorted(set(wanted))
    # Those that stay keep their relative order.
    stayed = [key for key in change.members if key not in change.added]
    assert stayed == [key for key in distinct(current) if key in set(wanted)]
    assert change.members[: len(stayed)] == tuple(stayed)
    # Added and removed are the two set differences.
    assert set(change.added) == set(wanted) - set(current)
    assert set(change.removed) == set(current) - set(wanted)
    # Merging again with the same answer, in any order, changes nothing.
    again = merge_members(change.members, list(reversed(wanted)))
    assert again.members == change.members and not again.changed
