"""deploy/monitoring as shipped: the rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``), the PrometheusRule holds the very same groups, every dashboard
query parses as PromQL, and every metric the dashboard and the rules use is one the project
exports -- checked against the real metric objects (the daemon's registry, the subscribers'),
so a renamed metric fails here rather than as an empty panel or an alert that never fires.

promtool comes from Debian's prometheus package (``make test`` puts it in .venv/bin when it
is not on PATH; see the Makefile).
"""

from __future__ import annotations

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

from publisher.metrics import DaemonMetrics
from subscriber.metrics import metrics_for
from tests.conftest import REPO

MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "rules.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "tests" / "rules-test.yaml"
DASHBOARD = MONITORING / "dashboard.json"
# Grafana's variables, as a query would be sent
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$key": ".*"}
METRIC = re.compile(r"\bhotreload_[a-z0-9_]+\b")


def promtool() -> str:
    """On PATH, or where `make promtool` extracts it: beside this interpreter, or in the
    checkout's .venv (for the venvs of `make test-pythons`)."""
    found = shutil.which("promtool")
    for beside in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        if found is None and (beside / "promtool").exists():
            found = str(beside / "promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: `make promtool` (Debian's prometheus package) installs it"
        )
    return found


def run_promtool(*args: str) -> str:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return exprs


def grafana_query(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def families() -> list[Any]:
    """Every metric family the project exports (the daemon's registry, the subscribers')."""
    found = list(DaemonMetrics().registry.collect())
    subscriber = metrics_for(True)
    assert subscriber is not None
    found += [
        collector.describe()[0]
        for collector in vars(subscriber).values()
        if hasattr(collector, "describe")
    ]
    return found


def exported() -> set[str]:
    """Every series name the project's metrics can produce (counters: _total and _created;
    histograms: _bucket, _count, _sum, _created), from the real objects."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    return {family.name + suffix for family in families() for suffix in suffixes[family.type]}


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    alerts = RULES.read_text().count("- alert: ")
    assert alerts >= 10  # the shipped set: none dropped by a bad edit
    assert f"SUCCESS: {alerts} rules found" in run_promtool("check", "rules", str(RULES))
    assert "SUCCESS" in run_promtool("test", "rules", str(RULE_TESTS))


def test_every_alert_has_a_unit_test() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]  # a test that it fires, not only that it stays quiet
    }
    assert alerts == tested


def test_the_prometheus_rule_holds_the_same_groups(tmp_path: Path) -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), (
        "prometheusrule.yaml differs from rules.yaml: run deploy/monitoring/gen-prometheusrule.sh"
    )
    # the generator itself makes exactly the shipped file
    copy = tmp_path / "monitoring"
    copy.mkdir()
    for path in (RULES, MONITORING / "gen-prometheusrule.sh"):
        shutil.copy(path, copy / path.name)
    subprocess.run(["sh", str(copy / "gen-prometheusrule.sh")], check=True, timeout=10)
    assert (copy / "prometheusrule.yaml").read_text() == PROMETHEUS_RULE.read_text()


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool has no query parser of its own: each query becomes a recording rule."""
    exprs = dashboard_exprs()
    rules = [
        {"record": f"hotreload:dashboard_query_{n}", "expr": grafana_query(expr)}
        for n, expr in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(exprs)} rules found" in run_promtool("check", "rules", str(path))


def panels() -> Iterator[dict[str, Any]]:
    yield from json.loads(DASHBOARD.read_text())["panels"]


def test_dashboard_panels() -> None:
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert all(METRIC.search(target["expr"]) for target in panel["targets"]), panel["title"]
    titles = " ".join(panel["title"] for panel in panels()).lower()
    for subject in ("propagation", "workers by state", "rejections", "publish errors", "redis"):
        assert subject in titles


def test_every_metric_used_is_exported() -> None:
    names = exported()
    assert "hotreload_propagation_seconds_bucket" in names  # the derivation itself works
    used: dict[str, str] = {}
    for source, exprs in (("rules.yaml", rule_exprs()), ("dashboard.json", dashboard_exprs())):
        for expr in exprs:
            for name in METRIC.findall(expr):
                used.setdefault(name, source)
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][1]["definition"]
    used.update(dict.fromkeys(METRIC.findall(variable), "dashboard.json variable"))
    missing = {name: source for name, source in used.items() if name not in names}
    assert not missing, f"metrics used but not exported: {missing}"
    # what the dashboard and the rules rest on, at least
    assert {"hotreload_workers", "hotreload_redis_connected"} <= set(used)


def test_every_metric_exported_is_shown() -> None:
    """The other way round: a metric added without a panel or a rule is one an operator
    never sees (session 10 added two: they had none until session 11)."""
    used = {name for expr in (*rule_exprs(), *dashboard_exprs()) for name in METRIC.findall(expr)}
    # a family is shown when one of its series is (counters: _total; histograms: _bucket, ...)
    unseen = {
        family.name
        for family in families()
        if not any(name == family.name or name.startswith(f"{family.name}_") for name in used)
    }
    assert not unseen, f"exported but on no panel and in no rule: {sorted(unseen)}"
