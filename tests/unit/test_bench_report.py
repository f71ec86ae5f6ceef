"""The bench's statistics, its markdown and JSON report, its chart and its progress lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from splicerelay.bench import chart as bench_chart
from splicerelay.bench import progress as bench_progress
from splicerelay.bench.idle import idle_scenario
from splicerelay.bench.load import bulk_scenario, conn_scenario, latency_scenario, rr_scenario
from splicerelay.bench.model import (
    Sample,
    ScenarioResult,
    median,
    ratio,
    ratios_to_baseline,
    summarize,
)
from splicerelay.bench.report import (
    BenchReport,
    cell,
    describe_sample,
    format_number,
    render_markdown,
    report_json,
)

BULK = bulk_scenario("bulk", "forward", 4, 1)
TARGETS = ["direct", "relay", "relay-auto", "haproxy", "socat"]


def bulk_sample(target: str, rate: float, amount: int = 0, cpu: float | None = None) -> Sample:
    return Sample(
        target,
        0,
        values={"bits_per_second": rate},
        amount=amount,
        wall_seconds=2.0,
        proxy_cpu_seconds=cpu,
    )


def bulk_result() -> ScenarioResult:
    return ScenarioResult(
        BULK,
        [
            bulk_sample("direct", 32e9, 16_000_000_000),
            bulk_sample("relay", 8e9, 2_000_000_000, cpu=0.5),
            bulk_sample("haproxy", 16e9, 4_000_000_000, cpu=0.5),
            bulk_sample("direct", 30e9, 15_000_000_000),
            Sample("relay", 1, error="iperf3: the server | has terminated"),
            bulk_sample("haproxy", 12e9, 4_000_000_000, cpu=0.25),
            bulk_sample("direct", 34e9, 17_000_000_000),
            bulk_sample("relay", 9e9, 2_000_000_000, cpu=0.5),
            bulk_sample("haproxy", 20e9, 2_000_000_000, cpu=0.25),
        ],
        skipped={"relay-auto": "did not start: workers: 'auto': not supported"},
    )


# --- statistics ---------------------------------------------------------------------------


def test_median_ignores_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0]) == 2.5
    assert median([None]) is None
    assert median([]) is None


def test_ratio() -> None:
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 4.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_sample_cpu_per_unit_and_share() -> None:
    one = bulk_sample("relay", 8e9, 2_000_000_000, cpu=0.5)
    assert one.cpu_per_unit(BULK) == 0.25
    assert one.cpu_share() == 0.25
    assert bulk_sample("direct", 8e9, 2_000_000_000).cpu_per_unit(BULK) is None
    per_million = Sample("relay", 0, amount=500_000, proxy_cpu_seconds=2.0)
    assert per_million.cpu_per_unit(rr_scenario(1, 1)) == 4.0
    assert per_million.cpu_per_unit(idle_scenario(10)) is None  # idle has no CPU cost
    assert Sample("relay", 0, wall_seconds=0.0, proxy_cpu_seconds=1.0).cpu_share() is None


def test_medians_use_successful_samples_only_and_leave_out_unmeasured_targets() -> None:
    medians = summarize(bulk_result(), TARGETS)
    assert set(medians) == {"direct", "relay", "haproxy"}
    assert medians["direct"] == {
        "bits_per_second": 32e9,
        "cpu_seconds_per_gb": None,
        "proxy_cpu_share": None,
        "samples": 3,
        "failed": 0,
    }
    assert medians["relay"] == {
        "bits_per_second": 8.5e9,
        "cpu_seconds_per_gb": 0.25,
        "proxy_cpu_share": 0.25,
        "samples": 2,
        "failed": 1,
    }
    assert medians["haproxy"]["cpu_seconds_per_gb"] == 0.125


def test_ratios_to_haproxy() -> None:
    ratios = ratios_to_baseline(BULK, summarize(bulk_result(), TARGETS))
    assert ratios["relay"] == {"bits_per_second": 0.53125, "cpu_seconds_per_gb": 2.0}
    assert ratios["direct"] == {"bits_per_second": 2.0, "cpu_seconds_per_gb": None}
    assert ratios["haproxy"] == {"bits_per_second": 1.0, "cpu_seconds_per_gb": 1.0}


def test_ratios_without_haproxy_are_none() -> None:
    ratios = ratios_to_baseline(BULK, summarize(bulk_result(), ["direct", "relay"]))
    assert ratios["relay"] == {"bits_per_second": None, "cpu_seconds_per_gb": None}


def test_latency_medians_cover_both_percentiles() -> None:
    scenario = latency_scenario(100)
    result = ScenarioResult(
        scenario,
        [
            Sample("relay", r, values={"p50_seconds": p50, "p99_seconds": p99}, amount=100)
            for r, (p50, p99) in enumerate([(1e-4, 5e-4), (3e-4, 9e-4), (2e-4, 7e-4)])
        ],
    )
    row = summarize(result, ["relay"])["relay"]
    assert (row["p50_seconds"], row["p99_seconds"]) == (2e-4, 7e-4)


# --- formatting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (1234.5, "1234"), (12.34, "12.3"), (1.234, "1.23"), (0.01234, "0.012")],
)
def test_format_number(value: float | None, text: str) -> None:
    assert format_number(value) == text


def test_format_number_of_a_negative_value_keeps_its_digits() -> None:
    assert format_number(-0.5) == "-0.500"
    assert format_number(-250.0) == "-250"


def test_describe_sample() -> None:
    assert describe_sample(BULK, bulk_sample("relay", 8e9, 2_000_000_000, cpu=0.5)) == (
        "8.00 Gbit/s, 0.250 CPU s/GB"
    )
    assert describe_sample(BULK, Sample("relay", 0, error="boom")) == "FAILED (boom)"
    latency = Sample("direct", 0, values={"p50_seconds": 15e-6, "p99_seconds": 55e-6})
    assert describe_sample(latency_scenario(10), latency) == "15.0 p50 us, 55.0 p99 us"


def test_cell_escapes_pipes_and_newlines() -> None:
    assert cell("a | b\nc") == "a \\| b c"


# --- markdown -----------------------------------------------------------------------------


def report_of(results: list[ScenarioResult], **extra: dict[str, str]) -> BenchReport:
    environment = {
        "cpus": 2,
        "kernel": "6.1",
        "python": "3.11.7",
        "tools": {"iperf3": "iperf 3.12"},
    }
    return BenchReport(results, TARGETS, environment, {"rounds": 3}, **extra)


def rows_of(markdown: str, section: str) -> dict[str, list[str]]:
    """The table rows under `## section`, by target, as lists of cells."""
    lines = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| target")]
    return {
        cells[0]: cells[1:]
        for cells in ([part.strip() for part in row.strip("|").split(" | ")] for row in rows)
    }


def test_markdown_table_has_medians_ratios_rounds_and_skips() -> None:
    markdown = render_markdown(
        report_of([bulk_result()], skipped_targets={"socat": "socat is not installed"})
    )
    assert "Medians of 3 interleaved round(s) per target; 2 CPUs, Linux 6.1" in markdown
    assert "Peers: iperf 3.12." in markdown
    assert "- target socat: socat is not installed" in markdown
    assert "| target | Gbit/s | x haproxy | CPU s/GB | x haproxy | proxy CPU |" in markdown
    rows = rows_of(markdown, "bulk")
    assert rows["relay"] == [
        "8.50",
        "0.53x",
        "0.250",
        "2.00x",
        "25%",
        "8.00 FAILED 9.00; round 2: iperf3: the server \\| has terminated",
    ]
    assert rows["direct"][:2] == ["32.0", "2.00x"]
    assert rows["relay-auto"][0] == "skipped"
    assert rows["relay-auto"][-1] == "did not start: workers: 'auto': not supported"
    assert "socat" not in rows  # skipped for the whole run, said once at the top


def test_markdown_without_haproxy_has_no_ratio_columns() -> None:
    result = bulk_result()
    result.samples = [sample for sample in result.samples if sample.target != "haproxy"]
    markdown = render_markdown(report_of([result]))
    assert "x haproxy" not in markdown
    assert "## Ratio to haproxy" not in markdown
    assert rows_of(markdown, "bulk")["relay"][:3] == ["8.50", "0.250", "25%"]


def test_markdown_summary_gives_each_targets_ratio_per_workload() -> None:
    rr = ScenarioResult(
        rr_scenario(1000, 50),
        [
            Sample("relay", 0, values={"requests_per_second": 30_000.0}, amount=1000),
            Sample("haproxy", 0, values={"requests_per_second": 40_000.0}, amount=1000),
        ],
    )
    markdown = render_markdown(report_of([bulk_result(), rr]))
    summary = rows_of(markdown, "Ratio to haproxy")
    assert summary["relay"] == ["0.53x", "0.75x"]
    assert summary["direct"] == ["2.00x", "-"]
    assert summary["haproxy"] == ["1.00x", "1.00x"]
    assert "| target | bulk Gbit/s | rr req/s |" in markdown


def test_markdown_idle_table_lists_proxies_only() -> None:
    idle = ScenarioResult(
        idle_scenario(100),
        [
            Sample(
                "relay",
                0,
                values={
                    "rss_kib_per_connection": 1.5,
                    "pss_kib_per_connection": 1.25,
                    "fds_per_connection": 2.0,
                },
                amount=100,
            )
        ],
        skipped={"haproxy": "needs about 264 fds"},
    )
    rows = rows_of(render_markdown(report_of([idle])), "idle")
    assert list(rows) == ["relay", "haproxy"]
    assert rows["relay"] == ["1.50", "1.25", "2.00", "1.50"]
    assert rows["haproxy"] == ["skipped", "", "", "needs about 264 fds"]


def test_json_report_holds_samples_medians_ratios_and_skips() -> None:
    document = report_json(
        report_of([bulk_result()], skipped_workloads={"rr": "redis-server is not installed"})
    )
    bulk = document["workloads"]["bulk"]
    assert bulk["primary"] == "bits_per_second"
    assert bulk["cpu"]["key"] == "cpu_seconds_per_gb"
    assert len(bulk["samples"]) == 9
    assert bulk["samples"][1] == {
        "target": "relay",
        "round": 0,
        "bits_per_second": 8e9,
        "amount": 2_000_000_000,
        "wall_seconds": 2.0,
        "proxy_cpu_seconds": 0.5,
        "proxy_cpu_share": 0.25,
        "cpu_seconds_per_gb": 0.25,
        "error": None,
    }
    assert bulk["medians"]["haproxy"]["bits_per_second"] == 16e9
    assert bulk["ratios_to_haproxy"]["relay"]["cpu_seconds_per_gb"] == 2.0
    assert bulk["skipped"] == {"relay-auto": "did not start: workers: 'auto': not supported"}
    assert document["skipped_workloads"] == {"rr": "redis-server is not installed"}
    assert json.loads(json.dumps(document)) == document


# --- targets side by side -----------------------------------------------------------------

PAIRED_TARGETS = ["direct", "relay", "relay-nolog", "relay-auto", "haproxy", "haproxy-auto"]


def conn_sample(target: str, rate: float, cpu: float) -> Sample:
    """10,000 new connections at `rate` per second, with `cpu` proxy CPU seconds."""
    return Sample(
        target,
        0,
        values={"requests_per_second": rate},
        amount=10_000,
        wall_seconds=10_000 / rate,
        proxy_cpu_seconds=cpu,
    )


def conn_result(*targets: str) -> ScenarioResult:
    rates = {
        "relay": (8_000.0, 0.75),
        "relay-nolog": (10_000.0, 0.6),
        "relay-auto": (9_000.0, 0.9),
        "haproxy": (12_000.0, 0.5),
        "haproxy-auto": (15_000.0, 0.6),
    }
    return ScenarioResult(
        conn_scenario(10_000, 50), [conn_sample(target, *rates[target]) for target in targets]
    )


def paired_report(result: ScenarioResult) -> BenchReport:
    environment = {"cpus": 2, "kernel": "6.1", "python": "3.11.7", "tools": {}}
    return BenchReport([result], PAIRED_TARGETS, environment, {"rounds": 1})


def test_the_access_logs_cost_and_the_scaling_pair_are_side_by_side() -> None:
    result = conn_result("relay", "relay-nolog", "relay-auto", "haproxy", "haproxy-auto")
    markdown = render_markdown(paired_report(result))
    # Both relays are in the ratio table against HAProxy...
    summary = rows_of(markdown, "Ratio to haproxy")
    assert summary["relay"] == ["0.67x"]
    assert summary["relay-nolog"] == ["0.83x"]
    assert summary["haproxy-auto"] == ["1.25x"]
    # ...and against each other, with CPU per connection.
    assert "| pair | shows | conn req/s | conn CPU us/req |" in markdown
    pairs = rows_of(markdown, "Side by side")
    assert pairs["relay / relay-nolog"] == ["what the access log costs", "0.80x", "1.25x"]
    assert pairs["relay-auto / haproxy-auto"] == ["both on every proxy core", "0.60x", "1.50x"]
    document = report_json(paired_report(result))["workloads"]["conn"]["pairs"]
    assert document["relay / relay-nolog"] == {
        "requests_per_second": pytest.approx(0.8),
        "cpu_seconds_per_million_requests": pytest.approx(1.25),
    }


def test_a_pair_is_left_out_unless_both_were_measured() -> None:
    markdown = render_markdown(paired_report(conn_result("relay", "relay-auto", "haproxy")))
    assert "## Side by side" not in markdown
    markdown = render_markdown(paired_report(conn_result("relay", "relay-nolog", "relay-auto")))
    assert list(rows_of(markdown, "Side by side")) == ["pair", "relay / relay-nolog"]
    failed = conn_result("relay", "haproxy")
    failed.samples.append(Sample("relay-nolog", 0, error="boom"))
    assert "## Side by side" not in render_markdown(paired_report(failed))
    assert report_json(paired_report(failed))["workloads"]["conn"]["pairs"] == {}


# --- chart --------------------------------------------------------------------------------


def test_chart_panels_hold_the_measured_targets_scaled() -> None:
    latency = ScenarioResult(
        latency_scenario(10),
        [Sample("relay", 0, values={"p50_seconds": 7e-5, "p99_seconds": 6e-4}, amount=10)],
    )
    empty = ScenarioResult(rr_scenario(10, 1), [Sample("relay", 0, error="boom")])
    panels = bench_chart.chart_panels([bulk_result(), latency, empty], TARGETS)
    assert [panel[0] for panel in panels] == ["bulk: Gbit/s", "latency: p50 us and p99 us"]
    assert panels[0][1] == ["direct", "relay", "haproxy"]
    assert panels[0][2] == [("Gbit/s", [32.0, 8.5, 16.0])]
    (p50_label, p50), (p99_label, p99) = panels[1][2]
    assert (p50_label, p99_label) == ("p50 us", "p99 us")
    assert p50 == pytest.approx([70.0])
    assert p99 == pytest.approx([600.0])


def test_png_chart_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the bench extra)")
    path = tmp_path / "bench.png"
    assert bench_chart.write_png(str(path), [bulk_result()], TARGETS) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_chart_without_numbers_says_why(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the bench extra)")
    path = tmp_path / "bench.png"
    empty = ScenarioResult(BULK, [Sample("relay", 0, error="boom")])
    assert bench_chart.write_png(str(path), [empty], TARGETS) == "no workload has a number to draw"
    assert not path.exists()


def test_png_chart_without_matplotlib_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    path = tmp_path / "bench.png"
    reason = bench_chart.write_png(str(path), [bulk_result()], TARGETS)
    assert reason is not None and "matplotlib is not installed" in reason
    assert not path.exists()


# --- progress -----------------------------------------------------------------------------


def test_plain_progress_counts_steps(capsys: pytest.CaptureFixture[str]) -> None:
    progress = bench_progress.PlainProgress()
    progress.start(12)
    progress.step("bulk round 1/3 direct: 30.0 Gbit/s")
    progress.skip(3, "relay-auto skipped: did not start")
    progress.step("bulk round 1/3 relay: 9.00 Gbit/s")
    progress.close()
    assert capsys.readouterr().err.splitlines() == [
        "[ 1/12] bulk round 1/3 direct: 30.0 Gbit/s",
        "relay-auto skipped: did not start",
        "[ 5/12] bulk round 1/3 relay: 9.00 Gbit/s",
    ]


def test_progress_falls_back_to_plain_lines_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    assert isinstance(bench_progress.make_progress(), bench_progress.PlainProgress)


def test_rich_progress_prints_each_step(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rich", reason="rich is not installed (the bench extra)")
    progress = bench_progress.make_progress()
    assert isinstance(progress, bench_progress.RichProgress)
    progress.start(2)
    progress.step("rr round 1/1 relay: [50000] req/s")
    progress.skip(1, "socat skipped")
    progress.close()
    err = capsys.readouterr().err
    assert "rr round 1/1 relay: [50000] req/s" in err  # printed as is, not as rich markup
    assert "socat skipped" in err
    assert progress.bar.tasks[0].completed == 2
