"""The families built for limits, reloads and processes, and how workers' copies merge."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily

from splicerelay.config.load import parse_config
from splicerelay.datapath.stats import RelayStats, ReloadRecord
from splicerelay.ops.metrics import (
    ProcessMetrics,
    RelayCollector,
    limit_families,
    reload_state_families,
    with_label,
)
from splicerelay.workers.merged_metrics import from_metrics, merge, parse_exposition
from splicerelay.workers.supervisor_metrics import supervisor_families

CONFIG = """\
defaults: {max_connections: 300}
routes:
  - name: web
    listen: 127.0.0.1:8080
    upstreams: [{address: 127.0.0.1:8000}]
  - name: api
    listen: 127.0.0.1:8081
    max_connections: 20
    upstreams: [{address: 127.0.0.1:8001}]
"""


def samples(families: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    exposition = from_metrics(families)  # type: ignore[arg-type]
    return {key: value for family in exposition.values() for key, value in family.samples.items()}


def test_limit_gauges_hold_each_routes_limit_and_no_global_one_when_unset() -> None:
    found = samples(limit_families(parse_config(CONFIG, "relay.yaml")))
    assert found == {
        ("splicerelay_max_connections", (("route", "web"),)): 300,
        ("splicerelay_max_connections", (("route", "api"),)): 20,
    }


def test_global_limit_gauge_when_set() -> None:
    config = parse_config("max_connections: 1000\n" + CONFIG, "relay.yaml")
    assert samples(limit_families(config))[("splicerelay_max_connections_global", ())] == 1000


def test_relay_collector_reads_the_limits_of_the_config_running_now() -> None:
    configs = [parse_config(CONFIG, "relay.yaml")]
    collector = RelayCollector(RelayStats(), "1.0", lambda: configs[-1])
    key = ("splicerelay_max_connections", (("route", "api"),))
    assert samples(collector.collect())[key] == 20
    configs.append(parse_config(CONFIG.replace("max_connections: 20", "max_connections: 7"), "x"))
    assert samples(collector.collect())[key] == 7


def test_a_reload_record_starts_as_a_success_at_its_creation() -> None:
    record = ReloadRecord()
    assert record.last_successful and record.counts == {}
    assert record.last_time > 1e9  # unix time, not a monotonic clock's


def test_the_last_reload_decides_and_counts_keep_every_one() -> None:
    record = ReloadRecord()
    record.record("failure", now=100.0)
    assert (record.last_successful, record.last_time) == (False, 100.0)
    record.record("success", now=200.0)
    assert (record.last_successful, record.last_time) == (True, 200.0)
    assert record.counts == {"failure": 1, "success": 1}


def test_reload_state_gauges() -> None:
    assert samples(reload_state_families(False, 123.5)) == {
        ("splicerelay_config_last_reload_successful", ()): 0,
        ("splicerelay_config_last_reload_timestamp_seconds", ()): 123.5,
    }


def test_with_label_labels_every_sample_and_keeps_the_rest() -> None:
    counter = CounterMetricFamily("x_seconds", "help", labels=["a"])
    counter.add_metric(["1"], 2.5)
    labelled = with_label(counter, "worker", "3")
    assert (labelled.name, labelled.type, labelled.documentation) == (
        "x_seconds",
        "counter",
        "help",
    )
    assert [(s.name, s.labels, s.value) for s in labelled.samples] == [
        ("x_seconds_total", {"a": "1", "worker": "3"}, 2.5)
    ]
    assert counter.samples[0].labels == {"a": "1"}  # the original is untouched


def test_process_metrics_of_a_worker_carry_its_slot() -> None:
    names = set()
    for family in ProcessMetrics("1").collect():
        names.add(family.name)
        assert all(sample.labels == {"worker": "1"} for sample in family.samples)
    assert {"process_open_fds", "process_max_fds", "process_cpu_seconds"} <= names
    for family in ProcessMetrics().collect():
        assert all(sample.labels == {} for sample in family.samples)


def worker_text(slot: str, fds: int, limit: int) -> str:
    return (
        "# TYPE splicerelay_max_connections gauge\n"
        'splicerelay_max_connections{route="web"} 300\n'
        "# TYPE process_open_fds gauge\n"
        f'process_open_fds{{worker="{slot}"}} {fds}\n'
        "# TYPE process_max_fds gauge\n"
        f'process_max_fds{{worker="{slot}"}} {limit}\n'
    )


def test_merged_workers_sum_their_limits_and_keep_each_process_apart() -> None:
    merged = merge(
        [
            parse_exposition(worker_text("0", 900, 1000)),
            parse_exposition(worker_text("1", 10, 1000)),
        ]
    )
    # Each worker admits 300 on its own: the relay as a whole admits 600.
    assert merged["splicerelay_max_connections"].samples == {
        ("splicerelay_max_connections", (("route", "web"),)): 600
    }
    # Worker 0 at 90% of its fd limit stays visible as such.
    assert merged["process_open_fds"].samples == {
        ("process_open_fds", (("worker", "0"),)): 900,
        ("process_open_fds", (("worker", "1"),)): 10,
    }


def test_supervisor_families_state_the_last_reload_and_its_own_process() -> None:
    record = ReloadRecord()
    record.record("failure", now=50.0)
    families = supervisor_families(restarts=2, reloads=record, running=3)
    found = {key: value for family in families.values() for key, value in family.samples.items()}
    assert found[("splicerelay_config_last_reload_successful", ())] == 0
    assert found[("splicerelay_config_last_reload_timestamp_seconds", ())] == 50.0
    assert found[("splicerelay_config_reloads_total", (("result", "failure"),))] == 1
    assert found[("splicerelay_worker_restarts_total", ())] == 2
    assert found[("process_open_fds", (("worker", "supervisor"),))] > 0
    assert families["process_cpu_seconds"].type == "counter"
