"""One exposition from many: summing the /metrics of worker processes (pure functions).

With `workers` above 1 every worker counts its own connections and bytes; Prometheus
must see one relay. The supervisor parses each worker's exposition text, and a sample
with the same name and labels in several workers becomes one sample holding their sum:
counters, gauges such as connections_active, histogram buckets, sums and counts all add
up. A few gauges state a fact rather than an amount (the running version, whether an
upstream is up, its admin state and weight); for those the largest value wins. The limit gauges
(splicerelay_max_connections and _global) add up too, on purpose: every worker enforces
the limits on its own, so their sum is what the relay as a whole admits, and
connections_active (summed) divided by it is how full the relay is.

A worker that exits takes its counters with it. So that totals never go backwards, the
supervisor keeps what the dead worker last reported in a *retired* tally (its counters
and histograms; its gauges died with it) and adds that to every later merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Gauges that are the same fact in every worker: merged with max(), not added up.
TAKE_MAX = frozenset(
    {
        "splicerelay_build_info",
        "splicerelay_upstream_up",
        "splicerelay_upstream_admin_state",
        "splicerelay_upstream_weight",
    }
)
# Family types whose samples only grow while a process lives: what a dead worker leaves.
CUMULATIVE_TYPES = frozenset({"counter", "histogram", "summary"})

Labels = tuple[tuple[str, str], ...]
SampleKey = tuple[str, Labels]  # sample name (e.g. x_bucket, x_total) and sorted labels


@dataclass
class Family:
    """One metric family: its name as the parser gives it (no _total), type and help."""

    name: str
    type: str
    documentation: str
    samples: dict[SampleKey, float] = field(default_factory=dict)


Exposition = dict[str, Family]  # by family name, in the order the families came


def parse_exposition(text: str) -> Exposition:
    """Prometheus text format → families. Raises ValueError on text that does not parse."""
    return from_metrics(text_string_to_metric_families(text))


def from_metrics(metrics: Iterable[Metric]) -> Exposition:
    """prometheus_client Metric objects (a parser's or a collector's) → families."""
    exposition: Exposition = {}
    for metric in metrics:
        family = exposition.setdefault(
            metric.name, Family(metric.name, metric.type, metric.documentation)
        )
        for sample in metric.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            family.samples[key] = sample.value
    return exposition


def merge(expositions: Iterable[Exposition], take_max: frozenset[str] = TAKE_MAX) -> Exposition:
    """One exposition whose every sample sums the same sample across `expositions`.

    Families in `take_max` keep the largest value instead. Families and samples keep the
    order in which they were first seen (histogram buckets stay in order). A family that
    two inputs give different types keeps the first type, and only that input's samples.
    """
    merged: Exposition = {}
    for exposition in expositions:
        for name, family in exposition.items():
            target = merged.get(name)
            if target is None:
                merged[name] = Family(name, family.type, family.documentation, dict(family.samples))
                continue
            if target.type != family.type:
                continue
            combine = max if name in take_max else _add
            for key, value in family.samples.items():
                previous = target.samples.get(key)
                target.samples[key] = value if previous is None else combine(previous, value)
    return merged


def _add(left: float, right: float) -> float:
    return left + right


def cumulative_part(exposition: Exposition) -> Exposition:
    """The families of `exposition` that keep counting over a process's life."""
    return {
        name: Family(name, family.type, family.documentation, dict(family.samples))
        for name, family in exposition.items()
        if family.type in CUMULATIVE_TYPES
    }


def without(exposition: Exposition, names: Iterable[str]) -> Exposition:
    """`exposition` less the families named."""
    dropped = set(names)
    return {name: family for name, family in exposition.items() if name not in dropped}


def to_metrics(exposition: Exposition) -> list[Metric]:
    """prometheus_client Metric objects, for a collector to yield."""
    metrics = []
    for family in exposition.values():
        metric = Metric(family.name, family.documentation, family.type)
        for (sample_name, labels), value in family.samples.items():
            metric.add_sample(sample_name, dict(labels), value)
        metrics.append(metric)
    return metrics


def counter_family(name: str, documentation: str, values: Sequence[tuple[Labels, float]]) -> Family:
    """A counter family named `name` (without _total) with one sample per label set."""
    return Family(
        name,
        "counter",
        documentation,
        {(f"{name}_total", labels): value for labels, value in values},
    )


def gauge_family(name: str, documentation: str, values: Sequence[tuple[Labels, float]]) -> Family:
    return Family(name, "gauge", documentation, {(name, labels): value for labels, value in values})
