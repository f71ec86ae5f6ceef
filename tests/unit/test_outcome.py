"""Outcomes: the `outcome` label values, and that every one is exported from the start."""

from __future__ import annotations

import re

from splicerelay.datapath.stats import RelayStats
from splicerelay.ops.metrics import RelayCollector
from splicerelay.protocol.outcome import InspectFailure, Outcome


def test_internal_error_is_its_own_label_value():
    assert Outcome.INTERNAL_ERROR.value == "internal_error"
    assert Outcome.INTERNAL_ERROR is not Outcome.UPSTREAM_RESET


def test_label_values_are_distinct_snake_case():
    values = [outcome.value for outcome in Outcome]
    assert len(set(values)) == len(values)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", value) for value in values)


def exported(stats: RelayStats, route: str) -> dict[tuple[str, str], float]:
    families = {family.name: family for family in RelayCollector(stats, "0").collect()}
    return {
        (sample.labels["outcome"], sample.labels["reason"]): sample.value
        for sample in families["splicerelay_connections"].samples
        if sample.name == "splicerelay_connections_total" and sample.labels["route"] == route
    }


def test_every_outcome_is_exported_at_zero_before_any_connection():
    """So that rate() and alerts on internal_error work before the first one happens.
    The outcomes of a listener that routes by TLS ClientHello are its own."""
    stats = RelayStats()
    stats.route("web")
    tls_only = {Outcome.NO_ROUTE, Outcome.TLS_INSPECT_FAILED, Outcome.ROUTE_LIMIT}
    assert exported(stats, "web") == {
        (outcome.value, ""): 0 for outcome in Outcome if outcome not in tls_only
    }
    assert ("internal_error", "") in exported(stats, "web")


def test_a_tls_listener_exports_no_route_and_each_inspect_failure_reason():
    stats = RelayStats()
    listener = stats.route("0.0.0.0:443")
    listener.inspects_tls = True
    listener.outcomes["tls_inspect_failed"] += 3
    listener.inspect_failures["not_tls"] += 2
    listener.inspect_failures["timeout"] += 1
    samples = exported(stats, "0.0.0.0:443")
    assert samples[("no_route", "")] == 0
    assert {reason for (outcome, reason) in samples if outcome == "tls_inspect_failed"} == {
        failure.value for failure in InspectFailure
    }
    assert samples[("tls_inspect_failed", "not_tls")] == 2
    assert samples[("tls_inspect_failed", "timeout")] == 1
    assert samples[("tls_inspect_failed", "malformed")] == 0
    assert ("completed", "") in samples
