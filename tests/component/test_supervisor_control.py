"""The supervisor's control handler, with fake workers: merging, fan-out, replay.

The workers here are scripted: `FakeWorkers.ask` stands in for the client that reaches
a worker's control socket, answers from a table, and records what each worker was sent
and when. The order in which the workers answer is the fake's to choose (`delays`), so
that merging is tested with answers arriving out of slot order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from splicerelay.config import parse_config
from splicerelay.protocol.control import (
    AdminState,
    Command,
    CommandFailed,
    KillConnection,
    Reload,
    Reply,
    SetUpstreamState,
    SetUpstreamWeight,
    ShowConnections,
    ShowInfo,
    ShowRoutes,
    ShowUpstreams,
    error_reply,
    format_command,
    ok_reply,
)
from splicerelay.relay.control_client import ControlNotRunning, ControlTimeout
from splicerelay.workers.control import SupervisorControl, WorkerEntry
from splicerelay.workers.control_merge import MIXED

DRAIN = SetUpstreamState("web", "10.0.0.2:8000", AdminState.DRAIN)
CONFIG = parse_config(
    "routes:\n"
    "  - name: web\n"
    "    listen: 127.0.0.1:8080\n"
    "    upstreams:\n"
    "      - address: 10.0.0.2:8000\n"
    "      - address: 10.0.0.9:80\n"
    "      - address: b:80\n",
    "relay.yaml",
)


def entry(slot: int, state: str = "ready") -> WorkerEntry:
    return WorkerEntry(slot, 100 + slot, f"/fake/control-{slot}", state, started_at=0.0)


Answer = Reply | Exception | Callable[[Command], Reply]


@dataclass
class FakeWorkers:
    """Scripted worker control sockets, by path."""

    answers: dict[str, dict[str, Answer]] = field(default_factory=dict)  # path -> line -> answer
    delays: dict[str, float] = field(default_factory=dict)  # path -> seconds before answering
    sent: list[tuple[str, str]] = field(default_factory=list)  # (path, line), as sent
    answered: list[str] = field(default_factory=list)  # paths, in the order they answered
    default: Answer = field(default_factory=lambda: ok_reply({"changed": True}))

    async def ask(self, path: str, command: Command | str, timeout: float) -> Reply:
        line = command if isinstance(command, str) else format_command(command)
        self.sent.append((path, line))
        await trio.sleep(self.delays.get(path, 0.0))
        answer = self.answers.get(path, {}).get(line, self.default)
        self.answered.append(path)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(command if not isinstance(command, str) else ShowInfo())
        return answer


def make(
    fakes: FakeWorkers, workers: list[WorkerEntry], reload_data: dict[str, Any] | None = None
) -> SupervisorControl:
    async def reload() -> dict[str, Any]:
        assert reload_data is not None
        return reload_data

    return SupervisorControl(
        workers=lambda: workers,
        info=lambda: {"pid": 1, "workers": len(workers)},
        config=lambda: CONFIG,
        reload=reload,
        ask=fakes.ask,
        timeout=1.0,
    )


# ----- show ----------------------------------------------------------------------------


async def test_show_upstreams_sums_counters_and_shows_differing_states_per_worker() -> None:
    def rows(active: int, errors: dict[str, int], health: str, admin: str) -> Reply:
        return ok_reply(
            [
                {
                    "route": "web",
                    "address": "10.0.0.2:8000",
                    "weight": 2,
                    "admin_state": admin,
                    "health": health,
                    "last_check_age_seconds": active / 10,
                    "active": active,
                    "connect_errors": errors,
                },
                {
                    "route": "web",
                    "address": "10.0.0.3:8000",
                    "weight": 1,
                    "admin_state": "ready",
                    "health": "up",
                    "last_check_age_seconds": None,
                    "active": 1,
                    "connect_errors": 0,
                },
            ]
        )

    fakes = FakeWorkers(
        answers={
            "/fake/control-0": {"show upstreams": rows(3, {"refused": 1}, "up", "drain")},
            "/fake/control-1": {
                "show upstreams": rows(4, {"refused": 2, "timeout": 1}, "down", "drain")
            },
        },
        # Worker 1 answers first: the merge must not depend on who answers first.
        delays={"/fake/control-0": 0.02},
    )
    control = make(fakes, [entry(0), entry(1)])
    merged = await control(ShowUpstreams())
    assert fakes.answered == ["/fake/control-1", "/fake/control-0"]
    assert merged == [
        {
            "route": "web",
            "address": "10.0.0.2:8000",
            "weight": 2,
            "admin_state": "drain",
            "health": MIXED,
            "last_check_age_seconds": 0.3,
            "active": 7,
            "connect_errors": {"refused": 3, "timeout": 1},
            "workers": [{"slot": 0, "health": "up"}, {"slot": 1, "health": "down"}],
        },
        {
            "route": "web",
            "address": "10.0.0.3:8000",
            "weight": 1,
            "admin_state": "ready",
            "health": "up",
            "last_check_age_seconds": None,
            "active": 2,
            "connect_errors": 0,
        },
    ]


async def test_workers_are_asked_at_once_not_one_after_another() -> None:
    fakes = FakeWorkers(
        default=ok_reply([]), delays={f"/fake/control-{slot}": 0.5 for slot in range(4)}
    )
    control = make(fakes, [entry(slot) for slot in range(4)])
    started = trio.current_time()
    await control(ShowRoutes())
    # Four answers of 0.5 s each, in about 0.5 s, not 2 s. (Trio's autojump clock would
    # hide this; the real one is bounded loosely.)
    assert trio.current_time() - started < 1.5


async def test_show_routes_merges_by_route_and_keeps_first_seen_order() -> None:
    def routes(active: int) -> Reply:
        return ok_reply(
            [
                {"name": "web", "listen": "0.0.0.0:80", "active_connections": active},
                {"name": "db", "listen": "0.0.0.0:5432", "active_connections": 1},
            ]
        )

    fakes = FakeWorkers(
        answers={
            "/fake/control-0": {"show routes": routes(2)},
            "/fake/control-1": {"show routes": routes(5)},
        }
    )
    assert await make(fakes, [entry(0), entry(1)])(ShowRoutes()) == [
        {"name": "web", "listen": "0.0.0.0:80", "active_connections": 7},
        {"name": "db", "listen": "0.0.0.0:5432", "active_connections": 2},
    ]


async def test_show_connections_lists_every_worker_with_unique_ids() -> None:
    fakes = FakeWorkers(
        answers={
            "/fake/control-0": {
                "show connections --limit 3": ok_reply([{"id": 1, "route": "web"}]),
            },
            "/fake/control-1": {
                "show connections --limit 3": ok_reply(
                    [{"id": 1, "route": "web"}, {"id": 2, "route": "web"}, {"id": 3}]
                ),
            },
        },
        delays={"/fake/control-0": 0.02},
    )
    rows = await make(fakes, [entry(0), entry(1)])(ShowConnections(limit=3))
    assert rows == [
        {"id": "0:1", "route": "web", "worker": 0},
        {"id": "1:1", "route": "web", "worker": 1},
        {"id": "1:2", "route": "web", "worker": 1},
    ]


async def test_a_worker_that_does_not_answer_makes_show_an_error_that_names_it() -> None:
    fakes = FakeWorkers(
        default=ok_reply([]),
        answers={"/fake/control-1": {"show routes": ControlTimeout("no reply within 1s")}},
    )
    with pytest.raises(CommandFailed) as failed:
        await make(fakes, [entry(0), entry(1)])(ShowRoutes())
    assert "worker 1 (pid 101): no answer: no reply within 1s" in failed.value.message


async def test_the_same_refusal_from_every_worker_is_said_once() -> None:
    fakes = FakeWorkers(default=error_reply("no route 'nope' (the routes: web)"))
    with pytest.raises(CommandFailed) as failed:
        await make(fakes, [entry(0), entry(1)])(ShowUpstreams("nope"))
    assert failed.value.message == "no route 'nope' (the routes: web)"


async def test_show_info_is_the_supervisors_with_each_workers_state() -> None:
    fakes = FakeWorkers()
    info = await make(fakes, [entry(0), entry(1, "starting")])(ShowInfo())
    assert info["pid"] == 1 and info["workers"] == 2
    rows = info["worker_processes"]
    assert [(r["slot"], r["pid"], r["state"]) for r in rows] == [
        (0, 100, "ready"),
        (1, 101, "starting"),
    ]
    assert fakes.sent == []  # the supervisor knows this itself


async def test_a_starting_worker_is_not_asked_to_show() -> None:
    fakes = FakeWorkers(default=ok_reply([{"name": "web"}]))
    await make(fakes, [entry(0), entry(1, "starting")])(ShowRoutes())
    assert [path for path, _ in fakes.sent] == ["/fake/control-0"]


# ----- set and kill ----------------------------------------------------------------------


async def test_set_goes_to_every_worker_and_says_which_applied_it() -> None:
    fakes = FakeWorkers()
    control = make(fakes, [entry(0), entry(1)])
    data = await control(DRAIN)
    assert sorted(fakes.sent) == [
        ("/fake/control-0", format_command(DRAIN)),
        ("/fake/control-1", format_command(DRAIN)),
    ]
    assert data == {
        "applied": [
            {"slot": 0, "pid": 100, "data": {"changed": True}},
            {"slot": 1, "pid": 101, "data": {"changed": True}},
        ],
        "failed": [],
    }
    assert control.memory.commands() == [DRAIN]


async def test_set_refused_by_one_worker_is_an_error_reply_naming_both_sides() -> None:
    fakes = FakeWorkers(
        answers={"/fake/control-1": {format_command(DRAIN): ControlNotRunning("gone (x)")}}
    )
    control = make(fakes, [entry(0), entry(1)])
    with pytest.raises(CommandFailed) as failed:
        await control(DRAIN)
    assert failed.value.message == (
        "applied by worker 0 (pid 100), but not by worker 1 (pid 101):"
        " worker 1 (pid 101): no answer: gone"
    )
    assert failed.value.data == {
        "applied": [{"slot": 0, "pid": 100, "data": {"changed": True}}],
        "failed": [{"slot": 1, "pid": 101, "error": "no answer: gone"}],
    }
    # Applied somewhere: a worker started later gets it too.
    assert control.memory.commands() == [DRAIN]


async def test_set_refused_by_every_worker_is_not_remembered() -> None:
    fakes = FakeWorkers(default=error_reply("no upstream 10.0.0.9:80 in route web"))
    control = make(fakes, [entry(0), entry(1)])
    with pytest.raises(CommandFailed) as failed:
        await control(SetUpstreamWeight("web", "10.0.0.9:80", 5))
    assert failed.value.message == "no upstream 10.0.0.9:80 in route web (in every worker)"
    assert control.memory.commands() == []


async def test_a_starting_worker_is_pending_and_gets_the_change_by_replay() -> None:
    fakes = FakeWorkers()
    starting = entry(1, "starting")
    control = make(fakes, [entry(0), starting])
    data = await control(DRAIN)
    assert data["pending"] == [{"slot": 1, "pid": 101}]
    assert [path for path, _ in fakes.sent] == ["/fake/control-0"]
    fakes.sent.clear()
    outcomes = await control.replay(entry(1))
    assert [o.ok for o in outcomes] == [True]
    # A show info first (is it answering yet?), then the drain.
    assert fakes.sent == [
        ("/fake/control-1", "show info"),
        ("/fake/control-1", format_command(DRAIN)),
    ]


async def test_replay_sends_the_latest_of_each_setting_in_order_without_kill() -> None:
    fakes = FakeWorkers()
    control = make(fakes, [entry(0)])
    maint = SetUpstreamState("web", "b:80", AdminState.MAINT, kill_connections=True)
    await control(DRAIN)
    await control(SetUpstreamWeight("web", "b:80", 7))
    await control(maint)
    await control(SetUpstreamState("web", "10.0.0.2:8000", AdminState.READY))
    fakes.sent.clear()
    await control.replay(entry(3))
    # (`ready` after a drain of the same address leaves nothing to keep for it.)
    assert [line for _, line in fakes.sent] == [
        "show info",
        "set upstream web b:80 weight 7",
        "set upstream web b:80 state maint",
    ]


async def test_replay_waits_for_the_new_workers_control_socket(autojump_clock: object) -> None:
    calls = 0

    def not_yet(command: Command) -> Reply:
        nonlocal calls
        calls += 1
        if calls < 5:
            raise ControlNotRunning("not yet")
        return ok_reply({})

    fakes = FakeWorkers(answers={"/fake/control-1": {"show info": not_yet}})
    control = make(fakes, [entry(0)])
    await control(DRAIN)
    outcomes = await control.replay(entry(1))
    assert calls == 5 and [o.ok for o in outcomes] == [True]


async def test_a_change_made_during_a_replay_reaches_the_worker_after_it() -> None:
    fakes = FakeWorkers(delays={"/fake/control-1": 0.05})
    worker = entry(1)
    control = make(fakes, [entry(0), worker])
    await control(DRAIN)
    fakes.sent.clear()
    ready = SetUpstreamState("web", "10.0.0.2:8000", AdminState.READY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.replay, worker)
        await trio.sleep(0.01)  # the replay holds the worker now
        nursery.start_soon(control, ready)
    to_worker_1 = [line for path, line in fakes.sent if path == "/fake/control-1"]
    # The replay reads the memory after the change was remembered, or before it: either
    # way the worker's last word on the upstream is "ready".
    assert to_worker_1[-1] == format_command(ready)


async def test_kill_goes_to_the_slots_worker_with_its_own_id() -> None:
    fakes = FakeWorkers()
    data = await make(fakes, [entry(0), entry(1)])(KillConnection(42, slot=1))
    assert fakes.sent == [("/fake/control-1", "kill connection 42")]
    assert data == {"slot": 1, "pid": 101, "data": {"changed": True}}


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (KillConnection(42), "with workers, a connection id is SLOT:ID"),
        (KillConnection(42, slot=5), "no connection 5:42: no worker 5 runs"),
    ],
)
async def test_kill_needs_a_slot_that_runs(command: KillConnection, says: str) -> None:
    fakes = FakeWorkers()
    with pytest.raises(CommandFailed, match=says):
        await make(fakes, [entry(0), entry(1)])(command)
    assert fakes.sent == []


async def test_kill_refused_by_the_worker_is_its_error() -> None:
    fakes = FakeWorkers(default=error_reply("no connection 42"))
    with pytest.raises(CommandFailed) as failed:
        await make(fakes, [entry(0)])(KillConnection(42, slot=0))
    assert failed.value.message == "worker 0 (pid 100): no connection 42"


# ----- reload ----------------------------------------------------------------------------


async def test_reload_answers_with_the_rounds_result() -> None:
    data = {"result": "ok", "workers": [{"slot": 0, "pid": 100, "result": "ok"}], "error": None}
    assert await make(FakeWorkers(), [entry(0)], data)(Reload()) == data


async def test_a_refused_reload_is_an_error_reply_with_the_per_worker_results() -> None:
    data = {
        "result": "refused",
        "workers": [{"slot": 0, "pid": 100, "result": "refused", "error": None}],
        "error": "every worker refused the new config; the running config stays",
    }
    with pytest.raises(CommandFailed) as failed:
        await make(FakeWorkers(), [entry(0)], data)(Reload())
    assert failed.value.message == data["error"]
    assert failed.value.data == data


async def test_nothing_reaches_a_worker_that_came_up_before_its_replay_ended() -> None:
    fakes = FakeWorkers(default=ok_reply([]), delays={"/fake/control-1": 0.05})
    # Worker 1 came up, as far as the thread has heard; the loop's view still says it
    # is starting.
    new = entry(1, "starting")
    control = make(fakes, [entry(0), new])
    await control(DRAIN)
    fakes.sent.clear()
    control.worker_up(new)
    weight = SetUpstreamWeight("web", "b:80", 5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control, ShowUpstreams())
        nursery.start_soon(control, weight)
        await trio.sleep(0.01)
        nursery.start_soon(control.replay, new)
    to_worker_1 = [line for path, line in fakes.sent if path == "/fake/control-1"]
    # The replay first (it read the weight too, remembered before it started), then the
    # show and the change itself, which find the worker's states as the others have them.
    replayed = ["show info", format_command(DRAIN), format_command(weight)]
    assert to_worker_1[:3] == replayed
    assert sorted(to_worker_1[3:]) == sorted(["show upstreams", format_command(weight)])


async def test_a_fresh_view_of_the_workers_mid_change_does_not_make_them_pending() -> None:
    fakes = FakeWorkers()
    views = iter(range(1000))

    def workers() -> list[WorkerEntry]:
        # The loop publishes a new view (new counts) between any two reads.
        count = next(views)
        return [
            WorkerEntry(slot, 100 + slot, f"/fake/control-{slot}", "ready", 0.0, count)
            for slot in (0, 1)
        ]

    control = make(fakes, [])
    control.workers = workers
    data = await control(DRAIN)
    assert [item["slot"] for item in data["applied"]] == [0, 1]
    assert "pending" not in data


async def test_a_refused_reload_says_each_workers_own_reason() -> None:
    data = {
        "result": "refused",
        "workers": [
            {"slot": 0, "pid": 100, "result": "refused", "error": None},
            {"slot": 1, "pid": 101, "result": "ok", "error": None},
        ],
        "error": "the new config is not live in every worker",
    }
    fakes = FakeWorkers(
        answers={
            "/fake/control-0": {
                "show info": ok_reply(
                    {"last_reload": {"result": "refused", "error": "web: no such host b"}}
                )
            }
        }
    )
    with pytest.raises(CommandFailed) as failed:
        await make(fakes, [entry(0), entry(1)], data)(Reload())
    assert failed.value.data["workers"][0]["error"] == "web: no such host b"
    assert failed.value.data["workers"][1]["error"] is None
    assert fakes.sent == [("/fake/control-0", "show info")]
