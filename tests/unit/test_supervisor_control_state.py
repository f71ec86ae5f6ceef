"""The supervisor's memory of admin commands, and its reload replies (pure parts)."""

from __future__ import annotations

from splicerelay.config import parse_config
from splicerelay.protocol.control import AdminState, SetUpstreamState, SetUpstreamWeight
from splicerelay.workers.admin_memory import AdminMemory, configured_weight
from splicerelay.workers.control_link import reload_refused, round_result
from splicerelay.workers.reload_rounds import ReloadRounds

CONFIG = parse_config(
    "routes:\n"
    "  - name: web\n"
    "    listen: 127.0.0.1:8080\n"
    "    upstreams:\n"
    "      - address: 10.0.0.2:8000\n"
    "      - address: backend.internal:8000\n"
    "        weight: 3\n"
    "  - name: db\n"
    "    listen: 127.0.0.1:5432\n"
    "    upstreams:\n"
    "      - address: 10.0.0.5:5432\n",
    "relay.yaml",
)
WITHOUT_DB = parse_config(
    "routes:\n"
    "  - name: web\n"
    "    listen: 127.0.0.1:8080\n"
    "    upstreams:\n"
    "      - address: backend.internal:8000\n",
    "relay.yaml",
)


def state(route: str, address: str, value: AdminState, kill: bool = False) -> SetUpstreamState:
    return SetUpstreamState(route, address, value, kill)


def test_the_configured_weight_of_an_address_or_a_member_label() -> None:
    assert configured_weight(CONFIG, "web", "10.0.0.2:8000") == 1
    assert configured_weight(CONFIG, "web", "backend.internal:8000@10.1.0.7") == 3
    assert configured_weight(CONFIG, "web", "10.0.0.5:5432") is None
    assert configured_weight(CONFIG, "nope", "10.0.0.2:8000") is None


def test_commands_come_back_in_order_as_the_workers_store_keeps_them() -> None:
    memory = AdminMemory()
    memory.remember(state("web", "backend.internal:8000", AdminState.DRAIN), CONFIG)
    memory.remember(state("web", "backend.internal:8000@10.1.0.7", AdminState.READY), CONFIG)
    memory.remember(SetUpstreamWeight("web", "10.0.0.2:8000", 9), CONFIG)
    memory.remember(state("db", "10.0.0.5:5432", AdminState.MAINT, kill=True), CONFIG)
    assert memory.commands() == [
        state("web", "backend.internal:8000", AdminState.DRAIN),
        state("web", "backend.internal:8000@10.1.0.7", AdminState.READY),
        SetUpstreamWeight("web", "10.0.0.2:8000", 9),
        state("db", "10.0.0.5:5432", AdminState.MAINT),  # never --kill-connections
    ]
    assert memory.snapshot()[2] == {
        "route": "web",
        "address": "10.0.0.2:8000",
        "weight": 9,
        "configured_weight": 1,
    }


def test_what_names_nothing_in_the_config_is_not_kept() -> None:
    memory = AdminMemory()
    assert memory.remember(state("web", "10.0.0.5:5432", AdminState.DRAIN), CONFIG) is None
    assert memory.remember(SetUpstreamWeight("nope", "10.0.0.2:8000", 2), CONFIG) is None
    assert memory.commands() == []


def test_restore_undoes_a_command_that_no_worker_applied() -> None:
    memory = AdminMemory()
    first = state("web", "10.0.0.2:8000", AdminState.DRAIN)
    memory.remember(first, CONFIG)
    undo = memory.remember(state("web", "10.0.0.2:8000", AdminState.MAINT), CONFIG)
    assert undo is not None
    memory.restore(undo)
    assert memory.commands() == [first]


def test_restore_keeps_a_command_remembered_since() -> None:
    memory = AdminMemory()
    undo = memory.remember(state("web", "10.0.0.2:8000", AdminState.DRAIN), CONFIG)
    later = state("db", "10.0.0.5:5432", AdminState.DRAIN)
    memory.remember(later, CONFIG)
    assert undo is not None
    memory.restore(undo)
    assert later in memory.commands()


def test_prune_forgets_what_left_the_config_as_a_workers_reload_does() -> None:
    memory = AdminMemory()
    kept = state("web", "backend.internal:8000@10.1.0.7", AdminState.DRAIN)
    memory.remember(state("web", "10.0.0.2:8000", AdminState.DRAIN), CONFIG)
    memory.remember(kept, CONFIG)
    memory.remember(SetUpstreamWeight("db", "10.0.0.5:5432", 4), CONFIG)
    memory.remember(SetUpstreamWeight("web", "backend.internal:8000", 5), CONFIG)
    assert memory.prune(CONFIG) == []
    # WITHOUT_DB drops db and 10.0.0.2:8000, and changes backend's configured weight:
    # the operator's weight for it goes too.
    assert sorted(memory.prune(WITHOUT_DB)) == [
        ("db", "10.0.0.5:5432"),
        ("web", "10.0.0.2:8000"),
        ("web", "backend.internal:8000"),
    ]
    assert memory.commands() == [kept]


# ----- the reply to `reload` ------------------------------------------------------------


def outcome_of(succeeded: list[int], failed: list[int], silent: list[int]):  # type: ignore[no-untyped-def]
    rounds: ReloadRounds[str] = ReloadRounds("old", timeout=60.0)
    rounds.start("new", {*succeeded, *failed, *silent}, now=0.0)
    for pid in succeeded:
        rounds.answered(pid, True)
    for pid in failed:
        rounds.answered(pid, False)
    [outcome] = rounds.finish(now=0.0 if not silent else 61.0)
    return outcome


SLOTS = {100: 0, 101: 1, 102: 2}


def test_a_reload_every_worker_applied_is_ok_with_each_worker() -> None:
    assert round_result(outcome_of([101, 100], [], []), SLOTS, 60.0) == {
        "result": "ok",
        "workers": [
            {"slot": 0, "pid": 100, "result": "ok", "error": None},
            {"slot": 1, "pid": 101, "result": "ok", "error": None},
        ],
        "error": None,
    }


def test_a_reload_refused_by_all_says_the_running_config_stays() -> None:
    data = round_result(outcome_of([], [100, 101], []), SLOTS, 60.0)
    assert data["result"] == "refused"
    assert data["error"] == "every worker refused the new config; the running config stays"
    assert [w["result"] for w in data["workers"]] == ["refused", "refused"]


def test_a_reload_live_in_some_workers_only_is_refused_and_names_the_others() -> None:
    data = round_result(outcome_of([100], [101], [102]), SLOTS, 60.0)
    assert data["result"] == "refused"
    assert data["workers"] == [
        {"slot": 0, "pid": 100, "result": "ok", "error": None},
        {"slot": 1, "pid": 101, "result": "refused", "error": None},
        {
            "slot": 2,
            "pid": 102,
            "result": "no answer",
            "error": "did not report the reload within 60s",
        },
    ]
    assert data["error"] == (
        "the new config is not live in every worker:"
        " worker 1 (pid 101): refused, worker 2 (pid 102): no answer"
    )


def test_a_reload_the_supervisor_refused_names_no_worker() -> None:
    assert reload_refused("relay.yaml:3: routes: bad") == {
        "result": "refused",
        "workers": [],
        "error": "relay.yaml:3: routes: bad",
    }
