"""What `splicerelay bench` measures, and the statistics over it (pure: no processes).

A scenario is one measured load (bulk, rr, ...) with the metrics it reports; a sample is
one run of that load against one target; the report gives the median of each metric over
the rounds, and each target's ratio to HAProxy, the baseline the relay is held against.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

BASELINE = "haproxy"


@dataclass(frozen=True)
class Metric:
    """One reported number: its JSON key (base units), table label and display scale."""

    key: str
    label: str
    scale: float = 1.0
    higher_is_better: bool = True


@dataclass(frozen=True)
class CpuCost:
    """The proxy's CPU time per unit of work: per GB moved, or per million requests."""

    key: str
    label: str
    amount_per_unit: float
    scale: float = 1.0


BITS_PER_SECOND = Metric("bits_per_second", "Gbit/s", 1e-9)
REQUESTS_PER_SECOND = Metric("requests_per_second", "req/s")
P50_SECONDS = Metric("p50_seconds", "p50 us", 1e6, higher_is_better=False)
P99_SECONDS = Metric("p99_seconds", "p99 us", 1e6, higher_is_better=False)
RSS_PER_CONNECTION = Metric("rss_kib_per_connection", "RSS KiB/conn", higher_is_better=False)
PSS_PER_CONNECTION = Metric("pss_kib_per_connection", "PSS KiB/conn", higher_is_better=False)
FDS_PER_CONNECTION = Metric("fds_per_connection", "fds/conn", higher_is_better=False)

# GB = 1e9 bytes. CPU seconds per million requests is CPU microseconds per request.
CPU_PER_GB = CpuCost("cpu_seconds_per_gb", "CPU s/GB", 1e9)
CPU_PER_MILLION_REQUESTS = CpuCost("cpu_seconds_per_million_requests", "CPU us/req", 1e6)


@dataclass(frozen=True)
class Scenario:
    """One measured load. The first metric is the headline one (summary, chart, ratios).

    `proxies_only`: the load says nothing about a direct connection (idle connections
    cost the proxy, and there is no proxy without one).
    """

    name: str
    workload: str
    title: str
    metrics: tuple[Metric, ...]
    cpu: CpuCost | None = None
    proxies_only: bool = False

    @property
    def primary(self) -> Metric:
        return self.metrics[0]


@dataclass(frozen=True)
class Measurement:
    """What one load-generator run returns: its metrics and the amount of work it did."""

    values: dict[str, float]
    amount: int


@dataclass
class Sample:
    """One run of a scenario against one target."""

    target: str
    round: int
    values: dict[str, float] = field(default_factory=dict)
    amount: int = 0
    wall_seconds: float = 0.0
    proxy_cpu_seconds: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def cpu_per_unit(self, scenario: Scenario) -> float | None:
        """Proxy CPU seconds per unit of work (per GB, per million requests)."""
        if scenario.cpu is None or self.proxy_cpu_seconds is None or self.amount <= 0:
            return None
        return self.proxy_cpu_seconds / (self.amount / scenario.cpu.amount_per_unit)

    def cpu_share(self) -> float | None:
        """Proxy CPU seconds per wall second: 1.0 is one core kept busy."""
        if self.proxy_cpu_seconds is None or self.wall_seconds <= 0:
            return None
        return self.proxy_cpu_seconds / self.wall_seconds

    def to_json(self, scenario: Scenario) -> dict[str, Any]:
        document: dict[str, Any] = {"target": self.target, "round": self.round}
        document.update({metric.key: self.values.get(metric.key) for metric in scenario.metrics})
        document.update(
            {
                "amount": self.amount,
                "wall_seconds": self.wall_seconds,
                "proxy_cpu_seconds": self.proxy_cpu_seconds,
                "proxy_cpu_share": self.cpu_share(),
                "error": self.error,
            }
        )
        if scenario.cpu is not None:
            document[scenario.cpu.key] = self.cpu_per_unit(scenario)
        return document


@dataclass
class ScenarioResult:
    """Every sample of one scenario in the order taken, and the targets it had to skip."""

    scenario: Scenario
    samples: list[Sample] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def for_target(self, target: str) -> list[Sample]:
        return [sample for sample in self.samples if sample.target == target]


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None when there are none."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def summarize(result: ScenarioResult, targets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Medians per target over its successful samples, for each target that has samples."""
    scenario = result.scenario
    medians: dict[str, dict[str, Any]] = {}
    for target in targets:
        samples = result.for_target(target)
        if not samples:
            continue
        good = [sample for sample in samples if sample.ok]
        row: dict[str, Any] = {
            metric.key: median(sample.values.get(metric.key) for sample in good)
            for metric in scenario.metrics
        }
        if scenario.cpu is not None:
            row[scenario.cpu.key] = median(sample.cpu_per_unit(scenario) for sample in good)
            row["proxy_cpu_share"] = median(sample.cpu_share() for sample in good)
        row["samples"] = len(good)
        row["failed"] = len(samples) - len(good)
        medians[target] = row
    return medians


def ratio_keys(scenario: Scenario) -> list[str]:
    """The keys compared with the baseline: every metric, then CPU per unit."""
    keys = [metric.key for metric in scenario.metrics]
    return keys + ([scenario.cpu.key] if scenario.cpu is not None else [])


def ratios_to_baseline(
    scenario: Scenario, medians: dict[str, dict[str, Any]], baseline: str = BASELINE
) -> dict[str, dict[str, float | None]]:
    """Each target's medians divided by the baseline's; None where either is missing."""
    reference = medians.get(baseline, {})
    return {
        target: {key: ratio(row.get(key), reference.get(key)) for key in ratio_keys(scenario)}
        for target, row in medians.items()
    }
