"""The pre-flight before a PUT, through the real API server, the simulator and the real Azure SDKs: a used-up
quota or a restricted size costs no PUT, the next listed size is tried, pools in flight are counted, and
without read access to the Compute APIs the controller falls back to its built-in table and says so."""

from __future__ import annotations

import json
import time

from prometheus_client import REGISTRY

from gpu_provisioner.api.claims import MACHINE, NODECLAIM, READY
from gpu_provisioner.cloud.errors import INSUFFICIENT_CAPACITY_PHRASE
from gpu_provisioner.lifecycle import launch
from tests.integration.harness import free_port, http_get, kaito_claim, metric_samples, wait_for

NC6, A100 = "Standard_NC6s_v3", "Standard_NC24ads_A100_v4"


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("gpu_provisioner_preflight_refusals_total", {"reason": reason}) or 0.0


def test_used_up_quota_is_refused_before_any_put_and_the_phrase_lets_kaito_fail_fast(
    claims, start_sim, start_controller, unique_name, monkeypatch
):
    monkeypatch.setattr(launch, "CAPACITY_RETRY_S", 0.5)
    sim = start_sim("quota-exhausted")
    start_controller(sim)
    before = refusals("QuotaExceeded")
    machine, nodeclaim = unique_name, unique_name + "n"
    claims.create(MACHINE, kaito_claim(MACHINE, machine, [NC6]))
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, nodeclaim, [A100]))
    launched = claims.wait_condition(MACHINE, machine, MACHINE.launched, "False", reason="QuotaExceeded")
    assert launched["message"] == INSUFFICIENT_CAPACITY_PHRASE  # Kaito v0.3 compares for equality
    launched = claims.wait_condition(NODECLAIM, nodeclaim, NODECLAIM.launched, "False", reason="QuotaExceeded")
    assert launched["message"].startswith(INSUFFICIENT_CAPACITY_PHRASE)
    for detail in ("StandardNCADSA100v4Family", "limit 0", "usage 0", "need 24", "no request was sent"):
        assert detail in launched["message"]
    event = wait_for("the Machine's QuotaExceeded event with the family and numbers", lambda: next(
        (m for m in claims.event_messages(machine, "QuotaExceeded") if "standardNCSv3Family" in m), None))
    assert "limit 0" in event and "need 6" in event

    time.sleep(3)  # retried with backoff (0.5, 1, 2 s): still no PUT, and usage read at most once per interval
    assert sim.count_requests("agentpools.create") == 0 and sim.pools() == {}
    assert 2 <= sim.count_requests("usages.list", 200) <= 8
    assert refusals("QuotaExceeded") - before >= 4

    sim.update_scenario(vcpu_quota={})  # quota granted: the next try gets the node
    claims.wait_condition(MACHINE, machine, READY, "True", timeout_s=30)
    claims.wait_condition(NODECLAIM, nodeclaim, READY, "True", timeout_s=30)
    assert sim.count_requests("agentpools.create", 400) == 0


def test_the_next_size_is_tried_when_quota_runs_out_counting_pools_in_flight(
    claims, start_sim, start_controller, unique_name
):
    # Room for two NC6s_v3; three claims within one usage interval: the third must not pass on stale usage.
    sim = start_sim(vcpu_quota={"standardNCSv3Family": 12})
    start_controller(sim, quota_refresh_interval_s=600)
    names = [f"{unique_name}{i}" for i in range(3)]
    for name in names:
        claims.create(NODECLAIM, kaito_claim(NODECLAIM, name, [NC6, A100]))
    for name in names:
        claims.wait_condition(NODECLAIM, name, READY, "True")
    sizes = sorted(sim.pools()[name]["properties"]["vmSize"] for name in names)
    assert sizes == sorted([NC6, NC6, A100])
    assert sim.count_requests("agentpools.create", 400) == 0 and sim.count_requests("agentpools.create") == 3
    assert sim.count_requests("usages.list") == 1  # one read shared by all three claims
    fell_back = next(name for name in names if sim.pools()[name]["properties"]["vmSize"] == A100)
    assert any("QuotaExceeded" in m and "no request was sent" in m
               for m in claims.event_messages(fell_back, "TryingNextInstanceType"))


def test_a_restricted_size_is_refused_before_any_put_and_one_zone_left_is_enough(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim(unavailable_skus=[NC6], zone_restricted_skus={A100: ["1", "2"]})
    start_controller(sim)
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name, [NC6]))
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name + "n", [NC6, A100]))
    launched = claims.wait_condition(MACHINE, unique_name, MACHINE.launched, "False", reason="SKUNotAvailable")
    assert launched["message"] == INSUFFICIENT_CAPACITY_PHRASE
    wait_for("a SKUNotAvailable event naming the restriction", lambda: any(
        "NotAvailableForSubscription" in m for m in claims.event_messages(unique_name, "SKUNotAvailable")))
    claims.wait_condition(NODECLAIM, unique_name + "n", READY, "True")
    assert sim.pools()[unique_name + "n"]["properties"]["vmSize"] == A100  # zone 3 is left: a regional pool goes
    assert [r.status for r in sim.requests if r.operation == "agentpools.create"] == [201]
    assert any("SKUNotAvailable" in m for m in claims.event_messages(unique_name + "n", "TryingNextInstanceType"))


def test_without_read_access_to_the_compute_apis_the_table_is_used_said_and_aks_judges(
    claims, start_sim, controller_process, unique_name, tmp_path
):
    sim = start_sim("no-compute-read-access", vcpu_quota={"standardNCSv3Family": 0})
    metrics_port = free_port()
    controller_process(sim, METRICS_PORT=str(metrics_port), QUOTA_REFRESH_INTERVAL_SECONDS="0.5")
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name, [NC6]))
    # No pre-flight without the usage numbers: the PUT goes out and AKS refuses it, handled as before.
    claims.wait_condition(MACHINE, unique_name, MACHINE.launched, "False", reason="QuotaExceeded", timeout_s=30)
    assert sim.count_requests("agentpools.create", 400) >= 1
    assert sim.count_requests("skus.list", 403) >= 1 and sim.count_requests("usages.list", 403) >= 1

    def live(api: str) -> float | None:
        samples = metric_samples(http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1])
        return samples.get(("gpu_provisioner_azure_catalogue_live", (("api", api), ("region", sim.location))))

    assert wait_for("the catalogue gauge", lambda: live("resource_skus") == 0 and live("usages") == 0, timeout_s=10)
    lines = [json.loads(line) for line in (tmp_path / "controller-0.log").read_text().splitlines()
             if line.startswith("{")]
    fallback = {line["api"]: line for line in lines if line.get("event", "").startswith("Azure refused")}
    assert "built-in VM size table" in fallback["resource_skus"]["event"]
    assert "Microsoft.Compute/skus/read" in fallback["resource_skus"]["error"]
    assert "AKS judges" in fallback["usages"]["event"]
