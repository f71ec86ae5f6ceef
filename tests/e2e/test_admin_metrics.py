"""The admin-state and weight gauges of a real relay, alone and with workers.

Each upstream has one 0/1 series per admin state, and its weight; under a supervisor
the workers' copies merge to the same values, not their sum. What `splicerelay ctl`
sets shows there, and promtool finds nothing to fix in either case.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.ctl import ctl_json
from tests.support.harness import Relay, RelayFactory, free_port, poll_until, relay_config


@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_upstream_starts_ready_with_its_configured_weight(
    relay_factory: RelayFactory, workers: str
) -> None:
    first, second = free_port(), free_port()
    text = f"workers: {workers}\n" + relay_config(free_port(), first, second)
    plain = f"address: 127.0.0.1:{second}\n"
    text = text.replace(plain, plain + "        weight: 3\n")
    relay = relay_factory.start(text)

    def exported() -> bool:
        return "splicerelay_upstream_admin_state{" in relay.scrape_text()

    # With workers, the supervisor serves the merge once every worker has answered.
    poll_until(exported, 10, "the admin-state gauges")
    metrics = relay.metrics()
    for port, weight in ((first, 1), (second, 3)):
        upstream = f"127.0.0.1:{port}"
        states = {
            state: metrics.get(
                "splicerelay_upstream_admin_state", route="test", upstream=upstream, state=state
            )
            for state in ("ready", "drain", "maint")
        }
        assert states == {"ready": 1, "drain": 0, "maint": 0}
        assert metrics.get("splicerelay_upstream_weight", route="test", upstream=upstream) == weight


def states_of(relay: Relay, upstream: str) -> dict[str, float]:
    metrics = relay.metrics()
    return {
        state: metrics.get(
            "splicerelay_upstream_admin_state", route="test", upstream=upstream, state=state
        )
        for state in ("ready", "drain", "maint")
    }


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool (Debian package prometheus) is not installed"
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_what_ctl_sets_is_exported_and_promtool_finds_nothing_to_fix(
    relay_factory: RelayFactory, workers: str
) -> None:
    first, second, third = (f"127.0.0.1:{free_port()}" for _ in range(3))
    text = f"workers: {workers}\n" + relay_config(
        free_port(), *(int(address.rsplit(":", 1)[1]) for address in (first, second, third))
    )
    relay = relay_factory.start(text)
    poll_until(
        lambda: "splicerelay_upstream_admin_state{" in relay.scrape_text(),
        10,
        "the admin-state gauges",
    )
    ctl_json("set", "upstream", "test", first, "state", "drain")
    ctl_json("set", "upstream", "test", second, "state", "maint")
    ctl_json("set", "upstream", "test", third, "weight", "5")

    expected = {
        first: {"ready": 0, "drain": 1, "maint": 0},
        second: {"ready": 0, "drain": 0, "maint": 1},
        third: {"ready": 1, "drain": 0, "maint": 0},
    }

    def exported() -> bool:
        # With workers, the supervisor's merge may lag a scrape behind the workers.
        return all(states_of(relay, upstream) == want for upstream, want in expected.items())

    poll_until(exported, 10, "the states set over the control socket")
    metrics = relay.metrics()
    weights = [
        metrics.get("splicerelay_upstream_weight", route="test", upstream=upstream)
        for upstream in (first, second, third)
    ]
    assert weights == [1, 1, 5]
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=relay.scrape_text(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
