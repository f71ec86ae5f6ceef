"""`kill connection SLOT:ID`: the connection ids of a relay with workers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splicerelay.protocol.control import (
    MAX_CONNECTION_ID,
    MAX_SLOT,
    CommandError,
    KillConnection,
    format_command,
    parse_command,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"kill connection 7", KillConnection(7)),
        (b"kill connection 0:7", KillConnection(7, slot=0)),
        (b"kill connection 3:0", KillConnection(0, slot=3)),
        (f"kill connection {MAX_SLOT}:{MAX_CONNECTION_ID}".encode(),
         KillConnection(MAX_CONNECTION_ID, slot=MAX_SLOT)),
    ],
)  # fmt: skip
def test_ids_with_and_without_a_slot(line: bytes, expected: KillConnection) -> None:
    assert parse_command(line) == expected
    assert format_command(expected) == line.decode()


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"kill connection 1:", "ID must be a number or SLOT:NUMBER, not '1:'"),
        (b"kill connection :1", "not ':1'"),
        (b"kill connection 1:2:3", "not '1:2:3'"),
        (b"kill connection a:1", "not 'a:1'"),
        (b"kill connection 1:-1", "not '1:-1'"),
        (f"kill connection {MAX_SLOT + 1}:1".encode(), "SLOT must be a whole number"),
        (f"kill connection 1:{MAX_CONNECTION_ID + 1}".encode(), "ID must be a whole number"),
    ],
)
def test_bad_ids_name_the_form(line: bytes, says: str) -> None:
    with pytest.raises(CommandError) as caught:
        parse_command(line)
    assert says in str(caught.value)
    assert "usage: kill connection ID" in str(caught.value)


def test_a_slot_out_of_range_is_refused_by_the_dataclass_too() -> None:
    with pytest.raises(CommandError, match="SLOT must be"):
        KillConnection(1, slot=-1)


def test_the_label_is_what_show_connections_prints() -> None:
    assert KillConnection(5).label == "5"
    assert KillConnection(5, slot=1).label == "1:5"


@given(number=st.integers(0, MAX_CONNECTION_ID), slot=st.none() | st.integers(0, MAX_SLOT))
def test_parse_reads_back_what_format_wrote(number: int, slot: int | None) -> None:
    command = KillConnection(number, slot)
    assert parse_command(format_command(command).encode() + b"\n") == command
