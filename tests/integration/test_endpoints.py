"""What a cluster sees of a running controller: /healthz, /readyz and /metrics after a lifecycle."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from gpu_provisioner.api.claims import NODECLAIM, READY
from gpu_provisioner.devenv.controlplane import free_port
from tests.integration.harness import kaito_claim, wait_for


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_probes_and_metrics_tell_what_happened(claims, start_sim, controller_process, unique_name):
    sim = start_sim()
    metrics_port, health_port = free_port(), free_port()
    controller_process(sim, METRICS_PORT=str(metrics_port), HEALTH_PROBE_PORT=str(health_port))
    base = f"http://127.0.0.1:{health_port}"
    wait_for("/healthz", lambda: http_get(f"{base}/healthz")[0] == 200, timeout_s=30)
    wait_for("/readyz", lambda: http_get(f"{base}/readyz")[0] == 200, timeout_s=30)

    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    claims.wait_condition(NODECLAIM, unique_name, READY, "True")
    claims.delete(NODECLAIM, unique_name)
    claims.wait_gone(NODECLAIM, unique_name)

    def scraped() -> dict | None:
        values = samples(http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1])
        done = values.get(("gpu_provisioner_terminations_total", (("kind", "NodeClaim"), ("result", "Terminated"))))
        return values if done else None

    values = wait_for("the termination to be counted", scraped, timeout_s=10)
    assert values[("gpu_provisioner_launches_total", (("kind", "NodeClaim"), ("result", "Launched")))] == 1
    assert values[("gpu_provisioner_arm_requests_total", (("code", "201"), ("operation", "agentpools.create")))] == 1
    assert values[("gpu_provisioner_arm_requests_total", (("code", "202"), ("operation", "agentpools.delete")))] == 1
    assert values[("gpu_provisioner_arm_requests_total", (("code", "200"), ("operation", "agentpools.list")))] >= 1
    assert ("gpu_provisioner_arm_requests_total", (("code", "200"), ("operation", "agentpools.get"))) not in values
    stage = ("gpu_provisioner_claim_stage_seconds_count", (("kind", "NodeClaim"), ("stage", "ready")))
    assert values[stage] == 1
    assert values[("gpu_provisioner_workqueue_adds_total", (("name", "claims"),))] >= 1
    assert any(name == "gpu_provisioner_build_info" for name, _ in values)
