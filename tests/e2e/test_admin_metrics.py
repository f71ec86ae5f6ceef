"""The admin-state and weight gauges of a real relay, alone and with workers.

Each upstream has one 0/1 series per admin state, and its weight; under a supervisor
the workers' copies merge to the same values, not their sum.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.harness import RelayFactory, free_port, poll_until, relay_config


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
    if shutil.which("promtool"):
        result = subprocess.run(
            ["promtool", "check", "metrics"],
            input=relay.scrape_text(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr
