"""The operations-as-code files: Prometheus config, alert rules and the Grafana dashboard.

promtool (Debian package `prometheus`) checks the config and the rules and runs the alert unit
tests in deploy/prometheus/alerts_test.yml. The dashboard's PromQL is parsed by promtool too:
every expression becomes a recording rule in a scratch rules file that `promtool check rules`
must accept. Without promtool these tests fail rather than skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mailroom.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "mailroom.yml"

TOKEN_FILE = "/etc/prometheus/secrets/metrics-token"
DATASOURCE_REF = {"type": "prometheus", "uid": "mailroom-prometheus"}


@pytest.fixture(autouse=True)
def _clean_redis() -> None:
    """These tests read files and run promtool: no Redis to start or flush (see conftest)."""


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is required: apt-get install prometheus (.ci/run installs it)",
            pytrace=False,
        )
    return path


def run(*args: str | Path) -> str:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_is_valid(promtool: str, tmp_path: Path) -> None:
    # A full check (not --syntax-only) insists the token file exists: check a copy that
    # points at a scratch token, next to a copy of the rules it loads.
    text = PROMETHEUS_CONFIG.read_text()
    assert text.count(f"credentials_file: {TOKEN_FILE}") == 1
    token = tmp_path / "metrics-token"
    token.write_text("not-a-real-token\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace(TOKEN_FILE, str(token)))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")

    output = run(promtool, "check", "config", config)

    assert "SUCCESS" in output
    run(promtool, "check", "config", "--syntax-only", PROMETHEUS_CONFIG)


def test_prometheus_scrapes_every_role() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: [t for static in job["static_configs"] for t in static["targets"]]
        for name, job in jobs.items()
    }
    assert targets == {
        "mailroom-web": ["web:8000"],
        "flower": ["flower:5555"],
        "celery-exporter": ["celery-exporter:9808"],
        "prometheus": ["localhost:9090"],
    }
    assert jobs["mailroom-web"]["metrics_path"] == "/metrics"
    assert jobs["mailroom-web"]["authorization"]["credentials_file"] == TOKEN_FILE
    assert jobs["flower"]["metrics_path"] == "/metrics"


def test_alert_rules_are_valid(promtool: str) -> None:
    output = run(promtool, "check", "rules", ALERTS)

    assert "SUCCESS" in output


def test_alert_rules_unit_tests_pass(promtool: str) -> None:
    output = run(promtool, "test", "rules", ALERTS_TEST)

    assert "SUCCESS" in output


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}

    assert names >= {
        "MailroomBulkBacklogGrowing",
        "MailroomTransactionalBacklog",
        "MailroomFailureRatioHigh",
        "MailroomNoWorkers",
        "MailroomTransactionalLatencyHigh",
        "MailroomBulkPausedTooLong",
    }
    assert names - fires == set(), "alerts without a test case where they fire"
    assert names - quiet == set(), "alerts without a test case where they stay quiet"


def test_alerts_have_severity_and_text_and_use_the_thresholds() -> None:
    groups = load_yaml(ALERTS)["groups"]
    records = {
        rule["record"]: rule["expr"]
        for group in groups
        for rule in group["rules"]
        if rule.get("record", "").startswith("mailroom:threshold:")
    }
    exprs = " ".join(rule["expr"] for rule in alert_rules())

    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
    assert records, "no mailroom:threshold:* constants"
    for name, expr in records.items():
        assert expr.startswith("vector("), f"{name} is not a constant"
        assert name in exprs, f"{name} is defined but no alert uses it"


# ---- Grafana ---------------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def test_dashboard_is_portable() -> None:
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)

    assert dashboard["uid"] == "mailroom"
    assert "__inputs" not in dashboard
    assert "${DS_" not in text
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, panel["title"]
            assert target["expr"].strip(), panel["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_shows_the_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in panels(dashboard) for t in p.get("targets", []))

    for metric in (
        "mailroom_emails_sent_total",
        "mailroom_emails_failed_total",
        "mailroom_emails_retried_total",
        "mailroom_queue_depth",
        "mailroom_delivery_latency_seconds_bucket",
        "mailroom_workers_online",
        "mailroom_bulk_paused",
        "mailroom_ratelimit_bulk_rate_per_second",
        "mailroom_ratelimit_throttle_factor",
        "mailroom_ratelimit_waits_total",
        "mailroom_campaigns",
        "mailroom_smtp_connections_opened_total",
        # django-prometheus 2.x: Counter "django_http_requests_total_by_method" is exported
        # with the _total suffix that prometheus_client appends.
        "django_http_requests_total_by_method_total",
        "django_http_responses_total_by_status_total",
    ):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in exprs


def test_dashboard_promql_parses(promtool: str, tmp_path: Path) -> None:
    # promtool has no "check this expression" command: make each expression a recording rule.
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"check:{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))

    output = run(promtool, "check", "rules", rules_file)

    assert f"SUCCESS: {len(exprs)} rules found" in output


def test_grafana_provisioning() -> None:
    datasources = load_yaml(DATASOURCE)["datasources"]
    providers = load_yaml(DASHBOARD_PROVIDER)["providers"]

    assert [(d["uid"], d["type"], d["url"]) for d in datasources] == [
        ("mailroom-prometheus", "prometheus", "http://prometheus:9090")
    ]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [
        ("file", "/etc/grafana/dashboards")
    ]
