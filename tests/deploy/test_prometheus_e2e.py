"""A real Prometheus scrapes a running web role during a real delivery run.

Afterwards every PromQL expression of the Grafana dashboard and of the alert rules must be
accepted by Prometheus, and every dashboard query must return data.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from more_itertools import chunked

from email_service.tasks import send_bulk_email_batch, send_high_priority_email
from mailroom_testkit.processes import REPO, Role, free_port, prometheus, web
from mailroom_testkit.smtp_sink import SMTPSink
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)
TOKEN = "scrape-token-for-tests"


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((REPO / "grafana/dashboards/mailroom.json").read_text())
    exprs = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append(target["expr"].replace("$__rate_interval", "1m"))
    assert exprs, "the dashboard has queries"
    return exprs


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as exc:
        return dict(json.load(exc))


def _scrape_config(tmp_path: Path, web_port: int) -> Path:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(REPO / "deploy/prometheus/alerts.yml")]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "mailroom-web"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{web_port}"]}]
    job["authorization"] = {"credentials_file": str(token_file)}
    config["scrape_configs"] = [job]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_prometheus_scrapes_a_delivery_run_and_every_query_has_data(
    start_role: Callable[..., Role],
    role_env: dict[str, str],
    smtp_sink: SMTPSink,
    tmp_path: Path,
) -> None:
    assert shutil.which("prometheus"), "install Debian's prometheus (the CI script does)"
    web_port, prom_port = free_port(), free_port()
    env = role_env | {"MAILROOM_METRICS_TOKEN": TOKEN}
    web_role = web(env, web_port)
    prom = prometheus(_scrape_config(tmp_path, web_port), tmp_path / "data", prom_port)
    try:
        web_role.start()
        prom.start()
        start_role("worker", queues="bulk", concurrency=2, name="worker-bulk")
        start_role("worker", queues="high_priority", concurrency=1, name="worker-high")
        smtp_sink.set_delay(0.01)
        smtp_sink.refuse_every(9, "451 4.3.0 Try later", until_message=200)
        for chunk in chunked([f"p{i}@example.com" for i in range(600)], 50):
            send_bulk_email_batch.delay(chunk, "News", {}, "newsletter")
        for i in range(10):
            send_high_priority_email.delay(f"t{i}@example.com", "Hi", {}, "welcome")
        wait_for(lambda: smtp_sink.count() >= 610, 120, "the delivery run")
        time.sleep(5)  # a few more scrapes after the run

        up = _query(prom_port, 'up{job="mailroom-web"}')
        assert up["data"]["result"][0]["value"][1] == "1", "Prometheus scraped the web role"
        for expr in _rule_exprs():
            answer = _query(prom_port, expr)
            assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        for expr in _dashboard_exprs():
            answer = _query(prom_port, expr)
            assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
            assert answer["data"]["result"], f"no data for dashboard query {expr}"
    finally:
        prom.stop()
        web_role.stop()
