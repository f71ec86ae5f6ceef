"""Outcomes: the `outcome` label values, and that every one is exported from the start."""

from __future__ import annotations

import re

from splicerelay.datapath.stats import RelayStats
from splicerelay.ops.metrics import RelayCollector
from splicerelay.protocol.outcome import Outcome


def test_internal_error_is_its_own_label_value():
    assert Outcome.INTERNAL_ERROR.value == "internal_error"
    assert Outcome.INTERNAL_ERROR is not Outcome.UPSTREAM_RESET


def test_label_values_are_distinct_snake_case():
    values = [outcome.value for outcome in Outcome]
    assert len(set(values)) == len(values)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", value) for value in values)


def test_every_outcome_is_exported_at_zero_before_any_connection():
    """So that rate() and alerts on internal_error work before the first one happens."""
    stats = RelayStats()
    stats.route("web")
    families = {family.name: family for family in RelayCollector(stats, "0").collect()}
    samples = {
        sample.labels["outcome"]: sample.value
        for sample in families["splicerelay_connections"].samples
        if sample.name == "splicerelay_connections_total" and sample.labels["route"] == "web"
    }
    assert samples == {outcome.value: 0 for outcome in Outcome}
    assert "internal_error" in samples
