"""The operator files in deploy/, checked with the tools that consume them.

promtool parses the Prometheus config, the alert rules (and runs their unit tests) and
every dashboard query; systemd-analyze verifies the units and scores their hardening;
the Kubernetes manifests are validated against the API schemas (kubernetes-validate);
`splicerelay check` validates the relay config inside the ConfigMap. Each test that needs
a tool skips, saying which, when it is missing. The rest checks that the files agree with
each other and with the metrics the relay exports.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from splicerelay import __version__
from splicerelay.config import Config, load_config
from splicerelay.config.addresses import TcpAddress

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVICE_UNIT = DEPLOY / "systemd" / "splicerelay.service"
SOCKET_UNIT = DEPLOY / "systemd" / "splicerelay.socket"
SYSCTL_FILE = DEPLOY / "sysctl" / "90-splicerelay.conf"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "splicerelay.json"
KUBERNETES = DEPLOY / "kubernetes"
EXAMPLE_CONFIG = ROOT / "config" / "relay.yaml"

# Every metric name the relay exports (histograms as their series), and Prometheus's own
# `up`. Queries and alerts may use nothing else.
EXPORTED_METRICS = frozenset(
    {
        "splicerelay_bytes_total",
        "splicerelay_connections_active",
        "splicerelay_connections_total",
        "splicerelay_connection_duration_seconds_bucket",
        "splicerelay_connection_duration_seconds_sum",
        "splicerelay_connection_duration_seconds_count",
        "splicerelay_upstream_up",
        "splicerelay_upstream_connections_active",
        "splicerelay_upstream_connect_duration_seconds_bucket",
        "splicerelay_upstream_connect_duration_seconds_sum",
        "splicerelay_upstream_connect_duration_seconds_count",
        "splicerelay_upstream_connect_errors_total",
        "splicerelay_upstream_admin_state",
        "splicerelay_upstream_weight",
        "splicerelay_pipes",
        "splicerelay_pipe_resize_failures_total",
        "splicerelay_access_log_dropped_total",
        "splicerelay_limit_wait_seconds_total",
        "splicerelay_global_limit_wait_seconds_total",
        "splicerelay_config_reloads_total",
        "splicerelay_config_last_reload_successful",
        "splicerelay_config_last_reload_timestamp_seconds",
        "splicerelay_max_connections",
        "splicerelay_max_connections_global",
        "splicerelay_build_info",
        # With workers above 1, the supervisor's own.
        "splicerelay_workers",
        "splicerelay_worker_restarts_total",
        # prometheus_client's process collector (each worker's and the supervisor's with
        # a `worker` label); the dashboard and alerts use these.
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    }
)
ALLOWED_METRICS = EXPORTED_METRICS | {"up"}

TOOL_TIMEOUT = 30  # seconds; each tool call here takes well under one


# --- helpers ---------------------------------------------------------------------------


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return path


def run_tool(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        cwd=cwd,
    )


def assert_succeeded(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


# PromQL words that look like metric names but are not.
PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "Inf", "NaN"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (string literals, label matchers,
    ranges, grouping clauses, function names and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="splicerelay"} == 0', {"up"}),
        (
            "histogram_quantile(0.99, sum by (route, le) "
            '(rate(splicerelay_connection_duration_seconds_bucket{route=~"$route"}'
            "[$__rate_interval])))",
            {"splicerelay_connection_duration_seconds_bucket"},
        ),
        ("a_total / on (route) group_left (upstream) b > bool 1e3 offset 5m", {"a_total", "b"}),
        (
            'sum without (x) (rate(node_cpu_seconds_total{mode!="idle"}[5m]))',
            {"node_cpu_seconds_total"},
        ),
    ],
)
def test_metric_names_finds_every_selected_metric(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def parse_duration(text: str) -> float:
    """A systemd time span of one unit (45s, 1min, 500ms)."""
    match = re.fullmatch(r"(\d+)\s*(ms|s|sec|min|m|h)?", text.strip())
    assert match, f"unexpected time span {text!r}"
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, None: 1}
    return int(match.group(1)) * units[match.group(2)]


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections as lists of (key, value): keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(path: Path, section: str, key: str) -> list[str]:
    return [value for name, value in read_unit(path).get(section, []) if name == key]


def unit_value(path: Path, section: str, key: str) -> str:
    values = unit_values(path, section, key)
    assert len(values) == 1, f"{path.name}: expected one {key}= in [{section}], found {values}"
    return values[0]


def example_config() -> Config:
    return load_config(str(EXAMPLE_CONFIG))


# --- systemd ---------------------------------------------------------------------------

SERVICE_SETTINGS = {
    "Type": "notify",
    "ExecStart": "/usr/local/bin/splicerelay run -c /etc/splicerelay/relay.yaml",
    "WatchdogSec": "30s",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "DynamicUser": "yes",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallArchitectures": "native",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "UMask": "0077",
    "ConfigurationDirectory": "splicerelay",
    # The control socket's directory, made for the dynamic user (see the next test).
    "RuntimeDirectory": "splicerelay",
    "RuntimeDirectoryMode": "0700",
    "LimitNOFILE": "1048576",
}


def test_service_unit_has_the_documented_settings() -> None:
    for key, expected in SERVICE_SETTINGS.items():
        assert unit_value(SERVICE_UNIT, "Service", key) == expected, key
    assert "@system-service" in unit_values(SERVICE_UNIT, "Service", "SystemCallFilter")
    assert unit_value(SERVICE_UNIT, "Install", "WantedBy") == "multi-user.target"


def test_service_reloads_with_the_relay_itself() -> None:
    """`systemctl reload` runs `splicerelay reload` on the file ExecStart runs with: it
    waits for the outcome and fails on a refused config. No signal sent by another
    binary (/bin/kill is missing from minimal systems, and a signal cannot say whether
    the config was taken)."""
    start = unit_value(SERVICE_UNIT, "Service", "ExecStart").split()
    reload_command = unit_value(SERVICE_UNIT, "Service", "ExecReload").split()
    assert reload_command[0] == start[0], "the same splicerelay as ExecStart"
    assert reload_command[1] == "reload"
    assert reload_command[reload_command.index("-c") + 1] == start[start.index("-c") + 1]
    assert not any("kill" in word or "MAINPID" in word for word in reload_command)
    # Type=notify-reload would send SIGHUP and report a refused config as a success.
    assert unit_value(SERVICE_UNIT, "Service", "Type") == "notify"


def test_service_control_socket_lives_in_its_runtime_directory() -> None:
    """The relay's default control socket is $RUNTIME_DIRECTORY/control.sock: the unit must
    give it that directory, owned by the dynamic user (only RuntimeDirectory= can: the
    rest of the file system is read-only to the service), and keep it from others."""
    (directory,) = unit_value(SERVICE_UNIT, "Service", "RuntimeDirectory").split()
    assert directory == "splicerelay"
    assert int(unit_value(SERVICE_UNIT, "Service", "RuntimeDirectoryMode"), 8) & 0o077 == 0
    # No `control.socket:` in the shipped config moves the socket elsewhere.
    assert example_config().control.socket == "auto"


def test_service_stop_timeout_leaves_room_for_the_drain() -> None:
    """systemd's SIGKILL must not cut the relay's shutdown_timeout short."""
    stop_timeout = parse_duration(unit_value(SERVICE_UNIT, "Service", "TimeoutStopSec"))
    assert stop_timeout > example_config().shutdown_timeout + 5


def test_socket_unit_serves_a_route_of_the_example_config_where_it_says() -> None:
    """A passed socket named after a route must be bound to that route's listen, or the
    relay refuses to start; both files keep to loopback, as the README promises."""
    assert unit_value(SOCKET_UNIT, "Socket", "Service") == SERVICE_UNIT.name
    name = unit_value(SOCKET_UNIT, "Socket", "FileDescriptorName")
    routes = {route.name: route.listen for route in example_config().routes}
    assert name in routes
    listen = routes[name]
    assert isinstance(listen, TcpAddress) and ipaddress.ip_address(listen.host).is_loopback
    assert unit_value(SOCKET_UNIT, "Socket", "ListenStream") == str(listen)


def runnable_units(directory: Path) -> list[Path]:
    """Copies of both units whose ExecStart and ExecReload name an executable that exists.

    Why: `systemd-analyze verify` fails a unit whose Exec*= binary is missing, and
    /usr/local/bin/splicerelay is where operators install it, not where the tests run.
    The venv's own console script stands in for it when there is one, /bin/true if not.
    """
    script = Path(sys.prefix) / "bin" / "splicerelay"
    executable = str(script) if script.is_file() else shutil.which("true") or "/bin/true"
    service = directory / SERVICE_UNIT.name
    text = SERVICE_UNIT.read_text()
    for key in ("ExecStart", "ExecReload"):
        text = text.replace(f"{key}=/usr/local/bin/splicerelay ", f"{key}={executable} ")
    service.write_text(text)
    assert f"ExecStart={executable} run" in service.read_text()
    assert f"ExecReload={executable} reload" in service.read_text()
    socket_unit = directory / SOCKET_UNIT.name
    shutil.copyfile(SOCKET_UNIT, socket_unit)
    return [service, socket_unit]


def verify_complaints(*units: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify's exit code, and its lines about these units.

    Unknown keys and unparsable values are only warnings (exit 0), so the lines count."""
    result = run_tool("systemd-analyze", "verify", *units)
    lines = (result.stdout + result.stderr).splitlines()
    names = tuple(unit.name for unit in units)
    return result.returncode, [line for line in lines if any(name in line for name in names)]


