"""The Grafana dashboard and the Prometheus alerts in deploy/ ask for metrics that exist.

Every PromQL query of deploy/grafana/queue-worker.json (panels and template variables)
and every rule of deploy/prometheus/alerts.yml names only metrics the service exports
(app/metrics.py's registry, rendered: histograms as `_bucket`, `_sum`, `_count`,
counters as `_total`) or Prometheus's own `up`; the names shared with the console
(SHARED_METRICS, fixed in the plan of issue 17) must be among them. promtool parses the
dashboard's queries (as recording rules, with Grafana's variables filled in), checks the
alert rules and runs their unit tests (deploy/prometheus/alerts.test.yml). Without
promtool those tests skip, or fail under CI.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import app.metrics  # noqa: F401 - registers every metric of the service
from tests.support.prometheus import require_binary

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "queue-worker.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"

# Names agreed between the console (its gauges) and these files (the counter), so that
# the dashboard and the console read the same series.
SHARED_METRICS = frozenset(
    {
        "queue_worker_queue_dead_letters",
        "queue_worker_queue_paused",
        "queue_worker_missed_webhooks_total",
    }
)
# Written by Prometheus itself for every target.
PROMETHEUS_METRICS = frozenset({"up"})

# What the sample names of each metric type are, as the exposition writes them.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}
# Grafana's variables, filled in so that the queries are PromQL.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".+",
    "$queue": ".+",
}
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)


def exported_names() -> set[str]:
    """The sample names of the service's own metrics, as /metrics renders them."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("queue_worker_"):
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Strings, label matchers, ranges and grouping clauses are taken out; what is left
    are function names (followed by a parenthesis), keywords, numbers and metric names.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    # Numbers and durations (`0.95`, `1h` after offset): a digit first.
    text = re.sub(r"(?<![A-Za-z0-9_:])\d[\w.]*", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group()
        after = text[match.end() :].lstrip()
        if after.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard, Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries: list[tuple[str, str]] = []
    for panel in _walk_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"]
        # label_values(<selector>, label): the selector is the PromQL part.
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert match, f"variable {variable['name']}: expected label_values(...), got {query}"
        queries.append((f"variable ${variable['name']}", match[1]))
    result = []
    for where, expr in queries:
        for variable, value in _GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: an unknown Grafana variable in {expr}"
        result.append((where, expr))
    return result


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


KNOWN = exported_names() | PROMETHEUS_METRICS


def test_the_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (queue, le) (rate(a_bucket{job=~"x", q="y}"}[5m])))'
        " / on (queue) group_left sum without (le) (b_total offset 1h) > bool 0.1 or up"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up"}


def test_the_service_exports_what_the_dashboard_is_about() -> None:
    # The renderer above is what the checks below lean on: it must see the real names.
    assert {
        "queue_worker_jobs_total",
        "queue_worker_job_duration_seconds_bucket",
        "queue_worker_queue_length",
        "queue_worker_missed_webhooks_total",
        "queue_worker_smtp_connections_total",
    } <= exported_names()
    assert SHARED_METRICS <= exported_names()


def test_every_dashboard_query_names_exported_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    used: set[str] = set()
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        unknown = names - KNOWN
        assert not unknown, f"{where}: {sorted(unknown)} not exported by the service"
        used |= names
    # What issue 17 asks the dashboard to show.
    assert {
        "queue_worker_queue_length",
        "queue_worker_queue_oldest_message_age_seconds",
        "queue_worker_jobs_total",
        "queue_worker_job_duration_seconds_bucket",
        "queue_worker_queue_dead_letters",
        "queue_worker_missed_webhooks_total",
        "queue_worker_smtp_connections_total",
    } <= used


def test_every_alert_names_exported_metrics() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == {
        "QueueWorkerQueueTooOld",
        "QueueWorkerQueueGrowing",
        "QueueWorkerDeadLettersRising",
        "QueueWorkerJobErrorRate",
        "QueueWorkerMissedWebhooks",
        "QueueWorkerTargetDown",
    }
    for rule in rules:
        unknown = metric_names(rule["expr"]) - KNOWN
        assert not unknown, f"alert {rule['alert']}: {sorted(unknown)} not exported"


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases: dict[str, list[bool]] = {}
    for test in tests:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    for rule in alert_rules():
        # Shown firing, and shown quiet.
        assert set(cases.get(rule["alert"], [])) == {True, False}, rule["alert"]


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_runs_the_alert_unit_tests() -> None:
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # As recording rules, so that promtool's PromQL parser reads each one.
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": expr}
                    for n, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


@pytest.mark.parametrize("path", [DASHBOARD], ids=["queue-worker.json"])
def test_the_dashboard_is_importable(path: Path) -> None:
    """What Grafana's import needs: a title, a uid, a datasource variable, unique panel ids."""
    dashboard = json.loads(path.read_text())
    assert dashboard["title"] and dashboard["uid"] == "queue-worker"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in _walk_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in _walk_panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
