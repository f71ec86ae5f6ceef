"""logfmt fields in text log lines: quoted only when needed, and read back exactly.

What the relay writes is read back with a tiny logfmt reader of the tests' own
(tests/support/logfmt.py), not checked against the writer's own idea of it.
"""

from __future__ import annotations

import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splicerelay.ops.logfmt import format_fields, quote, value_text
from splicerelay.ops.logs import TextFormatter
from tests.support.logfmt import parse_logfmt


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("web", "web"),
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::1]:8080", "[::1]:8080"),
        ("unix:/run/web.sock", "unix:/run/web.sock"),
        ("", '""'),
        ("two words", '"two words"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ('"', '"\\""'),
        ("C:\\dir", "C:\\dir"),  # a backslash alone needs no quotes
        ("back\\slash and space", '"back\\\\slash and space"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("tab\there", '"tab\\there"'),
        ("cr\r", '"cr\\r"'),
        ("nul\x00", '"nul\\u0000"'),
        ("next\x85line", '"next\\u0085line"'),
        ("sep\u2028", '"sep\\u2028"'),
        ("bad\udcff", '"bad\\udcff"'),  # a lone surrogate, as from surrogateescape
        ("tag\U000e0001", '"tag\\U000e0001"'),
        ("café", "café"),
    ],
)
def test_text_is_quoted_only_when_it_must_be(value: str, written: str) -> None:
    assert quote(value) == written


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (1234, "1234"),
        (-5, "-5"),
        (0.5, "0.5"),
        (1e-06, "1e-06"),
        ("text", "text"),
        (
            ["a.yaml:3: routes[0].listen: bad address"],
            '["a.yaml:3: routes[0].listen: bad address"]',
        ),
        ({"a": 1}, '{"a":1}'),
        ((1, 2), "[1,2]"),
    ],
)
def test_values_are_written_as_text_not_as_python_reprs(value: object, text: str) -> None:
    assert value_text(value) == text


def test_an_access_line_reads_back_field_by_field() -> None:
    fields = {
        "route": "web",
        "client": "127.0.0.1:50000",
        "upstream": None,
        "bytes_in": 0,
        "bytes_out": 12,
        "duration_seconds": 0.000123,
        "outcome": "connect_failed",
        "worker": 1,
    }
    line = format_fields(fields)
    assert line == (
        'route=web client=127.0.0.1:50000 upstream="" bytes_in=0 bytes_out=12 '
        "duration_seconds=0.000123 outcome=connect_failed worker=1"
    )
    assert parse_logfmt(line) == {key: value_text(value) for key, value in fields.items()}


def test_a_list_of_errors_reads_back_as_its_json() -> None:
    errors = ['relay.yaml:3: routes[0].listen: "x" is not an address', "b=c"]
    [(key, value)] = parse_logfmt(format_fields({"errors": errors})).items()
    assert key == "errors"
    assert value == '["relay.yaml:3: routes[0].listen: \\"x\\" is not an address","b=c"]'


def test_no_fields_is_no_text() -> None:
    assert format_fields({}) == ""


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.text(), max_size=6))
def test_any_text_values_read_back_exactly(fields: dict[str, str]) -> None:
    line = format_fields(fields)
    assert "\n" not in line and "\r" not in line  # one record, one line
    assert parse_logfmt(line) == fields


@given(st.text())
def test_any_text_is_one_logfmt_token(value: str) -> None:
    written = quote(value)
    # Bare or quoted, a value never contains an unescaped space or quote inside it.
    assert re.fullmatch(r'[^ "=]+|"(?:[^"\\]|\\.)*"', written, re.DOTALL), written


def record(
    message: str, fields: dict[str, object], level: int = logging.WARNING
) -> logging.LogRecord:
    entry = logging.LogRecord("splicerelay", level, __file__, 1, message, None, None)
    entry.fields = fields
    entry.created = 0.0
    entry.msecs = 0.0
    return entry


def test_a_text_line_is_time_level_message_then_logfmt_fields() -> None:
    line = TextFormatter().format(
        record(
            "upstream connect failed",
            {"route": "my route", "upstream": "127.0.0.1:1", "reason": "refused", "suppressed": 0},
        )
    )
    assert line == (
        "1970-01-01T00:00:00.000Z warning upstream connect failed "
        'route="my route" upstream=127.0.0.1:1 reason=refused suppressed=0'
    )


def test_a_text_line_without_fields_ends_with_its_message() -> None:
    line = TextFormatter().format(record("ready", {}, logging.INFO))
    assert line == "1970-01-01T00:00:00.000Z info ready"
