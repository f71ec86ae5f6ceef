"""The admin store: whatever it keeps, members get what replaying every command gives.

The store drops settings that later ones override, or that change nothing; a property
test checks that this never changes the outcome, and that a snapshot carries it whole.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.config import parse_config
from splicerelay.datapath.stats import RouteStats
from splicerelay.protocol.control import AdminState
from splicerelay.relay.admin_store import AdminStore, SnapshotError, Weight
from splicerelay.relay.upstreams import UpstreamRuntime, make_upstreams
from tests.support.names import FakeResolver

CONFIG = """\
routes:
  - name: web
    listen: 127.0.0.1:1
    upstreams:
      - {address: "10.0.0.1:80", weight: 2}
      - {address: "pool.test:80", weight: 3}
  - name: api
    listen: 127.0.0.1:2
    upstreams: [{address: "10.0.0.1:80"}]
"""
CONFIGURED = {"10.0.0.1:80": 2, "pool.test:80": 3}
TARGETS = ["10.0.0.1:80", "pool.test:80", "pool.test:80@10.0.1.1", "pool.test:80@10.0.1.2"]
RESOLVER = FakeResolver({"pool.test": ["10.0.1.1", "10.0.1.2"]})

Command = tuple[str, str, AdminState | int]  # route, target, state or weight


ROUTE = parse_config(CONFIG, "relay.yaml").routes[0]


def members() -> list[UpstreamRuntime]:
    return make_upstreams(ROUTE.upstreams, None, RouteStats("web").upstream, RESOLVER, route="web")


def names(target: str, member: UpstreamRuntime) -> bool:
    return target in (member.label, str(member.config.address))


def replayed(commands: list[Command]) -> dict[str, tuple[str, int]]:
    """The model: every command on route web applied in turn to the members it names."""
    fresh = members()
    result = {member.label: ("ready", member.config.weight) for member in fresh}
    for member in fresh:
        for route, target, value in commands:
            if route != "web" or not names(target, member):
                continue
            state, weight = result[member.label]
            if isinstance(value, AdminState):
                state = value.value
            else:
                weight = value
            result[member.label] = (state, weight)
    return result


def applied(store: AdminStore) -> dict[str, tuple[str, int]]:
    fresh = members()
    store.apply("web", fresh)
    return {member.label: (member.admin.value, member.weight) for member in fresh}


def record(store: AdminStore, commands: list[Command]) -> None:
    for route, target, value in commands:
        if isinstance(value, AdminState):
            store.record(route, target, value)
        else:
            store.record(route, target, Weight(value, CONFIGURED[target.split("@")[0]]))


commands = st.lists(
    st.tuples(
        st.sampled_from(["web", "api"]),
        st.sampled_from(TARGETS),
        st.one_of(st.sampled_from(list(AdminState)), st.integers(1, 5)),
    ),
    max_size=12,
)


@settings(max_examples=400, database=None, derandomize=True, deadline=None)
@given(commands)
def test_members_get_what_replaying_every_command_gives(history: list[Command]) -> None:
    store = AdminStore()
    record(store, history)
    assert applied(store) == replayed(history)
    # A snapshot loaded by another process's store gives the same.
    other = AdminStore()
    other.load(store.snapshot())
    assert applied(other) == replayed(history)
    # Nothing is kept that changes nothing: back to ready and configured, it is empty.
    for route in ("web", "api"):
        for target in TARGETS:
            configured = CONFIGURED[target.split("@")[0]]
            store.record(route, target, AdminState.READY)
            store.record(route, target, Weight(configured, configured))
    assert len(store) == 0


def test_prune_drops_what_left_the_config_and_weights_it_changed() -> None:
    store = AdminStore()
    store.record("web", "pool.test:80@10.0.1.1", AdminState.DRAIN)
    store.record("web", "10.0.0.1:80", Weight(5, 2))
    store.record("web", "pool.test:80", Weight(7, 3))
    store.record("api", "10.0.0.1:80", AdminState.MAINT)
    changed = CONFIG.replace('{address: "pool.test:80", weight: 3}', '{address: "other:80"}')
    changed = changed.replace('{address: "10.0.0.1:80", weight: 2}', '{address: "10.0.0.1:80"}')
    dropped = store.prune(parse_config(changed, "relay.yaml"))
    assert dropped == [
        ("web", "pool.test:80@10.0.1.1"),
        ("web", "10.0.0.1:80"),
        ("web", "pool.test:80"),
    ]
    assert store.snapshot() == [{"route": "api", "address": "10.0.0.1:80", "state": "maint"}]


def test_load_takes_nothing_from_a_bad_snapshot() -> None:
    store = AdminStore()
    good = {"route": "web", "address": "10.0.0.1:80", "state": "drain"}
    for bad in (
        "drain",
        {"route": "web", "state": "drain"},
        {"route": "web", "address": "10.0.0.1:80", "state": "off"},
        {"route": "web", "address": "10.0.0.1:80", "weight": 0, "configured_weight": 1},
        {"route": "web", "address": "10.0.0.1:80", "weight": True, "configured_weight": 1},
    ):
        try:
            store.load([good, bad])
        except SnapshotError:
            pass
        else:
            raise AssertionError(f"took {bad!r}")
        assert len(store) == 0
