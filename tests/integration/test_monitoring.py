"""What an operator's monitoring reads: Karpenter's metric names after real claim lifecycles, and the chart's
alerts and Grafana dashboard, their PromQL run by a real Prometheus 3 scraping a real controller, and by promtool."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import MACHINE, NODECLAIM
from gpu_provisioner.devenv.controlplane import free_port
from gpu_provisioner.devenv.tools import PROMETHEUS, ensure_tools
from tests.integration.harness import http_get, kaito_claim, metric_samples, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "gpu-provisioner"
RULES = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
# What Grafana would put in for the dashboard's variables, against the test's Prometheus that scrapes every second.
DASHBOARD_VARIABLES = {"$__rate_interval": "15s", "$namespace": ".*"}
# The synthetic series made from one scrape: this many minutes of samples a minute apart.
MINUTES = 20


@pytest.fixture(scope="module")
def promtool() -> Path:
    return ensure_tools(tools=(PROMETHEUS,)).promtool


@contextmanager
def prometheus_scraping(target: str, directory: Path) -> Iterator[str]:
    """A Prometheus server scraping `target` every second and evaluating the chart's alerts; yields its URL."""
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "gpu-provisioner", "static_configs": [{"targets": [target]}]}]}
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    binary = ensure_tools(tools=(PROMETHEUS,)).prometheus
    with open(directory / "prometheus.log", "wb") as log:
        process = subprocess.Popen([
            str(binary), f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("Prometheus ready", lambda: http_get(f"{url}/-/ready")[0] == 200, timeout_s=30)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def prometheus_api(url: str, path: str, **params: str) -> Any:
    status, body = http_get(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
    assert status == 200, body
    return json.loads(body)["data"]


def run_promtool(promtool: Path, *args: str, cwd: Path = REPO) -> str:
    result = subprocess.run([str(promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def promtool_rules_test(promtool: Path, directory: Path, exprs: dict[str, str], series: list[dict[str, str]]) -> None:
    """Each expression must parse and return at least one element at the end of the series: one alert per
    expression, on absent(expr), that promtool's rule test expects never to fire."""
    rules = {"groups": [{"name": "queries", "rules": [
        {"alert": name, "expr": f"absent({expr})"} for name, expr in exprs.items()]}]}
    (directory / "queries.yaml").write_text(yaml.safe_dump(rules))
    run_promtool(promtool, "check", "rules", "queries.yaml", cwd=directory)
    test = {"rule_files": ["queries.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [{"eval_time": f"{MINUTES}m", "alertname": name, "exp_alerts": []} for name in exprs],
    }]}
    (directory / "queries_test.yaml").write_text(yaml.safe_dump(test))
    run_promtool(promtool, "test", "rules", "queries_test.yaml", cwd=directory)


def series_from_scrape(text: str) -> list[dict[str, str]]:
    """promtool input series that end at the scraped values: counters and histograms grow to them from 0 over
    MINUTES (so rate() and histogram_quantile() have something to work on), gauges hold them."""
    series = []
    for family in text_string_to_metric_families(text):
        grows = family.type in ("counter", "histogram", "summary")
        for sample in family.samples:
            labels = ",".join(f"{key}={json.dumps(value)}" for key, value in sorted(sample.labels.items()))
            values = f"0+{sample.value / MINUTES!r}x{MINUTES}" if grows else f"{sample.value!r}x{MINUTES}"
            series.append({"series": f"{sample.name}{{{labels}}}", "values": values})
    return series


def samples(values: dict, name: str) -> dict:
    """The samples of one metric in a metric_samples() dict, by their labels."""
    return {labels: value for (sample, labels), value in values.items() if sample == name}


def dashboard_queries() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r} uses a variable the test does not fill: {expr}"
            queries[f"Panel{panel['id']}{target['refId']}"] = expr
    return queries


def test_alert_rules_pass_promtool_check_and_their_unit_tests(promtool):
    assert "SUCCESS: 7 rules found" in run_promtool(promtool, "check", "rules", str(RULES))
    run_promtool(promtool, "test", "rules", "tests/promql/alerts_test.yaml")


def test_stage_buckets_read_p95_of_8_to_11_s_right_and_spread_gpu_launches(promtool, tmp_path):
    registry = CollectorRegistry()
    stage = Histogram("stage", "claim stage", buckets=metrics.STAGE_BUCKETS, registry=registry)
    # 100 claims ready after 8.00, 8.03, ... 10.97 s: the true p95 is 10.85 s.
    for i in range(100):
        stage.observe(8 + 0.03 * i)
    series = series_from_scrape(generate_latest(registry).decode())
    p95 = "histogram_quantile(0.95, rate(stage_bucket[10m]))"
    promtool_rules_test(promtool, tmp_path, {"P95Close": f"{p95} > 10.3 and {p95} < 11.4"}, series)
    # Real GPU nodes are ready 3-10 minutes after their claim: ten buckets at least, not two or three.
    assert len([le for le in metrics.STAGE_BUCKETS if 180 <= le <= 600]) >= 10
    assert metrics.STAGE_BUCKETS[-1] == 1800


def test_chart_ships_the_dashboard_and_the_rules_only_when_asked(control_plane):
    def render(*sets: str) -> list[dict[str, Any]]:
        argv = [str(control_plane.tools.helm), "template", "gp", str(CHART), "--namespace", "gpu",
                "--kube-version", "1.30.0", *(arg for value in sets for arg in ("--set", value))]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    assert not [d for d in render() if d["kind"] == "PrometheusRule" or "grafana_dashboard" in str(d)]
    docs = render("grafanaDashboard.enabled=true", "prometheusRule.enabled=true",
                  "prometheusRule.additionalLabels.release=kube-prometheus-stack",
                  "grafanaDashboard.annotations.grafana_folder=GPU")
    dashboard = next(d for d in docs if d["metadata"]["name"] == "gp-gpu-provisioner-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "GPU"}
    assert json.loads(dashboard["data"]["gpu-provisioner.json"]) == json.loads(DASHBOARD.read_text())
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["metadata"]["namespace"] == "gpu" and rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # Exactly the rules promtool checked and tested.
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_claim_lifecycles_export_karpenters_metrics_and_a_live_prometheus_reads_every_dashboard_query(
    claims, start_sim, controller_process, unique_name, tmp_path
):
    # The first PUT's answer is lost: a reconcile error, a retry and a transient launch result to show.
    sim = start_sim(lost_create_answers=1)
    metrics_port = free_port()
    controller_process(sim, METRICS_PORT=str(metrics_port))
    with prometheus_scraping(f"127.0.0.1:{metrics_port}", tmp_path) as prometheus:
        nodeclaim, machine = unique_name, f"{unique_name}m"
        claims.create(NODECLAIM, kaito_claim(NODECLAIM, nodeclaim))
        wait_for("the first PUT", lambda: sim.count_requests("agentpools.create") >= 1, timeout_s=30)
        claims.create_ready(MACHINE, kaito_claim(MACHINE, machine))
        claims.wait_condition(NODECLAIM, nodeclaim, "Ready", "True", timeout_s=60)

        # The NodeClaim is deleted by its owner; the Machine's Node under it, so the controller deletes the Machine.
        claims.delete(NODECLAIM, nodeclaim)
        claims.core.delete_node(claims.get(MACHINE, machine)["status"]["nodeName"])
        claims.wait_gone(NODECLAIM, nodeclaim)
        claims.wait_gone(MACHINE, machine)

        def terminations_counted() -> dict | None:
            values = metric_samples(http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1])
            done = [values.get(("karpenter_nodeclaims_terminated_total", (
                ("capacity_type", "on-demand"), ("nodepool", nodepool)))) for nodepool in ("kaito", "default")]
            return values if done == [1, 1] else None

        values = wait_for("both terminations counted", terminations_counted, timeout_s=15)
        for nodepool in ("kaito", "default"):  # a NodeClaim's nodepool, a Machine's provisioner
            assert values[("karpenter_nodeclaims_created_total", (
                ("capacity_type", "on-demand"), ("nodepool", nodepool), ("reason", "provisioned")))] == 1
            assert values[("karpenter_nodes_created_total", (("nodepool", nodepool),))] == 1
            assert values[("karpenter_nodes_terminated_total", (("nodepool", nodepool),))] == 1
        assert samples(values, "karpenter_nodeclaims_disrupted_total") == {
            (("capacity_type", "on-demand"), ("nodepool", "default"), ("reason", "node_deleted")): 1}
        # One launch result per PUT: the lost answer, then the pool it made once it was up; the Machine's one PUT.
        assert samples(values, "gpu_provisioner_launches_total") == {
            (("kind", "NodeClaim"), ("result", "CloudTransientError")): 1,
            (("kind", "NodeClaim"), ("result", "Launched")): 1,
            (("kind", "Machine"), ("result", "Launched")): 1}
        assert samples(values, "gpu_provisioner_arm_request_duration_seconds_count")[
            (("operation", "agentpools.create"),)] == sim.count_requests("agentpools.create")
        assert values[("gpu_provisioner_leader", ())] == 1  # leader election is off: this replica reconciles
        assert values[("gpu_provisioner_workqueue_unfinished_work_seconds", (("name", "claims"),))] >= 0
        assert values[("gpu_provisioner_workqueue_longest_running_processor_seconds", (("name", "claims"),))] >= 0
        assert not [name for name, _ in values if name.endswith("_created")]

        # Every dashboard query returns data from what Prometheus scraped, and a healthy run leaves every alert
        # inactive (none even pending), each rule evaluating without error.
        queries = dashboard_queries()

        def empty_queries() -> list[str] | None:
            empty = [expr for expr in queries.values() if not prometheus_api(prometheus, "query", query=expr)["result"]]
            return empty or None

        empty: list[str] = []
        try:
            wait_for("the scrapes to hold the whole run", lambda: not empty_queries(), timeout_s=20)
        except AssertionError:
            empty = empty_queries() or []
        assert empty == []
        def rules() -> list[dict[str, Any]]:
            return [rule for group in prometheus_api(prometheus, "rules")["groups"] for rule in group["rules"]]

        assert len(rules()) == 7 and {rule["health"] for rule in rules()} == {"ok"}
        # A terminating claim makes GpuProvisionerClaimStuckTerminating pending until the claims gauge is published.
        wait_for("every alert inactive", lambda: not [r["name"] for r in rules() if r["state"] != "inactive"],
                 timeout_s=15)
