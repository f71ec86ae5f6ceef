"""Access-log lines built directly are the very lines the logging formatters wrote.

The logging path (ops/logs.py's JsonFormatter and TextFormatter, with the worker's tag
and the journal's priority) is the reference: users' parsers were written against it.
"""

from __future__ import annotations

import json
import logging

import hypothesis.strategies as st
import pytest
from hypothesis import given

from splicerelay.ops.access_line import AccessLineFormat, MillisecondClock, json_string
from splicerelay.ops.journal import JournalPriority
from splicerelay.ops.logs import JsonFormatter, TextFormatter
from tests.support.access_log import FIELDS

# 2026-01-02T03:04:05.678Z, a little past the millisecond so that float rounding of
# either way of computing it cannot land on the one before.
WHEN = 1767323045.6784


def reference_line(
    format: str,
    fields: dict[str, object],
    created: float = WHEN,
    worker: int | None = None,
    journal: bool = False,
) -> str:
    """The line the logging path wrote for these fields."""
    record = logging.LogRecord(
        "splicerelay.access", logging.INFO, __file__, 1, "connection", (), None
    )
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    record.fields = fields if worker is None else {**fields, "worker": worker}
    formatter: logging.Formatter = JsonFormatter() if format == "json" else TextFormatter()
    if journal:
        formatter = JournalPriority(formatter)
    return formatter.format(record) + "\n"


def built_line(
    format: str,
    fields: dict[str, object],
    created: float = WHEN,
    worker: int | None = None,
    journal: bool = False,
) -> str:
    clock = MillisecondClock(lambda: created)
    return AccessLineFormat(format, journal, worker).line(
        clock.now(),
        str(fields["route"]),
        str(fields["client"]),
        None if fields["upstream"] is None else str(fields["upstream"]),
        int(fields["bytes_in"]),  # type: ignore[call-overload]
        int(fields["bytes_out"]),  # type: ignore[call-overload]
        float(fields["duration_seconds"]),  # type: ignore[arg-type]
        str(fields["outcome"]),
        None if fields.get("sni") is None else str(fields["sni"]),
        tuple(fields["alpn"]) if "alpn" in fields else None,  # type: ignore[call-overload]
        None if fields.get("tls_error") is None else str(fields["tls_error"]),
    )


def fields_of(
    route: str = "web",
    client: str = "127.0.0.1:50000",
    upstream: str | None = "127.0.0.1:8000",
    bytes_in: int = 12,
    bytes_out: int = 3456,
    duration: float = 0.0123456789,
    outcome: str = "ok",
) -> dict[str, object]:
    return {
        "route": route,
        "client": client,
        "upstream": upstream,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_seconds": round(duration, 6),
        "outcome": outcome,
    }


CASES = [
    fields_of(),
    fields_of(upstream=None, outcome="denied", bytes_out=0, bytes_in=0),
    fields_of(client="[::1]:40000", upstream="backend.internal:8000@10.0.0.2"),
    fields_of(route='wéb "quoted" name', client="unix:/run/a b.sock"),
    fields_of(duration=0.0000012, outcome="connect_failed"),
    fields_of(duration=12345.678901234, bytes_in=10**12),
    fields_of(client="", upstream=""),
]


def tls_fields_of(
    sni: str | None, alpn: list[str], tls_error: str | None = None, **others: object
) -> dict[str, object]:
    """The fields of a line on a listener that routes by TLS ClientHello."""
    fields = fields_of(**others)  # type: ignore[arg-type]
    return {**fields, "sni": sni, "alpn": alpn, "tls_error": tls_error}


TLS_CASES = [
    tls_fields_of("app.example.com", ["h2", "http/1.1"]),
    tls_fields_of(
        None, [], "not_tls", route="0.0.0.0:443", upstream=None, outcome="tls_inspect_failed"
    ),
    tls_fields_of("a.example.com", ['we "ird"', "é", ""], outcome="no_route"),
]


@pytest.mark.parametrize("format", ["json", "text"])
@pytest.mark.parametrize("worker", [None, 0, 3])
@pytest.mark.parametrize("journal", [False, True])
@pytest.mark.parametrize("fields", CASES + TLS_CASES)
def test_a_built_line_is_the_line_logging_wrote(
    format: str, worker: int | None, journal: bool, fields: dict[str, object]
) -> None:
    assert built_line(format, fields, worker=worker, journal=journal) == reference_line(
        format, fields, worker=worker, journal=journal
    )


def test_json_fields_in_order() -> None:
    line = built_line("json", fields_of(), worker=1)
    entry = json.loads(line)
    assert list(entry) == [*FIELDS, "worker"]
    assert entry["time"] == "2026-01-02T03:04:05.678Z"
    assert entry["level"] == "info"
    assert entry["message"] == "connection"
    assert entry["duration_seconds"] == 0.012346
    assert line.endswith("}\n") and line.count("\n") == 1


texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)


@given(route=texts, client=texts, upstream=st.none() | texts)
def test_any_text_in_any_field_matches_logging_and_stays_one_line(
    route: str, client: str, upstream: str | None
) -> None:
    fields = fields_of(route=route, client=client, upstream=upstream)
    for format in ("json", "text"):
        line = built_line(format, fields)
        assert line == reference_line(format, fields)
        assert line.count("\n") == 1 and line.endswith("\n")


def test_tls_fields_follow_the_outcome() -> None:
    entry = json.loads(built_line("json", TLS_CASES[0], worker=1))
    assert list(entry) == [*FIELDS, "sni", "alpn", "tls_error", "worker"]
    assert entry["sni"] == "app.example.com" and entry["alpn"] == ["h2", "http/1.1"]
    assert entry["tls_error"] is None
    failed = json.loads(built_line("json", TLS_CASES[1]))
    assert failed["tls_error"] == "not_tls" and failed["sni"] is None


@given(sni=st.none() | texts, alpn=st.lists(texts, max_size=4))
def test_any_sni_and_alpn_match_logging_and_stay_one_line(sni: str | None, alpn: list[str]) -> None:
    fields = tls_fields_of(sni, alpn)
    for format in ("json", "text"):
        line = built_line(format, fields)
        assert line == reference_line(format, fields)
        assert line.count("\n") == 1 and line.endswith("\n")


@given(st.text(max_size=40))
def test_json_string_is_json_dumps(text: str) -> None:
    assert json_string(text) == json.dumps(text)


def test_the_clock_formats_once_per_millisecond() -> None:
    now = [WHEN]
    clock = MillisecondClock(lambda: now[0])
    first = clock.now()
    now[0] += 0.0004  # the same millisecond: the very same string
    assert clock.now() is first
    now[0] += 0.001
    assert clock.now() == "2026-01-02T03:04:05.679Z"
    now[0] += 1.0
    assert clock.now() == "2026-01-02T03:04:06.679Z"
    now[0] = 1767323045.9995
    assert clock.now() == "2026-01-02T03:04:05.999Z"
    now[0] = 1767323046.0004
    assert clock.now() == "2026-01-02T03:04:06.000Z"
