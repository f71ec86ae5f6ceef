"""`python -m splicerelay.bench.calls`: Python calls per connection in a real relay process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from splicerelay.bench import calls

WARMUP = 20


@pytest.fixture(scope="module")
def report_50(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """50 measured connections, through the command line, as its JSON report."""
    out = tmp_path_factory.mktemp("calls") / "calls.json"
    code = calls.main(["--connections", "50", "--warmup", str(WARMUP), "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert isinstance(report, dict)
    return report


@pytest.fixture(scope="module")
def report_100(tmp_path_factory: pytest.TempPathFactory) -> calls.CallReport:
    return calls.measure(100, WARMUP, True, tmp_path_factory.mktemp("calls-100"))


def names(report: dict[str, Any]) -> dict[str, float]:
    return {row["name"]: row["per_connection"] for row in report["rows"]}


def test_report_counts_calls_per_connection(report_50: dict[str, Any]) -> None:
    assert report_50["connections"] == 50
    assert report_50["total_per_connection"] > 0
    assert report_50["total_per_connection"] == pytest.approx(
        report_50["python_per_connection"] + report_50["c_per_connection"]
    )
    assert sum(row["calls"] for row in report_50["rows"]) == round(
        report_50["total_per_connection"] * 50
    )
    per_connection = [row["per_connection"] for row in report_50["rows"]]
    assert per_connection == sorted(per_connection, reverse=True)


def test_the_relays_own_functions_are_counted(report_50: dict[str, Any]) -> None:
    # Every connection passes through the data path and the relay's connection setup
    # at least once, so some of their functions run once or more per connection.
    own = {
        name: count
        for name, count in names(report_50).items()
        if name.startswith(("splicerelay.datapath.", "splicerelay.relay."))
    }
    assert own and max(own.values()) >= 1
    assert any(row["kind"] == "c" for row in report_50["rows"])


def test_the_counters_own_frames_are_left_out(report_50: dict[str, Any]) -> None:
    assert not [
        name
        for name in names(report_50)
        if "calls_bootstrap" in name or name.endswith("sys.setprofile")
    ]


def test_only_the_measured_window_is_counted(
    report_50: dict[str, Any], report_100: calls.CallReport
) -> None:
    # Start-up, imports and warm-up are thousands of calls: were they counted, 50
    # connections would show nearly twice as many calls each as 100 do. (The count per
    # connection varies by some 10% from run to run: how many connections' events a
    # round of the event loop takes together depends on timing.)
    totals = (report_50["total_per_connection"], report_100.total_per_connection)
    assert 2 / 3 < totals[0] / totals[1] < 3 / 2, totals


def test_format_report_lists_the_rows_most_first() -> None:
    raw = [
        {"name": "a:f", "kind": "python", "calls": 30},
        {"name": "posix.splice", "kind": "c", "calls": 70},
        {"name": "a:g", "kind": "python", "calls": 10},
    ]
    report = calls.make_report(raw, 10, WARMUP, access_log=False)
    assert report.total_per_connection == 11
    assert report.python_per_connection == 4
    text = calls.format_report(report, top=2)
    lines = text.splitlines()
    assert "total 11.0 = python 4.0 + c 7.0" in lines[1]
    assert [line.split()[-1] for line in lines[4:6]] == ["posix.splice", "a:f"]
    assert "(1 more functions)" in lines[6]


def test_relay_config_turns_only_the_access_log_off(tmp_path: Path) -> None:
    on = calls.relay_config(1000, 2000, True, tmp_path / "control")
    off = calls.relay_config(1000, 2000, False, tmp_path / "control")
    assert "access_log" not in on
    assert off.replace("log: {access_log: false}\n", "") == on
