"""The exported metrics: the README's table lists exactly them, and the work queue's in-flight gauges."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gpu_provisioner import metrics
from gpu_provisioner.lifecycle.liveness import disruption_reason
from gpu_provisioner.runtime.workqueue import WorkQueue

README = Path(__file__).resolve().parents[2] / "README.md"
# What the exposition adds to a metric's name, by type.
SUFFIXES = {"counter": "_total", "info": "_info"}


def readme_metrics_table() -> dict[str, tuple[str, ...]]:
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|([a-z_, ]*)\|", section, re.MULTILINE)
    return {name: tuple(label.strip() for label in labels.split(",") if label.strip()) for name, labels in rows}


def test_the_readme_metrics_table_lists_every_metric_with_its_labels():
    exported = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + SUFFIXES.get(metric._type, "")
            # An Info's labels are the keys it is given (the version), not declared ones.
            exported[name] = ("version",) if metric._type == "info" else tuple(metric._labelnames)
    assert readme_metrics_table() == exported


def test_no_created_series_are_exported():
    metrics.LAUNCHES.labels(kind="NodeClaim", result="Launched")
    text = generate_latest(REGISTRY).decode()
    assert not [s.name for f in text_string_to_metric_families(text) for s in f.samples if s.name.endswith("_created")]


def test_unfinished_work_and_longest_running_processor_follow_the_workers():
    now = [100.0]
    queue = WorkQueue("gauges", clock=lambda: now[0])

    def gauge(name: str) -> float | None:
        return REGISTRY.get_sample_value(f"gpu_provisioner_workqueue_{name}", {"name": "gauges"})

    assert gauge("unfinished_work_seconds") == 0 and gauge("longest_running_processor_seconds") == 0
    queue.add("a")
    queue.add("b")
    assert queue.get(0) == "a"
    now[0] += 3
    assert queue.get(0) == "b"
    now[0] += 7
    assert gauge("unfinished_work_seconds") == 17 and gauge("longest_running_processor_seconds") == 10
    queue.done("a")
    assert gauge("unfinished_work_seconds") == 7 and gauge("longest_running_processor_seconds") == 7
    queue.done("b")
    assert gauge("unfinished_work_seconds") == 0 and gauge("longest_running_processor_seconds") == 0


def test_disruption_reasons_are_karpenters_where_it_has_one():
    assert disruption_reason("LaunchTimeout") == disruption_reason("RegistrationTimeout") == "liveness"
    assert disruption_reason("AgentPoolVanished") == "garbage_collected"
    assert disruption_reason("NodeDeleted") == "node_deleted"
