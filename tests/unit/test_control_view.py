"""What `splicerelay ctl` prints for people: aligned tables, key: value lines, one-line
summaries, and JSON for a reply it does not know the shape of."""

from __future__ import annotations

import json

import pytest

from splicerelay.ops.control_view import (
    render,
    render_reload,
    render_table,
    seconds_text,
    size_text,
)
from splicerelay.protocol.control import (
    AdminState,
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

CONNECTIONS = [
    {
        "id": 7,
        "route": "web",
        "client": "127.0.0.1:50000",
        "upstream": "10.0.0.2:8000",
        "state": "relaying",
        "age_seconds": 75.5,
        "idle_seconds": 0.0,
        "bytes_in": 1536,
        "bytes_out": 20 * 1024 * 1024,
    },
    {
        "id": 12,
        "route": "database",
        "client": "[::1]:41234",
        "upstream": None,
        "state": "connecting",
        "age_seconds": 0.25,
        "idle_seconds": 0.25,
        "bytes_in": 0,
        "bytes_out": 0,
    },
]


def test_connections_table_has_aligned_columns_and_sizes_for_people() -> None:
    text = render(ShowConnections(), CONNECTIONS)
    lines = text.splitlines()
    assert lines[0].split() == [
        "ID",
        "ROUTE",
        "CLIENT",
        "UPSTREAM",
        "STATE",
        "AGE",
        "IDLE",
        "IN",
        "OUT",
    ]
    assert lines[1].split() == [
        "7",
        "web",
        "127.0.0.1:50000",
        "10.0.0.2:8000",
        "relaying",
        "1m15s",
        "0.0s",
        "1.5",
        "KiB",
        "20.0",
        "MiB",
    ]
    assert lines[2].split()[:5] == ["12", "database", "[::1]:41234", "-", "connecting"]
    # Every column starts at the same place in every line.
    for header in ("ROUTE", "CLIENT", "UPSTREAM", "STATE"):
        start = lines[0].index(header)
        assert all(line[start - 2 : start] == "  " for line in lines[1:])
        assert all(line[start] != " " for line in lines[1:])


def test_connections_of_workers_get_a_worker_column() -> None:
    rows = [{**CONNECTIONS[0], "id": "1:7", "worker": 1}]
    lines = render(ShowConnections(), rows).splitlines()
    assert lines[0].split()[:2] == ["ID", "WORKER"]
    assert lines[1].split()[:2] == ["1:7", "1"]


def test_an_empty_table_is_its_header() -> None:
    assert (
        render(ShowConnections(), []) == "ID  ROUTE  CLIENT  UPSTREAM  STATE  AGE  IDLE  IN  OUT\n"
    )


def test_routes_table_sums_up_the_limits() -> None:
    rows = [
        {
            "name": "web",
            "listen": "0.0.0.0:8080",
            "balance": "least_connections",
            "upstreams": 3,
            "active_connections": 12,
            "limits": {
                "max_connections": 10000,
                "max_connections_per_source": 20,
                "connect_timeout_seconds": 5.0,
                "idle_timeout_seconds": 3600.0,
                "max_duration_seconds": None,
            },
        }
    ]
    lines = render(ShowRoutes(), rows).splitlines()
    assert lines[0].split() == ["NAME", "LISTEN", "BALANCE", "UPSTREAMS", "ACTIVE", "LIMITS"]
    assert lines[1].startswith("web   0.0.0.0:8080  least_connections  3          12      ")
    assert lines[1].endswith("10000 conns, 20/source, connect 5.0s, idle 1h00m")


def test_upstreams_table_takes_the_admin_layers_rows() -> None:
    rows = [
        {
            "route": "web",
            "address": "backend.internal:8000",
            "upstream": "backend.internal:8000@10.0.0.3",
            "resolved": "10.0.0.3:8000",
            "weight": 2,
            "admin_state": "drain",
            "health": "up",
            "last_check": "ok",
            "active": 4,
            "connect_errors": {"refused": 1},
        }
    ]
    lines = render(ShowUpstreams(), rows).splitlines()
    assert "ADMIN" in lines[0] and "CONNECT ERRORS" in lines[0]
    assert lines[1].split() == [
        "web",
        "backend.internal:8000@10.0.0.3",
        "10.0.0.3:8000",
        "2",
        "drain",
        "up",
        "ok",
        "4",
        "refused",
        "1",
    ]


def test_show_info_is_key_value_lines_with_the_last_reload_in_words() -> None:
    data = {
        "version": "1.0",
        "pid": 42,
        "uptime_seconds": 3725.0,
        "workers": 1,
        "config_path": "/etc/splicerelay/relay.yaml",
        "config_sha256": "ab" * 32,
        "last_reload": {
            "result": "refused",
            "time": "2026-01-01T00:00:00+00:00",
            "trigger": "SIGHUP",
            "error": "/etc/splicerelay/relay.yaml:3: routes[0]: unknown key 'bogus'",
        },
    }
    lines = render(ShowInfo(), data).splitlines()
    assert lines[0] == "version:       1.0"
    assert "uptime:        1h02m" in lines
    assert "config path:   /etc/splicerelay/relay.yaml" in lines
    assert lines[-1] == (
        "last reload:   refused at 2026-01-01T00:00:00+00:00 (SIGHUP):"
        " /etc/splicerelay/relay.yaml:3: routes[0]: unknown key 'bogus'"
    )
    assert render(ShowInfo(), {"last_reload": None}) == "last reload: none since start\n"


def test_show_info_of_a_supervisor_lists_its_workers() -> None:
    data = {
        "workers": 2,
        "worker_processes": [
            {"slot": 0, "pid": 10, "state": "ready", "uptime_seconds": 5.0, "connections": 3},
            {"slot": 1, "pid": 11, "state": "starting", "uptime_seconds": 0.5, "connections": 0},
        ],
    }
    text = render(ShowInfo(), data)
    assert "SLOT  PID  STATE     UPTIME  CONNECTIONS" in text
    assert "1     11   starting  0.5s    0" in text


def test_set_and_kill_are_one_line() -> None:
    state = SetUpstreamState("web", "10.0.0.2:8000", AdminState.DRAIN)
    data = {
        "route": "web",
        "address": "10.0.0.2:8000",
        "state": "drain",
        "upstreams": [{"upstream": "10.0.0.2:8000", "previous": "ready"}],
        "killed_connections": 0,
    }
    assert render(state, data) == "web 10.0.0.2:8000: state drain (10.0.0.2:8000 was ready)\n"
    fanned = {"applied": [{"slot": 0, "pid": 1, "data": data}, {"slot": 1, "pid": 2}]}
    assert render(state, fanned) == (
        "web 10.0.0.2:8000: state drain (10.0.0.2:8000 was ready) (applied by workers 0, 1)\n"
    )
    weight = SetUpstreamWeight("web", "10.0.0.2:8000", 5)
    assert render(weight, {"weight": 5}) == "web 10.0.0.2:8000: weight 5\n"
    kill = {**CONNECTIONS[0], "outcome": "killed", "closed": True}
    assert render(KillConnection(7), kill) == (
        "connection 7 (web: 127.0.0.1:50000 -> 10.0.0.2:8000) killed after 1m15s,"
        " 1.5 KiB in, 20.0 MiB out\n"
    )


def test_reload_outcomes() -> None:
    assert render(Reload(), {"result": "ok"}) == "reloaded: the new config is live\n"
    workers = [
        {"slot": 0, "pid": 10, "result": "ok", "error": None},
        {"slot": 1, "pid": 11, "result": "refused", "error": "route x: port in use"},
    ]
    assert render_reload({"result": "ok", "workers": workers[:1] * 2}, True) == (
        "reloaded: the new config is live in 2 workers\n",
        "",
    )
    out, err = render_reload({"result": "refused", "workers": workers}, False, "port in use")
    assert out == ""
    assert err == (
        "reload refused; the running config stays: port in use\n"
        "  worker 0 (pid 10): ok\n"
        "  worker 1 (pid 11): refused: route x: port in use\n"
    )


def test_help_is_a_table() -> None:
    text = render(Help(), [{"command": "show info", "does": "what runs"}])
    assert text == "COMMAND    DOES\nshow info  what runs\n"


@pytest.mark.parametrize(
    ("command", "data"),
    [
        (ShowConnections(), {"unexpected": "shape"}),
        (ShowInfo(), ["not", "a", "mapping"]),
        (None, {"a": 1}),
        (KillConnection(1), ["not", "a", "mapping"]),
    ],
)
def test_a_shape_it_does_not_know_is_printed_as_json(command: object, data: object) -> None:
    assert json.loads(render(command, data)) == data  # type: ignore[arg-type]


def test_render_table_pads_all_but_the_last_column() -> None:
    rows = [{"a": "x", "b": "long value"}, {"a": "longer", "b": "y"}]
    text = render_table(rows, [("A", lambda r: r["a"]), ("B", lambda r: r["b"])])
    assert text == "A       B\nx       long value\nlonger  y\n"


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (5 * 1024**3, "5.0 GiB"), (None, "-")],
)
def test_sizes(count: object, text: str) -> None:
    assert size_text(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "0.2s"),
        (9.96, "10.0s"),
        (12.7, "12s"),
        (303, "5m03s"),
        (7800, "2h10m"),
        (273600, "3d04h"),
    ],
)
def test_durations(seconds: float, text: str) -> None:
    assert seconds_text(seconds) == text