def test_systemd_analyze_verifies_both_units(tmp_path: Path) -> None:
    require_tool("systemd-analyze", "systemd")
    returncode, complaints = verify_complaints(*runnable_units(tmp_path))
    assert returncode == 0 and complaints == [], complaints


def test_systemd_analyze_verify_reports_a_bad_setting(tmp_path: Path) -> None:
    """The check above would see a mistake: verify names a misspelt key."""
    require_tool("systemd-analyze", "systemd")
    service, _socket = runnable_units(tmp_path)
    service.write_text(service.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    returncode, complaints = verify_complaints(service)
    assert returncode != 0 or any("ProtectHomes" in line for line in complaints)


def test_service_hardening_score_stays_low() -> None:
    """deploy/README.md quotes the exposure score; fail if hardening regresses past 2.0."""
    require_tool("systemd-analyze", "systemd")
    help_text = run_tool("systemd-analyze", "security", "--help").stdout
    if "--offline" not in help_text:
        pytest.skip("systemd-analyze security has no --offline (systemd < 250)")
    # --threshold is in tenths: 20 means an overall exposure level of at most 2.0.
    result = run_tool(
        "systemd-analyze", "security", "--offline=yes", "--threshold=20", SERVICE_UNIT
    )
    assert_succeeded(result)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score, result.stdout
    # The README quotes the score and the systemd version that measured it; other
    # versions weigh the settings differently, so only the same version must agree.
    readme = (DEPLOY / "README.md").read_text()
    measured_with = re.search(r"Measured with systemd (\d+)", readme)
    assert measured_with, "deploy/README.md does not say which systemd measured the score"
    version = re.match(r"systemd (\d+)", run_tool("systemd-analyze", "--version").stdout)
    if version and version.group(1) == measured_with.group(1):
        assert f"systemd-analyze security score: {score.group(1)} " in readme


def test_sysctl_drop_in_sets_known_keys() -> None:
    settings = {}
    for line in SYSCTL_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            key, equals, value = line.partition("=")
            assert equals, f"not key = value: {line!r}"
            settings[key.strip()] = value.strip()
    assert set(settings) == {"fs.pipe-user-pages-soft"}
    for key, value in settings.items():
        assert value.isdigit(), (key, value)
        assert (Path("/proc/sys") / key.replace(".", "/")).exists(), key


def test_sysctl_drop_in_arithmetic_is_right() -> None:
    """The worked examples: (2 x busy + pooled) x pages per pipe."""
    examples = re.findall(r"\((\d+) \+ (\d+)\) x (\d+) =\s+(\d+)", SYSCTL_FILE.read_text())
    assert len(examples) >= 3
    for pipes, pooled, pages, total in examples:
        assert (int(pipes) + int(pooled)) * int(pages) == int(total)


# --- Prometheus ------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]]


def test_promtool_checks_the_prometheus_config() -> None:
    promtool = require_tool("promtool", "prometheus")
    assert_succeeded(run_tool(promtool, "check", "config", PROMETHEUS_CONFIG))


def test_promtool_checks_the_alert_rules() -> None:
    promtool = require_tool("promtool", "prometheus")
    assert_succeeded(run_tool(promtool, "check", "rules", ALERT_RULES))


def test_promtool_runs_the_alert_unit_tests() -> None:
    promtool = require_tool("promtool", "prometheus")
    assert_succeeded(run_tool(promtool, "test", "rules", ALERT_TESTS, cwd=ALERT_TESTS.parent))


def test_prometheus_scrapes_the_default_metrics_address() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == [ALERT_RULES.name]
    (job,) = (job for job in config["scrape_configs"] if job["job_name"] == "splicerelay")
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets == [str(example_config().metrics.listen)]


def test_alert_rules_are_complete_and_use_only_exported_metrics() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {
        "SplicerelayDown",
        "SplicerelayUpstreamDown",
        "SplicerelayConnectErrorsRising",
        "SplicerelayReloadFailed",
        "SplicerelayCopyPathInUse",
        "SplicerelayConnectionsNearLimit",
        "SplicerelayConnectionsNearGlobalLimit",
        "SplicerelayFdsNearLimit",
        "SplicerelayWorkerRestarted",
        "SplicerelayUpstreamInMaintenance",
    } <= set(rules)
    assert rules["SplicerelayDown"]["expr"] == 'up{job="splicerelay"} == 0'
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        used = metric_names(rule["expr"])
        assert used and used <= ALLOWED_METRICS, (name, used - ALLOWED_METRICS)


def test_every_alert_has_a_unit_test() -> None:
    """alerts_test.yml exercises every rule of alerts.yml, firing and quiet."""
    tested: dict[str, set[bool]] = {}
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            tested.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    for rule in alert_rules():
        assert tested.get(rule["alert"]) == {True, False}, rule["alert"]


def test_reload_alert_follows_the_last_reload_not_a_window_of_failures() -> None:
    """A failure count over a window kept alerting for its length after a good reload."""
    (rule,) = (rule for rule in alert_rules() if rule["alert"] == "SplicerelayReloadFailed")
    assert metric_names(rule["expr"]) == {"splicerelay_config_last_reload_successful"}
    assert "for" not in rule


def test_maint_alert_waits_an_hour_on_the_maint_series_only() -> None:
    (rule,) = (r for r in alert_rules() if r["alert"] == "SplicerelayUpstreamInMaintenance")
    assert rule["expr"] == 'splicerelay_upstream_admin_state{state="maint"} == 1'
    assert parse_duration(rule["for"]) == 3600


# --- Grafana ---------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside collapsed rows


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel query and every query variable's metric."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"variable {variable['name']}: unexpected query {query!r}"
            yield f"variable {variable['name']!r}", match.group(1)


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = []
    cells: set[tuple[int, int]] = set()
    for panel in all_panels(dashboard):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, f"panel {panel['title']!r} overlaps another"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource, panel["title"]
            assert target["expr"].strip(), panel["title"]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for variable in dashboard["templating"]["list"]:
        assert variable.get("datasource") in (None, datasource), variable["name"]


def test_dashboard_uses_only_exported_metrics_and_shows_them_all() -> None:
    used: set[str] = set()
    for where, expr in dashboard_queries(load_dashboard()):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= ALLOWED_METRICS, f"{where}: not exported: {names - ALLOWED_METRICS}"
        # Token by token as well, in case a name hides where the parser above looks past.
        for token in re.findall(r"\bsplicerelay_[a-z_]+", expr):
            assert token in EXPORTED_METRICS, f"{where}: {token}"
        used |= names
    histogram_parts = {name for name in EXPORTED_METRICS if name.endswith(("_sum", "_count"))}
    assert EXPORTED_METRICS - histogram_parts <= used, (
        f"no panel shows {sorted(EXPORTED_METRICS - histogram_parts - used)}"
    )


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with values Prometheus would see at query time."""
    expr = re.sub(r"\$\{?__(?:rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    rules = [
        {"record": f"dashboard:query_{number}", "expr": grafana_to_promql(expr)}
        for number, (_where, expr) in enumerate(dashboard_queries(load_dashboard()))
    ]
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_succeeded(run_tool(promtool, "check", "rules", rule_file))


# --- Kubernetes ------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every object under deploy/kubernetes, by kind."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                assert document["kind"] not in objects, f"second {document['kind']} in {path}"
                objects[document["kind"]] = document
    assert set(objects) == {"ConfigMap", "Deployment", "Service", "PodMonitor"}
    return objects


def relay_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def container_ports(deployment: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in relay_container(deployment)["ports"]}


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    version = kubernetes_validate.latest_version()
    for kind, document in manifests().items():
        if kind == "PodMonitor":
            continue  # a CRD: kubernetes-validate has no schema; see the test below
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(
                f"{kind} does not validate against Kubernetes {version}: {path}: {error.message}"
            )


def test_podmonitor_selects_the_pods_and_their_metrics_port() -> None:
    objects = manifests()
    monitor, deployment = objects["PodMonitor"], objects["Deployment"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    match_labels = monitor["spec"]["selector"]["matchLabels"]
    assert match_labels and match_labels.items() <= pod_labels.items()
    # job="splicerelay", as the alert rules expect.
    assert pod_labels[monitor["spec"]["jobLabel"]] == "splicerelay"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in container_ports(deployment)
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def configmap_relay_yaml(tmp_path: Path) -> Path:
    """The ConfigMap's relay.yaml, written out as the pod sees it."""
    path = tmp_path / "relay.yaml"
    path.write_text(manifests()["ConfigMap"]["data"]["relay.yaml"])
    return path


def test_configmap_holds_a_valid_relay_config(tmp_path: Path) -> None:
    path = configmap_relay_yaml(tmp_path)
    result = run_tool(sys.executable, "-m", "splicerelay", "check", "-c", path, cwd=ROOT)
    assert_succeeded(result)
    config = load_config(str(path))
    assert config.metrics.listen == TcpAddress("0.0.0.0", 9109)
    assert [(route.name, route.listen) for route in config.routes] == [
        ("web", TcpAddress("0.0.0.0", 8080))
    ]


def test_kubernetes_objects_agree_with_each_other(tmp_path: Path) -> None:
    objects = manifests()
    deployment, service, configmap = (objects[k] for k in ("Deployment", "Service", "ConfigMap"))
    pod = deployment["spec"]["template"]
    container = relay_container(deployment)
    ports = container_ports(deployment)
    config = load_config(str(configmap_relay_yaml(tmp_path)))

    assert deployment["spec"]["replicas"] == 2
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == 8080
    assert service_port["targetPort"] in ports or service_port["targetPort"] in ports.values()

    # The config file: mounted whole from the ConfigMap where -c reads it.
    command = container["command"]
    assert command[:2] == ["splicerelay", "run"] and "--watch" in command
    config_path = Path(command[command.index("-c") + 1])
    mounts = container["volumeMounts"]
    (mount,) = (m for m in mounts if Path(m["mountPath"]) == config_path.parent)
    assert "subPath" not in mount
    (volume,) = (v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]

    # Ports and probes agree with the relay config.
    assert isinstance(config.metrics.listen, TcpAddress)
    assert ports["metrics"] == config.metrics.listen.port
    assert ports["web"] == config.routes[0].listen.port  # type: ignore[union-attr]
    probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in probes.items():
        request = container[probe]["httpGet"]
        assert request["path"] == path, probe
        assert request["port"] in ("metrics", config.metrics.listen.port), probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]

    # Drain time: the grace period starts with preStop and must also hold the drain.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 45
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(pre_stop[1]) + config.shutdown_timeout
    # The locked-down container.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The name deploy/container/build.sh gives the image of this version.
    assert container["image"] == f"localhost/splicerelay:{__version__}"
    assert container["resources"]["requests"] and container["resources"]["limits"]
