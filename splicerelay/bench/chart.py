"""The bench chart: one bar panel per workload, drawn with matplotlib when it is installed."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

from splicerelay.bench.model import BASELINE, ScenarioResult, summarize
from splicerelay.bench.report import format_number

COLUMNS = 2
PANEL_WIDTH = 6.0
PANEL_HEIGHT = 3.2
BAR_COLOR = "#4c72b0"
BASELINE_COLOR = "#dd8452"
SECOND_COLOR = "#8fa8d6"


def chart_panels(
    results: Sequence[ScenarioResult], targets: Sequence[str]
) -> list[tuple[str, list[str], list[tuple[str, list[float]]]]]:
    """What to draw: per scenario its title, the targets measured, and one series per
    metric drawn (the headline metric, plus p99 next to p50 for latency), scaled for
    display. Scenarios where no target has a number are left out."""
    panels = []
    for result in results:
        scenario = result.scenario
        medians = summarize(result, targets)
        metrics = scenario.metrics[:2] if scenario.workload == "latency" else scenario.metrics[:1]
        measured = [
            target
            for target in targets
            if all(medians.get(target, {}).get(metric.key) is not None for metric in metrics)
        ]
        if not measured:
            continue
        series = [
            (metric.label, [medians[target][metric.key] * metric.scale for target in measured])
            for metric in metrics
        ]
        labels = " and ".join(metric.label for metric in metrics)
        panels.append((f"{scenario.name}: {labels}", measured, series))
    return panels


def write_png(path: str, results: Sequence[ScenarioResult], targets: Sequence[str]) -> str | None:
    """Draw the chart into `path`; return why not when it cannot be drawn, else None."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib is not installed (pip install 'splicerelay[bench]')"
    matplotlib.use("Agg")  # no display: draw to a file only
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    panels = chart_panels(results, targets)
    if not panels:
        return "no workload has a number to draw"
    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    figure, axes = pyplot.subplots(
        rows,
        columns,
        figsize=(PANEL_WIDTH * columns, PANEL_HEIGHT * rows),
        squeeze=False,
    )
    try:
        for index, (title, measured, series) in enumerate(panels):
            draw_panel(axes[index // COLUMNS][index % COLUMNS], title, measured, series)
        for index in range(len(panels), rows * columns):
            axes[index // COLUMNS][index % COLUMNS].set_visible(False)
        figure.suptitle("splicerelay bench: medians per target (HAProxy in orange)")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        pyplot.close(figure)
    return None


def draw_panel(
    axis: Any, title: str, targets: list[str], series: list[tuple[str, list[float]]]
) -> None:
    """Horizontal bars, one group per target, the value written at the end of each bar."""
    height = 0.8 / len(series)
    positions = list(range(len(targets)))
    for number, (label, values) in enumerate(series):
        offsets = [position + (number - (len(series) - 1) / 2) * height for position in positions]
        colors = [
            BASELINE_COLOR if target == BASELINE else (BAR_COLOR if number == 0 else SECOND_COLOR)
            for target in targets
        ]
        bars = axis.barh(offsets, values, height=height, color=colors, label=label)
        axis.bar_label(bars, labels=[format_number(value) for value in values], fontsize=8)
    axis.set_yticks(positions, labels=targets)
    axis.invert_yaxis()
    axis.set_title(title, fontsize=10)
    axis.margins(x=0.2)
    if len(series) > 1:
        axis.legend(fontsize=8)
