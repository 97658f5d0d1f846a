"""The monitoring files in deploy/: the Prometheus rules pass ``promtool check rules`` and their
unit tests (``promtool test rules``), every alert is tested firing and quiet, the Grafana
dashboard is a well-formed dashboard whose queries parse, and every ``pelrp_*`` series a rule or
panel queries is one that vllm_pelrp/serving/metrics.py declares (a renamed metric fails here).

promtool comes from Debian's ``prometheus`` package (scripts/setup.sh installs it); these tests
fail without it rather than skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from vllm_pelrp.serving.metrics import PelrpMetrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "pelrp-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "pelrp-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pelrp-dashboard.json"

SERIES = re.compile(r"\bpelrp_[a-z0-9_]+")
RECORDED = re.compile(r"\bpelrp:[a-z0-9_:]+")
SELECTOR = re.compile(r"\b(pelrp_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, ("promtool is missing: install Debian's prometheus package "
                    "(apt-get install --no-install-recommends prometheus; scripts/setup.sh does)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


def declared_series() -> dict[str, set[str]]:
    """Every series name the plugin exports, with the labels it carries: the names as
    prometheus_client writes them (counters ``_total``, histograms ``_bucket``/``_sum``/
    ``_count``), read from the metrics on a fresh registry."""
    registry = CollectorRegistry()
    PelrpMetrics(registry)
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        labels = {key for sample in family.samples for key in sample.labels} - {"le"}
        suffixes = {"counter": ["_total"], "gauge": [""],
                    "histogram": ["_bucket", "_sum", "_count"]}[family.type]
        for suffix in suffixes:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def unknown_series(expr: str, declared: dict[str, set[str]]) -> set[str]:
    """The ``pelrp_*`` names and label names in ``expr`` that the plugin does not export."""
    unknown = set(SERIES.findall(expr)) - set(declared)
    for name, matchers in SELECTOR.findall(expr):
        allowed = declared.get(name, set()) | TARGET_LABELS
        unknown |= {f"{name}{{{label}}}" for label in MATCHER_LABEL.findall(matchers)
                    if label not in allowed}
    used = set(SERIES.findall(expr)) & set(declared)
    allowed = TARGET_LABELS.union(*(declared[name] for name in used))
    for grouping in GROUPING.findall(expr):
        unknown |= {f"by ({label})" for label in re.findall(r"\w+", grouping)
                    if label not in allowed}
    return unknown


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(board: dict) -> list[str]:
    """The PromQL of every panel target and of every query variable."""
    queries = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    queries += [variable["query"] for variable in board["templating"]["list"]
                if variable["type"] == "query"]
    return queries


# --- the rules ----------------------------------------------------------------------------------
def test_rules_pass_promtool_check():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_rule_unit_tests_pass_promtool():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet_and_says_what_it_means():
    alerts = [rule for rule in rules() if "alert" in rule]
    assert {alert["alert"] for alert in alerts} == {
        "PelrpLowGroundingRateHigh", "PelrpBackwardQueueWaitHigh", "PelrpRefusedRecordingKeys",
        "PelrpRecordingMemoryNearCap", "PelrpExplanationErrorsHigh"}
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test["alert_rule_test"]]
    for alert in alerts:
        name = alert["alert"]
        assert "for" in alert, name
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never tested firing"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never tested quiet"
        # it fires on one target of its test, and the others stay quiet
        for case in mine:
            assert len(case["exp_alerts"]) <= 1, name


def test_rules_query_only_what_the_plugin_exports():
    declared = declared_series()
    records = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        expr = rule["expr"]
        assert not unknown_series(expr, declared), (rule.get("alert") or rule["record"], expr)
        assert set(RECORDED.findall(expr)) <= records, expr
    # every metric of the plugin but the per-call latency and the recorded bytes has an alert
    used = {name for rule in rules() for name in SERIES.findall(rule["expr"])}
    assert {"pelrp_low_grounding_total", "pelrp_grounding_score_count",
            "pelrp_backward_queue_seconds_bucket", "pelrp_refused_recording_keys",
            "pelrp_reserved_activation_bytes", "pelrp_recording_cap_bytes",
            "pelrp_explanations_total"} <= used


def test_the_name_check_catches_renamed_metrics_and_labels():
    declared = declared_series()
    assert unknown_series("rate(pelrp_explanations[5m])", declared) == {"pelrp_explanations"}
    assert unknown_series("pelrp_recorded_activation_bytes_total", declared) == {
        "pelrp_recorded_activation_bytes_total"}
    assert unknown_series('rate(pelrp_explanations_total{result="error"}[5m])', declared) == {
        "pelrp_explanations_total{result}"}
    assert unknown_series("sum by (model_name) (rate(pelrp_grounding_score_count[5m]))",
                          declared) == {"by (model_name)"}
    assert not unknown_series('sum by (le, mode) (rate(pelrp_explanation_seconds_bucket'
                              '{job=~"$job", mode="pa-lrp"}[5m]))', declared)


# --- the dashboard ------------------------------------------------------------------------------
def test_dashboard_is_a_well_formed_grafana_dashboard():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= set(variables)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), ids
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("h", "w", "x", "y")), panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"]


def test_dashboard_shows_every_metric_the_plugin_exports():
    queried = {name for expr in dashboard_queries(dashboard()) for name in SERIES.findall(expr)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in queried}
    exported = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in declared_series()}
    assert families == exported


def test_dashboard_queries_only_what_the_plugin_exports_and_parse(tmp_path):
    declared = declared_series()
    queries = dashboard_queries(dashboard())
    for expr in queries:
        assert not unknown_series(expr, declared), expr
    # promtool parses PromQL in rule files: one recording rule per query, Grafana's variables
    # given values
    values = {"$__rate_interval": "5m", "$__range": "6h", "$job": ".*", "$instance": ".*"}
    exprs = []
    for expr in queries:
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        label_values = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
        exprs.append(label_values.group(1) if label_values else expr)
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr

