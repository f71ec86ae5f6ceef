"""The bench report: a markdown document for people, a JSON document for programs (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from splicerelay.bench.model import (
    BASELINE,
    Sample,
    Scenario,
    ScenarioResult,
    ratios_to_baseline,
    summarize,
)
from splicerelay.bench.pairs import pair_ratios, pairs_in


@dataclass
class BenchReport:
    """Everything one run produced, and what it had to leave out and why."""

    results: list[ScenarioResult]
    targets: list[str]
    environment: dict[str, Any]
    settings: dict[str, Any]
    skipped_targets: dict[str, str] = field(default_factory=dict)
    skipped_workloads: dict[str, str] = field(default_factory=dict)


# --- numbers --------------------------------------------------------------------------------


def format_number(value: float | None) -> str:
    """Three significant digits, plain notation; "-" for a missing value."""
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def describe_sample(scenario: Scenario, sample: Sample) -> str:
    """One measurement in words, for progress lines."""
    if sample.error is not None:
        return f"FAILED ({sample.error})"
    parts = [
        f"{format_number(scaled(sample.values.get(metric.key), metric.scale))} {metric.label}"
        for metric in scenario.metrics
    ]
    cpu = sample.cpu_per_unit(scenario)
    if scenario.cpu is not None and cpu is not None:
        parts.append(f"{format_number(cpu * scenario.cpu.scale)} {scenario.cpu.label}")
    return ", ".join(parts)


# --- markdown -------------------------------------------------------------------------------


def cell(text: str) -> str:
    """Text made safe for one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def table(header: Sequence[str], align: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; `align` holds "l" or "r" per column."""
    lines = ["| " + " | ".join(cell(text) for text in header) + " |"]
    lines.append("|" + "|".join("---:" if side == "r" else "---" for side in align) + "|")
    lines += ["| " + " | ".join(cell(text) for text in row) + " |" for row in rows]
    return lines


def scenario_targets(result: ScenarioResult, targets: Sequence[str]) -> list[str]:
    return [
        target for target in targets if not (result.scenario.proxies_only and target == "direct")
    ]


def render_scenario(result: ScenarioResult, targets: Sequence[str]) -> list[str]:
    """One scenario's table: medians, ratios to HAProxy, proxy CPU, and every round."""
    scenario = result.scenario
    medians = summarize(result, targets)
    ratios = ratios_to_baseline(scenario, medians)
    # Ratio columns only when the baseline was measured; without it they would be all "-".
    compared = medians.get(BASELINE, {}).get("samples", 0) > 0
    ratio_header = [f"x {BASELINE}"] if compared else []
    header = ["target"]
    for metric in scenario.metrics:
        header += [metric.label, *ratio_header]
    if scenario.cpu is not None:
        header += [scenario.cpu.label, *ratio_header, "proxy CPU"]
    header.append(f"rounds ({scenario.primary.label}) / notes")
    align = ["l"] + ["r"] * (len(header) - 2) + ["l"]
    rows: list[list[str]] = []
    for target in scenario_targets(result, targets):
        if target in medians:
            rows.append(measured_row(result, target, medians[target], ratios[target], compared))
        elif target in result.skipped:
            rows.append([target, "skipped"] + [""] * (len(header) - 3) + [result.skipped[target]])
    lines = [f"## {scenario.name}", "", scenario.title, ""]
    if not rows:
        return [*lines, "No target was measured.", ""]
    return [*lines, *table(header, align, rows), ""]


def measured_row(
    result: ScenarioResult,
    target: str,
    median_row: dict[str, Any],
    ratio_row: dict[str, float | None],
    compared: bool,
) -> list[str]:
    """A measured target's row: each median, its ratio to the baseline when `compared`."""
    scenario = result.scenario
    row = [target]
    for metric in scenario.metrics:
        row.append(format_number(scaled(median_row[metric.key], metric.scale)))
        if compared:
            row.append(format_ratio(ratio_row[metric.key]))
    if scenario.cpu is not None:
        row.append(format_number(scaled(median_row[scenario.cpu.key], scenario.cpu.scale)))
        if compared:
            row.append(format_ratio(ratio_row[scenario.cpu.key]))
        row.append(format_share(median_row["proxy_cpu_share"]))
    samples = result.for_target(target)
    primary = scenario.primary
    rounds = " ".join(
        format_number(scaled(sample.values.get(primary.key), primary.scale))
        if sample.ok
        else "FAILED"
        for sample in samples
    )
    errors = [
        f"round {sample.round + 1}: {sample.error}"
        for sample in samples
        if sample.error is not None
    ]
    row.append("; ".join([rounds, *errors]))
    return row


def render_summary(results: Sequence[ScenarioResult], targets: Sequence[str]) -> list[str]:
    """Each target's ratio to HAProxy on each scenario's headline metric."""
    columns = [result for result in results if summarize(result, targets)]
    if not columns:
        return []
    header = ["target"] + [f"{r.scenario.name} {r.scenario.primary.label}" for r in columns]
    rows: list[list[str]] = []
    for target in targets:
        row = [target]
        for result in columns:
            ratios = ratios_to_baseline(result.scenario, summarize(result, targets))
            value = ratios.get(target, {}).get(result.scenario.primary.key)
            row.append(format_ratio(value))
        if any(text != "-" for text in row[1:]):
            rows.append(row)
    if not rows:
        return []
    return [
        f"## Ratio to {BASELINE}",
        "",
        "Each target's median over HAProxy's, on each workload's headline number "
        "(higher is better for rates, lower for latency, memory and fds).",
        "",
        *table(header, ["l"] + ["r"] * len(columns), rows),
        "",
    ]


def render_pairs(results: Sequence[ScenarioResult], targets: Sequence[str]) -> list[str]:
    """Targets side by side (`pairs`): one's medians over the other's, on each workload's
    headline number and, where there is one, its CPU per unit."""
    pairs = pairs_in(targets)
    header = ["pair", "shows"]
    columns: list[tuple[ScenarioResult, str]] = []
    for result in results:
        if any(pair_ratios(pair, result) is not None for pair in pairs):
            scenario = result.scenario
            columns.append((result, scenario.primary.key))
            header.append(f"{scenario.name} {scenario.primary.label}")
            if scenario.cpu is not None:
                columns.append((result, scenario.cpu.key))
                header.append(f"{scenario.name} {scenario.cpu.label}")
    rows: list[list[str]] = []
    for pair in pairs:
        row = [pair.name, pair.meaning]
        for result, key in columns:
            ratios = pair_ratios(pair, result)
            row.append(format_ratio(None if ratios is None else ratios[key]))
        if any(text != "-" for text in row[2:]):
            rows.append(row)
    if not rows:
        return []
    return [
        "## Side by side",
        "",
        "The first target's median over the second's, in the same run.",
        "",
        *table(header, ["l", "l"] + ["r"] * (len(header) - 2), rows),
        "",
    ]


def render_markdown(report: BenchReport) -> str:
    """The whole human-readable report, as markdown."""
    environment = report.environment
    lines = [
        "# splicerelay bench",
        "",
        f"Medians of {report.settings.get('rounds', '?')} interleaved round(s) per target; "
        f"{environment.get('cpus', '?')} CPUs, Linux {environment.get('kernel', '?')}, "
        f"Python {environment.get('python', '?')}.",
        "Proxy CPU is the proxy process tree's CPU time (from /proc) per wall second of the "
        "run; 100% is one core.",
    ]
    pin = report.settings.get("pin")
    if pin:
        lines.append(
            f"Pinned (--pin): every proxy on CPU {cpu_list(pin['proxies'])}; the load "
            f"generators, their servers and the bench on CPU {cpu_list(pin['load'])}."
        )
    versions = [version for version in environment.get("tools", {}).values() if version]
    if versions:
        lines.append("Peers: " + "; ".join(versions) + ".")
    skips = [f"- target {name}: {reason}" for name, reason in report.skipped_targets.items()]
    skips += [f"- workload {name}: {reason}" for name, reason in report.skipped_workloads.items()]
    if skips:
        lines += ["", "Skipped:", "", *skips]
    lines.append("")
    lines += render_summary(report.results, report.targets)
    lines += render_pairs(report.results, report.targets)
    for result in report.results:
        lines += render_scenario(result, report.targets)
    return "\n".join(lines).rstrip("\n") + "\n"


def cpu_list(cpus: Sequence[int]) -> str:
    return ", ".join(str(cpu) for cpu in cpus)


# --- JSON -----------------------------------------------------------------------------------


def report_json(report: BenchReport) -> dict[str, Any]:
    """Every raw sample, the medians and the ratios to HAProxy, by scenario."""
    workloads: dict[str, Any] = {}
    for result in report.results:
        scenario = result.scenario
        medians = summarize(result, report.targets)
        workloads[scenario.name] = {
            "workload": scenario.workload,
            "title": scenario.title,
            "primary": scenario.primary.key,
            "metrics": [asdict(metric) for metric in scenario.metrics],
            "cpu": None if scenario.cpu is None else asdict(scenario.cpu),
            "samples": [sample.to_json(scenario) for sample in result.samples],
            "medians": medians,
            "ratios_to_haproxy": ratios_to_baseline(scenario, medians),
            "pairs": {
                pair.name: ratios
                for pair in pairs_in(report.targets)
                if (ratios := pair_ratios(pair, result)) is not None
            },
            "skipped": dict(result.skipped),
        }
    return {
        "settings": report.settings,
        "environment": report.environment,
        "skipped_targets": dict(report.skipped_targets),
        "skipped_workloads": dict(report.skipped_workloads),
        "workloads": workloads,
    }
