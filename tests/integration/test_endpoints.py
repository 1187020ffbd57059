"""What a cluster sees of a running controller: /healthz, /readyz, /metrics and its log after a lifecycle."""

from __future__ import annotations

import json

from gpu_provisioner.api.claims import NODECLAIM
from gpu_provisioner.devenv.controlplane import free_port
from gpu_provisioner.version import version
from tests.integration.harness import http_get, kaito_claim, metric_samples, wait_for


def test_probes_metrics_and_log_tell_what_happened(claims, start_sim, controller_process, unique_name, tmp_path):
    sim = start_sim()
    metrics_port, health_port = free_port(), free_port()
    controller_process(sim, METRICS_PORT=str(metrics_port), HEALTH_PROBE_PORT=str(health_port))
    base = f"http://127.0.0.1:{health_port}"
    wait_for("/healthz", lambda: http_get(f"{base}/healthz")[0] == 200, timeout_s=30)
    wait_for("/readyz", lambda: http_get(f"{base}/readyz")[0] == 200, timeout_s=30)

    claim = claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    # Its writes carry its name: the field manager of what it set (the API server takes it from the User-Agent),
    # and the User-Agent ARM sees.
    node = claims.node(claim["status"]["nodeName"])
    assert {entry.manager for entry in node.metadata.managed_fields
            if "f:karpenter.sh/initialized" in json.dumps(entry.fields_v1)} == {"gpu-provisioner"}
    assert {entry["manager"] for entry in claim["metadata"]["managedFields"]
            if entry.get("subresource") == "status"} == {"gpu-provisioner"}
    assert {request.user_agent.split()[0] for request in sim.requests
            if request.operation.startswith("agentpools.")} == {f"gpu-provisioner/{version()}"}
    ready_gauge = ("gpu_provisioner_claims", (("kind", "NodeClaim"), ("phase", "Ready")))
    wait_for("one Ready claim in the claims-by-phase gauge", lambda: metric_samples(
        http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]).get(ready_gauge) == 1, timeout_s=15)
    claims.delete(NODECLAIM, unique_name)
    claims.wait_gone(NODECLAIM, unique_name)

    def scraped() -> dict | None:
        values = metric_samples(http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1])
        done = values.get(("gpu_provisioner_terminations_total", (("kind", "NodeClaim"), ("result", "Terminated"))))
        # Claims by phase are published every few seconds; none is left in any phase.
        phases = [v for (name, _), v in values.items() if name == "gpu_provisioner_claims"]
        return values if done and phases and not any(phases) else None

    values = wait_for("the termination and an empty claims-by-phase gauge", scraped, timeout_s=15)
    assert values[("gpu_provisioner_launches_total", (("kind", "NodeClaim"), ("result", "Launched")))] == 1
    assert values[("gpu_provisioner_arm_requests_total", (("code", "201"), ("operation", "agentpools.create")))] == 1
    assert values[("gpu_provisioner_arm_requests_total", (("code", "202"), ("operation", "agentpools.delete")))] == 1
    assert values[("gpu_provisioner_arm_requests_total", (("code", "200"), ("operation", "agentpools.list")))] >= 1
    assert ("gpu_provisioner_arm_requests_total", (("code", "200"), ("operation", "agentpools.get"))) not in values
    stage = ("gpu_provisioner_claim_stage_seconds_count", (("kind", "NodeClaim"), ("stage", "ready")))
    assert values[stage] == 1
    assert values[("gpu_provisioner_workqueue_adds_total", (("name", "claims"),))] >= 1
    assert any(name == "gpu_provisioner_build_info" for name, _ in values)

    # The log: one JSON object a line, each reconcile's line naming its claim.
    lines = [json.loads(line) for line in (tmp_path / "controller-0.log").read_text().splitlines()]
    about_claim = [line for line in lines if line.get("claim") == f"nodeclaims/{unique_name}"]
    assert {"agent pool create started", "claim terminated"} <= {line["event"] for line in about_claim}
    assert all({"level", "timestamp"} <= line.keys() for line in lines)


def test_readyz_says_the_agent_pool_list_fails_and_binds_where_told(claims, start_sim, controller_process):
    sim = start_sim(denied_actions=["Microsoft.ContainerService/managedClusters/agentPools/read"])
    health_port, metrics_port = free_port(), free_port()
    controller_process(sim, HEALTH_PROBE_PORT=str(health_port), METRICS_PORT=str(metrics_port),
                       BIND_ADDRESS="127.0.0.2")
    base = f"http://127.0.0.2:{health_port}"
    wait_for("/healthz", lambda: http_get(f"{base}/healthz")[0] == 200, timeout_s=30)
    wait_for("a refused LIST", lambda: sim.count_requests("agentpools.list", 403) > 0, timeout_s=30)
    status, reason = wait_for("/readyz naming the failing LIST", lambda: (
        (answer := http_get(f"{base}/readyz"))[1].startswith("agent pool list failing: ") and answer), timeout_s=30)
    assert status == 503 and "AuthorizationFailed" in reason, reason
    # Both servers listen on the address set, and only there.
    assert http_get(f"http://127.0.0.2:{metrics_port}/metrics")[0] == 200
    assert http_get(f"http://127.0.0.1:{health_port}/healthz")[0] == 0
    assert http_get(f"http://127.0.0.1:{metrics_port}/metrics")[0] == 0

    sim.update_scenario(denied_actions=[])
    wait_for("/readyz once a LIST succeeded", lambda: http_get(f"{base}/readyz")[0] == 200, timeout_s=30)
