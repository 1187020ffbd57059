"""The controller end to end: Kaito's claims in, AKS agent pools (simulated) out, status back."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import kubernetes
import pytest
from prometheus_client import REGISTRY

from gpu_provisioner.api.claims import (
    GROUP,
    INSTANCE_TYPE_LABEL,
    MACHINE,
    NODECLAIM,
    READY,
    TERMINATION_FINALIZER,
    Claim,
)
from gpu_provisioner.cloud.errors import INSUFFICIENT_CAPACITY_PHRASE
from gpu_provisioner.cloud.pool_request import MANAGED_TAG
from gpu_provisioner.lifecycle import launch, termination
from tests.integration.harness import go_provisioner_node_labels, kaito_claim, wait_for

APIS = [MACHINE, NODECLAIM]


def pool_writes(sim) -> int:
    return sim.count_requests("agentpools.create") + sim.count_requests("agentpools.delete")


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.kind)
def test_kaito_claim_gets_a_ready_gpu_node_and_deletion_removes_the_pool(
    api, claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    start_controller(sim)
    claims.create(api, kaito_claim(api, unique_name))

    claims.wait_condition(api, unique_name, READY, "True", timeout_s=60)
    claim = claims.get(api, unique_name)
    status = claim["status"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        api.launched: "True", api.registered: "True", api.initialized: "True", READY: "True"
    }
    assert TERMINATION_FINALIZER in claim["metadata"]["finalizers"]
    size = "Standard_NC6s_v3" if api is MACHINE else "Standard_NC24ads_A100_v4"  # as Kaito v0.3.1 / v0.12 ask
    assert claim["metadata"]["labels"]["node.kubernetes.io/instance-type"] == size
    assert status["capacity"]["nvidia.com/gpu"] == "1" and status["allocatable"]["nvidia.com/gpu"] == "1"

    pool = sim.pools()[unique_name]["properties"]
    assert pool["vmSize"] == size and pool["count"] == 1
    assert pool["osDiskSizeGB"] == (50 if api is MACHINE else 87)
    assert pool["nodeTaints"] == ["sku=gpu:NoSchedule"]
    assert pool["nodeLabels"]["kaito.sh/workspace"] == "workspace-phi-3-mini"
    assert pool["nodeLabels"][api.pool_label[0]] == api.pool_label[1]
    assert pool["tags"][MANAGED_TAG] == "managed"

    node = claims.node(status["nodeName"])
    assert node.spec.provider_id == status["providerID"]
    assert status["providerID"].startswith("azure:///subscriptions/")
    labels = node.metadata.labels
    assert labels["kaito.sh/workspace"] == "workspace-phi-3-mini"
    assert labels["karpenter.sh/registered"] == "true" and labels["karpenter.sh/initialized"] == "true"
    assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [("sku", "gpu", "NoSchedule")]
    assert TERMINATION_FINALIZER in node.metadata.finalizers
    owner = node.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid) == (api.kind, unique_name, claim["metadata"]["uid"])
    # One Normal Event for the launch, with the pool and its size; the phases after it are said by conditions.
    wait_for("the LaunchingAgentPool event", lambda: claims.event_messages(unique_name, "LaunchingAgentPool") == [
        f"creating agent pool {unique_name} with {size}"])
    assert claims.event_reasons(unique_name) == {"LaunchingAgentPool"}

    # Another controller's finalizer on the Node stays: gpu-provisioner lets go of its own only.
    other = "example.com/keep"
    claims.core.patch_node(node.metadata.name, {"metadata": {"finalizers": [*node.metadata.finalizers, other]}},
                           _content_type="application/merge-patch+json")
    claims.delete(api, unique_name)
    claims.wait_gone(api, unique_name, timeout_s=60)
    assert unique_name not in sim.pools()
    held = claims.node(status["nodeName"])
    assert held.metadata.finalizers == [other] and held.metadata.deletion_timestamp and held.spec.unschedulable
    claims.core.patch_node(node.metadata.name, {"metadata": {"finalizers": None}},
                           _content_type="application/merge-patch+json")
    wait_for("the Node gone", lambda: claims.node(status["nodeName"]) is None)
    assert sim.count_requests("agentpools.create") == 1
    # The deletion is said once, when it starts; the claim's release repeats nothing.
    wait_for("the DeletingAgentPool event", lambda: claims.event_messages(unique_name, "DeletingAgentPool") == [
        f"deleting agent pool {unique_name}"])
    assert "Terminated" not in claims.event_reasons(unique_name)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m["metadata"].update(name="ws-not-a-pool-name"), "InvalidPoolName"),
        (lambda m: m["spec"]["requirements"][0].update(values=["Standard_Imaginary_v9"]), "UnknownInstanceType"),
        (lambda m: m["spec"]["requirements"].pop(0), "InstanceTypeMissing"),
        (lambda m: m["spec"]["resources"]["requests"].update(storage="5Ti"), "InvalidStorageRequest"),
        # The CRDs' quantity pattern lets these two through; the controller must not make them a 30 GiB disk.
        (lambda m: m["spec"]["resources"]["requests"].update(storage="-5Gi"), "InvalidStorageRequest"),
        (lambda m: m["spec"]["resources"]["requests"].update(storage="0.5"), "InvalidStorageRequest"),
        (lambda m: m["metadata"].setdefault("annotations", {}).update({"kaito.sh/node-image-family": "windows"}),
         "UnsupportedNodeImageFamily"),
        (lambda m: m["metadata"]["labels"].update({"kubernetes.azure.com/mode": "system"}), "RestrictedLabel"),
    ],
    ids=["pool-name", "unknown-sku", "no-instance-type", "disk-too-big", "disk-negative", "disk-fractional-bytes",
         "image-family", "hostile-label"],
)
def test_bad_claim_is_refused_locally_with_a_reason_and_kept(
    mutate, reason, claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    start_controller(sim, launch_timeout_s=2)
    manifest = kaito_claim(MACHINE, unique_name)
    mutate(manifest)
    name = manifest["metadata"]["name"]
    claims.create(MACHINE, manifest)

    launched = claims.wait_condition(MACHINE, name, MACHINE.launched, "False", reason=reason)
    assert launched["message"]
    assert claims.condition(MACHINE, name, READY)["reason"] == reason
    wait_for(f"a {reason} event", lambda: reason in claims.event_reasons(name))
    time.sleep(3)  # longer than the launch timeout: a claim refused for its content is not deleted
    assert claims.get(MACHINE, name) is not None
    assert pool_writes(sim) == 0 and sim.pools() == {}
    claims.delete(MACHINE, name)
    claims.wait_gone(MACHINE, name)
    no_pool = "AKS has no agent pool for this claim (none was created, or it was already gone)"
    wait_for("the Terminated event", lambda: claims.event_messages(name, "Terminated") == [no_pool])


def test_labels_and_annotations_of_the_platform_are_left_to_aks(claims, start_sim, start_controller, unique_name):
    sim = start_sim()
    start_controller(sim)
    manifest = kaito_claim(NODECLAIM, unique_name)
    manifest["metadata"]["labels"].update({"kubernetes.io/os": "linux", "topology.kubernetes.io/zone": "elsewhere-9"})
    manifest["metadata"]["annotations"].update({"kubectl.kubernetes.io/last-applied-configuration": "{}",
                                                "kubernetes.azure.com/managed": "false"})
    claims.create(NODECLAIM, manifest)
    claims.wait_condition(NODECLAIM, unique_name, READY, "True")
    node_labels = sim.pools()[unique_name]["properties"]["nodeLabels"]
    assert "kubernetes.io/os" not in node_labels and "topology.kubernetes.io/zone" not in node_labels
    node = claims.node(claims.get(NODECLAIM, unique_name)["status"]["nodeName"])
    assert node.metadata.labels["topology.kubernetes.io/zone"] != "elsewhere-9"  # AKS's, not the claim's
    assert node.metadata.labels["kaito.sh/workspace"] == "workspace-phi-3-mini"
    annotations = node.metadata.annotations or {}
    assert annotations.get("kaito.sh/node-image-family") == "ubuntu"
    assert "kubectl.kubernetes.io/last-applied-configuration" not in annotations
    assert "kubernetes.azure.com/managed" not in annotations


def test_a_pool_of_the_claims_name_made_by_someone_else_is_never_touched(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    sim.seed_pool(unique_name, vm_size="Standard_NC6s_v3", tags={"team": "research"})
    node = wait_for("the other pool's node", lambda: next(
        (n for n in claims.core.list_node().items if n.metadata.labels.get("agentpool") == unique_name), None))
    start_controller(sim)
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name))

    launched = claims.wait_condition(MACHINE, unique_name, MACHINE.launched, "False", reason="AgentPoolNameTaken")
    assert "not made by gpu-provisioner" in launched["message"]
    wait_for("an AgentPoolNameTaken event", lambda: "AgentPoolNameTaken" in claims.event_reasons(unique_name))
    claims.delete(MACHINE, unique_name)
    claims.wait_gone(MACHINE, unique_name)
    left_alone = f"agent pool {unique_name} was not made by gpu-provisioner for this claim and is left alone"
    wait_for("the Terminated event", lambda: claims.event_messages(unique_name, "Terminated") == [left_alone])

    assert pool_writes(sim) == 0 and unique_name in sim.pools()
    kept = claims.node(node.metadata.name)
    assert kept is not None and not kept.spec.unschedulable and kept.metadata.deletion_timestamp is None


def _claim_with_a_go_provisioner_pool(api, claims, sim, name: str):
    """A claim with the finalizer Karpenter's core puts on, and the pool (up, its node joined: returned) that the Go
    gpu-provisioner made for it before gpu-provisioner replaced it."""
    manifest = kaito_claim(api, name)
    manifest["metadata"]["finalizers"] = [TERMINATION_FINALIZER]
    claim = claims.create(api, manifest)
    size = Claim(api, claim).requirement_values(INSTANCE_TYPE_LABEL)[0]
    sim.seed_pool(name, vm_size=size, node_labels=go_provisioner_node_labels(api, claim))
    node = wait_for("the pool's node", lambda: next(
        (n for n in claims.core.list_node().items if n.metadata.labels.get("agentpool") == name), None))
    return node


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.kind)
def test_deleting_a_claim_the_go_provisioner_launched_deletes_its_pool(
    api, claims, start_sim, start_controller, unique_name
):
    # Replacing the Go gpu-provisioner must not leave the GPU VMs it made running once their claims go.
    sim = start_sim()
    node = _claim_with_a_go_provisioner_pool(api, claims, sim, unique_name)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    claims.custom.patch_cluster_custom_object_status(GROUP, api.version, api.plural, unique_name, {"status": {
        "providerID": node.spec.provider_id, "nodeName": node.metadata.name,
        "conditions": [{"type": t, "status": "True", "reason": t, "message": "", "lastTransitionTime": now}
                       for t in (*api.phases, READY)]}})
    start_controller(sim)
    # Taken over as it stands: once the controller has listed the pools and looked at the claim, still Ready.
    wait_for("the controller's pool LIST", lambda: sim.count_requests("agentpools.list") >= 1)
    time.sleep(1)
    assert {c["type"]: c["status"] for c in claims.get(api, unique_name)["status"]["conditions"]} == {
        api.launched: "True", api.registered: "True", api.initialized: "True", READY: "True"}

    claims.delete(api, unique_name)
    claims.wait_gone(api, unique_name)
    assert unique_name not in sim.pools()
    assert sim.count_requests("agentpools.create") == 0 and sim.count_requests("agentpools.delete") == 1
    assert claims.event_messages(unique_name, "DeletingAgentPool") == [f"deleting agent pool {unique_name}"]
    wait_for("the node deleted", lambda: claims.node(node.metadata.name) is None)


def test_a_claim_the_go_provisioner_was_launching_gets_its_pool_without_a_second_one(
    claims, start_sim, start_controller, unique_name
):
    # The Go gpu-provisioner made the pool, then was replaced before it wrote the claim's status.
    sim = start_sim()
    node = _claim_with_a_go_provisioner_pool(NODECLAIM, claims, sim, unique_name)
    start_controller(sim)

    claims.wait_condition(NODECLAIM, unique_name, READY, "True")
    assert claims.get(NODECLAIM, unique_name)["status"]["providerID"] == node.spec.provider_id
    assert sim.count_requests("agentpools.create") == 0 and list(sim.pools()) == [unique_name]
    claims.delete(NODECLAIM, unique_name)
    claims.wait_gone(NODECLAIM, unique_name)
    assert unique_name not in sim.pools()


@pytest.mark.parametrize("preflight", [True, False], ids=["preflight", "aks-judges"])
@pytest.mark.parametrize("api", APIS, ids=lambda a: a.kind)
def test_quota_exhausted_fails_fast_with_kaitos_phrase_and_the_claim_is_kept_and_retried_with_backoff(
    api, preflight, claims, start_sim, start_controller, unique_name, monkeypatch
):
    monkeypatch.setattr(launch, "CAPACITY_RETRY_S", 0.5)
    sim = start_sim("quota-exhausted")
    refused = {"kind": api.kind, "result": "QuotaExceeded"}
    refused_before = REGISTRY.get_sample_value("gpu_provisioner_launches_total", refused) or 0
    start_controller(sim, launch_timeout_s=2, preflight=preflight)
    claims.create(api, kaito_claim(api, unique_name))
    launched = claims.wait_condition(api, unique_name, api.launched, "False", reason="QuotaExceeded")
    if api is MACHINE:
        # Kaito v0.3 fails fast only on the bare phrase; the detail is in the Event.
        assert launched["message"] == INSUFFICIENT_CAPACITY_PHRASE
    size = Claim(api, kaito_claim(api, unique_name)).requirement_values(INSTANCE_TYPE_LABEL)[0]
    if api is NODECLAIM:
        assert INSUFFICIENT_CAPACITY_PHRASE in launched["message"] and size in launched["message"]
    wait_for("a QuotaExceeded event with the detail", lambda: any(
        e.reason == "QuotaExceeded" and size in e.message and "quota" in e.message.lower()
        for e in claims.events(unique_name)))

    # Past the launch timeout the claim is kept (Kaito would make the same claim again and again), and it
    # is looked at again after 0.5, 1, 2, 4 s: not once a reconcile. The pre-flight refuses each try, so no
    # PUT is ever sent (tests/integration/test_preflight.py has the rest); without it, AKS refuses each PUT.
    time.sleep(6)
    assert claims.get(api, unique_name) is not None
    assert "LaunchTimeout" not in claims.event_reasons(unique_name)
    if preflight:
        assert sim.count_requests("agentpools.create") == 0 and 3 <= sim.count_requests("usages.list") <= 8
    else:
        assert 3 <= sim.count_requests("agentpools.create") <= 5
        # Each refused PUT is one launch attempt counted with its reason (not one per condition change).
        wait_for("a launch counted for each refused PUT", lambda: (
            REGISTRY.get_sample_value("gpu_provisioner_launches_total", refused) - refused_before
            == sim.count_requests("agentpools.create")), timeout_s=3)
    assert sum(e.count or 1 for e in claims.events(unique_name) if e.reason == "QuotaExceeded") <= 2
    assert sim.pools() == {}

    # Quota granted: the next try gets the node.
    sim.update_scenario(vcpu_quota={})
    claims.wait_condition(api, unique_name, READY, "True", timeout_s=30)


def test_unavailable_size_falls_back_to_the_next_listed_size(claims, start_sim, start_controller, unique_name):
    sim = start_sim("sku-unavailable")
    start_controller(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name, ["Standard_NC6s_v3", "Standard_NC24ads_A100_v4"]))
    claims.wait_condition(NODECLAIM, unique_name, READY, "True")
    assert sim.pools()[unique_name]["properties"]["vmSize"] == "Standard_NC24ads_A100_v4"
    assert any("Standard_NC6s_v3 unavailable (SKUNotAvailable" in message
               for message in claims.event_messages(unique_name, "TryingNextInstanceType"))


def test_allocation_failure_of_every_size_deletes_the_failed_pool(claims, start_sim, start_controller, unique_name):
    sim = start_sim("allocation-failure")
    failed = {"kind": "Machine", "result": "AllocationFailed"}
    failed_before = REGISTRY.get_sample_value("gpu_provisioner_launches_total", failed) or 0
    start_controller(sim)
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name))
    launched = claims.wait_condition(MACHINE, unique_name, MACHINE.launched, "False", reason="AllocationFailed")
    assert INSUFFICIENT_CAPACITY_PHRASE in launched["message"]
    wait_for("an AllocationFailed event", lambda: "AllocationFailed" in claims.event_reasons(unique_name))
    wait_for("the failed pool to be deleted", lambda: unique_name not in sim.pools())
    # The PUT was accepted and its pool failed: the attempt counts with the failure's reason.
    assert REGISTRY.get_sample_value("gpu_provisioner_launches_total", failed) - failed_before == (
        sim.count_requests("agentpools.create"))


def test_request_aks_refuses_is_not_retried_until_the_claim_changes(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim(unsupported_skus=["Standard_NV36ads_A10_v5"], create_delay_s=0.5)
    start_controller(sim, launch_timeout_s=3)
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name, ["Standard_NV36ads_A10_v5"]))
    launched = claims.wait_condition(MACHINE, unique_name, MACHINE.launched, "False", reason="InvalidAgentPoolRequest")
    assert "Standard_NV36ads_A10_v5" in launched["message"] and "not supported" in launched["message"]
    wait_for("an InvalidAgentPoolRequest event", lambda: "InvalidAgentPoolRequest" in claims.event_reasons(unique_name))

    # A change that is not to the spec (same generation) is reconciled but sends nothing.
    claims.custom.patch_cluster_custom_object(GROUP, MACHINE.version, MACHINE.plural, unique_name,
                                              {"metadata": {"labels": {"touched": "yes"}}})
    time.sleep(4)  # several pool refreshes, and past the launch timeout: the claim is kept
    assert sim.count_requests("agentpools.create") == 1 and claims.get(MACHINE, unique_name) is not None

    # The fixed claim gets a launch timeout of its own, counted from the fix, not from its creation.
    claims.custom.patch_cluster_custom_object(GROUP, MACHINE.version, MACHINE.plural, unique_name, {"spec": {
        "requirements": kaito_claim(MACHINE, unique_name)["spec"]["requirements"]}})
    claims.wait_condition(MACHINE, unique_name, READY, "True")
    assert sim.count_requests("agentpools.create", 400) == 1 and sim.count_requests("agentpools.create", 201) == 1


def test_missing_azure_role_is_said_on_the_claim_and_work_resumes_once_granted(
    claims, start_sim, start_controller, unique_name, monkeypatch
):
    for phase in (launch, termination):
        monkeypatch.setattr(phase, "REFUSED_RETRY_S", 0.5)
    write, delete = (f"Microsoft.ContainerService/managedClusters/agentPools/{verb}" for verb in ("write", "delete"))
    sim = start_sim(denied_actions=[write, delete])
    start_controller(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    launched = claims.wait_condition(NODECLAIM, unique_name, NODECLAIM.launched, "False", reason="AccessDenied")
    assert write in launched["message"] and "Azure Kubernetes Service Contributor Role" in launched["message"]
    assert "AccessDenied" in claims.event_reasons(unique_name) and sim.pools() == {}

    sim.update_scenario(denied_actions=[delete])  # the role is granted, but without delete
    claims.wait_condition(NODECLAIM, unique_name, READY, "True")
    claims.delete(NODECLAIM, unique_name)
    wait_for("the refused DELETE", lambda: sim.count_requests("agentpools.delete", 403) > 0)
    assert claims.get(NODECLAIM, unique_name) is not None and unique_name in sim.pools()  # nothing leaks

    sim.update_scenario(denied_actions=[])
    claims.wait_gone(NODECLAIM, unique_name)
    assert sim.pools() == {}


def test_a_refusal_that_is_not_the_claims_fault_is_retried(claims, start_sim, start_controller, unique_name,
                                                              monkeypatch):
    monkeypatch.setattr(launch, "REFUSED_RETRY_S", 0.5)
    sim = start_sim(subnet_full=True)
    start_controller(sim)
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name))
    launched = claims.wait_condition(MACHINE, unique_name, MACHINE.launched, "False", reason="AgentPoolRequestFailed")
    assert "InsufficientSubnetSize" in launched["message"]
    wait_for("an AgentPoolRequestFailed event", lambda: "AgentPoolRequestFailed" in claims.event_reasons(unique_name))

    sim.update_scenario(subnet_full=False)  # someone widened the subnet; the claim did not change
    claims.wait_condition(MACHINE, unique_name, READY, "True")


def test_a_list_azure_refuses_is_said_on_the_claim(claims, start_sim, start_controller, unique_name):
    sim = start_sim(denied_actions=["Microsoft.ContainerService/managedClusters/agentPools/read"])
    start_controller(sim)
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name))
    # A Machine says a phase that is not there yet with False (karpenter-core v0.29), never Unknown.
    launched = claims.wait_condition(MACHINE, unique_name, MACHINE.launched, "False", reason="AccessDenied")
    assert "cannot list the cluster's agent pools" in launched["message"]
    wait_for("an AccessDenied event", lambda: "AccessDenied" in claims.event_reasons(unique_name))
    assert sim.count_requests("agentpools.create") == 0

    sim.update_scenario(denied_actions=[])
    claims.wait_condition(MACHINE, unique_name, READY, "True")


def test_gpu_wait_keeps_claim_uninitialized_until_gpus_are_allocatable(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim("no-gpu")
    start_controller(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    claims.wait_condition(NODECLAIM, unique_name, NODECLAIM.registered, "True")
    initialized = claims.wait_condition(
        NODECLAIM, unique_name, NODECLAIM.initialized, "Unknown", reason="ResourceNotRegistered"
    )
    assert "nvidia.com/gpu" in initialized["message"]
    assert claims.condition(NODECLAIM, unique_name, READY)["status"] != "True"


def test_startup_taints_go_on_once_and_hold_initialization_until_removed(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    start_controller(sim)
    manifest = kaito_claim(NODECLAIM, unique_name)
    startup = {"key": "example.com/driver-not-ready", "effect": "NoSchedule"}
    manifest["spec"]["startupTaints"] = [startup]
    claims.create(NODECLAIM, manifest)
    initialized = claims.wait_condition(NODECLAIM, unique_name, NODECLAIM.initialized, "Unknown",
                                        reason="StartupTaintsExist")
    assert startup["key"] in initialized["message"]
    node_name = claims.get(NODECLAIM, unique_name)["status"]["nodeName"]
    taints = claims.node(node_name).spec.taints
    assert {(t.key, t.effect) for t in taints} >= {(startup["key"], "NoSchedule"), ("sku", "NoSchedule")}

    # What the daemon that owns the taint does once its work is done.
    kept = [{"key": t.key, "value": t.value, "effect": t.effect} for t in taints if t.key != startup["key"]]
    claims.core.patch_node(node_name, {"spec": {"taints": kept}}, _content_type="application/merge-patch+json")
    claims.wait_condition(NODECLAIM, unique_name, READY, "True")
    # Registration runs again (it copies a new claim label onto the Node) and leaves the taint off: startup
    # taints are put on once.
    claims.custom.patch_cluster_custom_object(GROUP, NODECLAIM.version, NODECLAIM.plural, unique_name,
                                              {"metadata": {"labels": {"touched": "yes"}}})
    wait_for("registration to run again", lambda: claims.node(node_name).metadata.labels.get("touched") == "yes")
    assert startup["key"] not in {t.key for t in claims.node(node_name).spec.taints or []}


def test_a_serving_node_that_blips_not_ready_does_not_flip_the_claim(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    start_controller(sim)
    node_name = claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, unique_name))["status"]["nodeName"]
    # A kubelet restart: NotReady, and the device plugin has not re-published the GPUs yet.
    claims.core.patch_node_status(node_name, {"status": {
        "conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}],
        "allocatable": {"nvidia.com/gpu": "0"}}})
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert claims.condition(NODECLAIM, unique_name, READY).get("status") == "True"
        time.sleep(0.2)


@pytest.mark.parametrize("power", ["Stopped", "Starting"])
def test_stopped_or_starting_cluster_gets_no_put_and_the_launch_timeout_deletes_the_claim(
    power, claims, start_sim, start_controller, unique_name
):
    sim = start_sim(cluster_power=power)
    start_controller(sim, launch_timeout_s=4)
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name))
    launched = claims.wait_condition(MACHINE, unique_name, MACHINE.launched, "False", reason="ClusterNotReady")
    assert power in launched["message"]
    wait_for("a ClusterNotReady event", lambda: "ClusterNotReady" in claims.event_reasons(unique_name))
    claims.wait_gone(MACHINE, unique_name, timeout_s=30)
    assert "LaunchTimeout" in claims.event_reasons(unique_name)
    assert sim.count_requests("agentpools.create") == 0


def test_a_pool_that_takes_longer_than_the_launch_timeout_to_create_is_waited_for(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim(create_delay_s=5)  # AKS GPU pools take minutes; the launch timeout is for getting one accepted
    start_controller(sim, launch_timeout_s=2, registration_timeout_s=15)
    claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    assert "LaunchTimeout" not in claims.event_reasons(unique_name)
    assert sim.count_requests("agentpools.create") == 1


def test_node_that_never_joins_hits_the_registration_timeout_and_the_pool_is_deleted(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim(materialise_nodes=False)
    start_controller(sim, registration_timeout_s=3)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    claims.wait_condition(NODECLAIM, unique_name, NODECLAIM.launched, "True")
    claims.wait_gone(NODECLAIM, unique_name, timeout_s=30)
    assert "RegistrationTimeout" in claims.event_reasons(unique_name)
    assert unique_name not in sim.pools()


def test_deletion_drains_pods_and_lets_them_finish_before_deleting_node_and_pool(
    claims, kube_api, start_sim, start_controller, unique_name
):
    sim = start_sim()
    start_controller(sim)
    node_name = claims.create_ready(MACHINE, kaito_claim(MACHINE, unique_name))["status"]["nodeName"]
    core = kubernetes.client.CoreV1Api(kube_api)
    pod = core.create_namespaced_pod("default", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{unique_name}-inference"},
        "spec": {"nodeName": node_name, "containers": [{"name": "model", "image": "mcr.microsoft.com/phi-3"}],
                 "terminationGracePeriodSeconds": 5,
                 "tolerations": [{"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]},
    })

    claims.delete(MACHINE, unique_name)
    evicted = wait_for("the eviction", lambda: core.read_namespaced_pod(
        pod.metadata.name, "default").metadata.deletion_timestamp)
    claims.wait_gone(MACHINE, unique_name)
    # The node went only once the pod's grace period (which deletionTimestamp marks the end of) was over.
    assert datetime.now(UTC) >= evicted
    assert claims.node(node_name) is None
    assert unique_name not in sim.pools()
    assert "Draining" in claims.event_reasons(unique_name)
    core.delete_namespaced_pod(pod.metadata.name, "default", grace_period_seconds=0)


def test_a_pod_disruption_budget_holds_the_node_and_pool_until_it_allows_the_eviction(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    start_controller(sim)
    node_name = claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, unique_name))["status"]["nodeName"]
    pod = f"{unique_name}-model"
    claims.start_guarded_pod(node_name, pod)
    try:
        claims.delete(NODECLAIM, unique_name)
        blocked = wait_for("a DrainBlocked event", lambda: next(
            (e for e in claims.events(unique_name) if e.reason == "DrainBlocked"), None))
        assert f"default/{pod}" in blocked.message
        assert unique_name in sim.pools() and claims.node(node_name) is not None
        assert claims.get(NODECLAIM, unique_name) is not None
    finally:
        claims.policy.delete_namespaced_pod_disruption_budget(pod, "default")
    claims.wait_gone(NODECLAIM, unique_name)
    assert unique_name not in sim.pools() and claims.node(node_name) is None


def test_termination_grace_period_bounds_a_blocked_drain(claims, start_sim, start_controller, unique_name):
    sim = start_sim()
    start_controller(sim)
    manifest = kaito_claim(NODECLAIM, unique_name)
    manifest["spec"]["terminationGracePeriod"] = "4s"
    node_name = claims.create_ready(NODECLAIM, manifest)["status"]["nodeName"]
    pod = f"{unique_name}-model"
    claims.start_guarded_pod(node_name, pod)
    try:
        claims.delete(NODECLAIM, unique_name)
        wait_for("a DrainBlocked event", lambda: "DrainBlocked" in claims.event_reasons(unique_name))
        claims.wait_gone(NODECLAIM, unique_name, timeout_s=30)
        assert "TerminationGracePeriodExpired" in claims.event_reasons(unique_name)
        assert unique_name not in sim.pools() and claims.node(node_name) is None
    finally:
        claims.remove_guarded_pod(pod)


def test_orphan_sweep_deletes_only_our_pools_without_claims(claims, start_sim, start_controller, unique_name):
    sim = start_sim()
    orphan, foreign = f"{unique_name[:8]}o", f"{unique_name[:8]}f"
    go_orphan, go_machine = f"{unique_name[:8]}g", f"{unique_name[:8]}m"
    sim.seed_pool(orphan, vm_size="Standard_NC6s_v3", tags={
        MANAGED_TAG: "managed", "kaito-claim": f"machines/{orphan}", "kaito-created-at": "2026-01-01T00:00:00Z",
    })
    sim.seed_pool(foreign, vm_size="Standard_NC6s_v3", tags={"team": "research"})
    # Made by the Go gpu-provisioner for claims that are gone: for a NodeClaim (its own sweep deleted those), and
    # for a Machine (v0.2, which had none: nothing tells when it was made).
    gone = {"metadata": {"labels": {"kaito.sh/workspace": "gone", "kaito.sh/workspacenamespace": "default"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"}}
    sim.seed_pool(go_orphan, node_labels=go_provisioner_node_labels(NODECLAIM, gone))
    sim.seed_pool(go_machine, node_labels=go_provisioner_node_labels(MACHINE, gone))
    start_controller(sim, orphan_sweep_interval_s=1, orphan_grace_s=60)
    wait_for("the orphaned pools to be deleted", lambda: not {orphan, go_orphan} & set(sim.pools()), timeout_s=30)
    assert {foreign, go_machine} <= set(sim.pools())


def test_throttled_arm_still_gets_the_claim_ready(claims, start_sim, start_controller, unique_name):
    sim = start_sim("throttled")
    start_controller(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    claims.wait_condition(NODECLAIM, unique_name, READY, "True", timeout_s=90)
    assert sim.count_requests(status=429) > 0
    assert len([p for p in sim.pools() if p == unique_name]) == 1


def test_a_claim_turning_ready_does_not_wait_for_a_worker_held_by_another_claims_launch(
    claims, start_sim, start_controller, unique_name
):
    """One worker, one kept for claims turning Ready, and ARM slow to answer pool writes (6 s): the first claim's
    node gets its GPUs while the worker waits for the second claim's PUT, and the first claim turns Ready then, not
    once that PUT is answered."""
    sim = start_sim(write_answer_delay_s=6.0, gpu_publish_delay_s=5.0)
    # The PUT on the worker, so that it holds the worker (as with ARM_WRITERS=0).
    start_controller(sim, workers=1, ready_workers=1, arm_writers=0)
    first, second = f"{unique_name[:10]}a", f"{unique_name[:10]}b"
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, first))
    wait_for("the first PUT answered", lambda: sim.count_requests("agentpools.create") == 1 or None)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, second))
    wait_for("the second PUT sent", lambda: second in sim.pools() or None)
    # Its node's GPUs come 8 s after its PUT arrived, 2 s after its answer: not before the second PUT went out.
    assert claims.condition(NODECLAIM, first, READY).get("status") != "True"

    claims.wait_condition(NODECLAIM, first, READY, "True", timeout_s=30)
    assert sim.count_requests("agentpools.create") == 1  # the second PUT still waits for its answer
    claims.wait_condition(NODECLAIM, second, READY, "True", timeout_s=30)


def test_a_burst_of_launches_does_not_wait_for_arms_answers_to_each_put(
    claims, start_sim, start_controller, unique_name
):
    """One worker, and ARM slow to answer pool writes (5 s): the PUTs of three claims all reach ARM before the first
    is answered, and their DELETEs likewise, because they are sent off the worker."""
    sim = start_sim(write_answer_delay_s=5.0)
    start_controller(sim, workers=1, ready_workers=0, arm_writers=4)
    names = [f"{unique_name[:9]}{i}" for i in range(3)]
    for name in names:
        claims.create(NODECLAIM, kaito_claim(NODECLAIM, name))
    wait_for("three PUTs at ARM", lambda: set(names) <= set(sim.pools()) or None, timeout_s=4.0)
    assert sim.count_requests("agentpools.create") == 0  # none answered yet
    # Until its PUT is answered, a claim says what it waits for.
    wait_for("the claims' status written", lambda: all(
        claims.condition(NODECLAIM, name, NODECLAIM.launched).get("reason") == "Launching" for name in names) or None)
    for name in names:
        claims.wait_condition(NODECLAIM, name, READY, "True", timeout_s=30)

    for name in names:
        claims.delete(NODECLAIM, name)
    wait_for("three DELETEs at ARM", lambda: all(
        sim.pools().get(name, {}).get("properties", {}).get("provisioningState") != "Succeeded" for name in names
    ) or None, timeout_s=4.0)
    assert sim.count_requests("agentpools.delete") == 0  # none answered yet
    for name in names:
        claims.wait_gone(NODECLAIM, name, timeout_s=30)
    assert not set(names) & set(sim.pools())
    assert sim.count_requests("agentpools.create") == sim.count_requests("agentpools.delete") == len(names)


def test_a_claim_deleted_before_arm_answers_its_put_has_its_pool_deleted(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim(write_answer_delay_s=4.0)
    start_controller(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    wait_for("the PUT at ARM", lambda: unique_name in sim.pools() or None)
    claims.delete(NODECLAIM, unique_name)
    claims.wait_gone(NODECLAIM, unique_name, timeout_s=40)
    assert unique_name not in sim.pools()
    assert sim.count_requests("agentpools.create") == 1
    # One DELETE, accepted: none was sent while the create still ran (AKS refuses those).
    assert sim.count_requests("agentpools.delete") == sim.count_requests("agentpools.delete", status=202) == 1


def test_many_claims_share_one_list_per_interval(claims, start_sim, start_controller, unique_name):
    sim = start_sim()
    start_controller(sim)
    names = [f"{unique_name[:9]}{i}" for i in range(5)]
    for name in names:
        claims.create(NODECLAIM, kaito_claim(NODECLAIM, name))
    for name in names:
        claims.wait_condition(NODECLAIM, name, READY, "True", timeout_s=90)
    assert sim.count_requests("agentpools.get") == 0
    assert sim.count_requests("agentpools.create") == len(names)


def test_deleted_claims_are_released_when_arm_says_the_delete_may_be_done_not_an_interval_later(
    claims, start_sim, start_controller, unique_name
):
    """With a one-minute pool LIST, a burst of deletions is over within seconds (the simulator's DELETE asks to be
    looked at again after a second), and its few LISTs serve every pool at once."""
    sim = start_sim(delete_delay_s=1.0)
    start_controller(sim, pool_refresh_interval_s=60.0)
    names = [f"{unique_name[:9]}{i}" for i in range(4)]
    for name in names:
        claims.create(NODECLAIM, kaito_claim(NODECLAIM, name))
    for name in names:
        claims.wait_condition(NODECLAIM, name, READY, "True", timeout_s=60)
    lists_before = sim.count_requests("agentpools.list")
    for name in names:
        claims.delete(NODECLAIM, name)
    for name in names:
        claims.wait_gone(NODECLAIM, name, timeout_s=20)
    assert not set(names) & set(sim.pools())
    assert sim.count_requests("agentpools.list") - lists_before <= 8


def test_launched_claim_whose_pool_vanished_is_deleted(claims, start_sim, start_controller, unique_name):
    sim = start_sim(delete_delay_s=3)  # the LIST sees the pool Deleting before its Node goes
    start_controller(sim)
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name))
    claims.wait_condition(MACHINE, unique_name, READY, "True")
    sim.aks.delete_pool(sim.cluster_name, unique_name)  # someone deletes the pool behind our back
    claims.wait_gone(MACHINE, unique_name, timeout_s=30)
    assert "AgentPoolVanished" in claims.event_reasons(unique_name)
    assert sim.pools() == {}


@pytest.mark.parametrize("force", [False, True], ids=["kubectl-delete-node", "node-object-removed"])
def test_deleting_a_claims_node_deletes_the_claim_and_its_pool(
    force, claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    start_controller(sim)
    node_name = claims.create_ready(MACHINE, kaito_claim(MACHINE, unique_name))["status"]["nodeName"]
    if force:  # gone at once, without our finalizer's drain
        claims.core.patch_node(node_name, {"metadata": {"finalizers": None}},
                               _content_type="application/merge-patch+json")
    claims.core.delete_node(node_name)

    claims.wait_gone(MACHINE, unique_name, timeout_s=30)
    assert "NodeDeleted" in claims.event_reasons(unique_name)
    wait_for("the pool to be deleted", lambda: unique_name not in sim.pools())
    assert claims.node(node_name) is None


def test_flaky_arm_with_5xx_and_dropped_connections_still_gets_the_claim_ready(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim("flaky", server_error_rate=0.2, drop_rate=0.1)
    start_controller(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    claims.wait_condition(NODECLAIM, unique_name, READY, "True", timeout_s=90)
    assert sim.count_requests(status=503) + sim.count_requests(status=0) > 0
    assert list(sim.pools()) == [unique_name]


def test_a_claim_api_switched_off_is_left_alone(claims, start_sim, start_controller, unique_name):
    sim = start_sim()
    start_controller(sim, claim_apis=["nodeclaim"])
    machine, nodeclaim = f"{unique_name[:9]}m", f"{unique_name[:9]}n"
    claims.create(MACHINE, kaito_claim(MACHINE, machine))
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, nodeclaim))
    claims.wait_condition(NODECLAIM, nodeclaim, READY, "True")
    untouched = claims.get(MACHINE, machine)
    assert "status" not in untouched and not untouched["metadata"].get("finalizers")
    assert list(sim.pools()) == [nodeclaim]


def test_claim_deleted_while_its_pool_is_creating_waits_out_the_busy_pool(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim(create_delay_s=3)
    start_controller(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    wait_for("the agent pool PUT", lambda: sim.count_requests("agentpools.create") == 1)
    claims.delete(NODECLAIM, unique_name)
    claims.wait_gone(NODECLAIM, unique_name, timeout_s=60)
    assert sim.pools() == {}
    # It waited for the create to end instead of sending DELETEs AKS would refuse.
    assert sim.count_requests("agentpools.delete", 409) == 0
    assert sim.count_requests("agentpools.delete", 202) == 1


def test_a_lost_put_answer_sends_no_second_pool_request(claims, start_sim, start_controller, unique_name):
    sim = start_sim(lost_create_answers=1)
    start_controller(sim, pool_refresh_interval_s=3)  # a LIST is seconds away: the guess must hold until then
    claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    # The lost one only: it may have landed (it did), so nothing is resent before a LIST shows the pool.
    assert sim.count_requests("agentpools.create", 0) == 1
    assert sim.count_requests("agentpools.create") == 1 and list(sim.pools()) == [unique_name]


def test_a_claim_deleted_right_after_a_lost_put_answer_leaves_no_pool(claims, start_sim, start_controller, unique_name):
    sim = start_sim(lost_create_answers=1, create_delay_s=2)
    start_controller(sim, pool_refresh_interval_s=3)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    wait_for("the PUT whose answer is lost", lambda: sim.count_requests("agentpools.create", 0) == 1)
    claims.delete(NODECLAIM, unique_name)
    claims.wait_gone(NODECLAIM, unique_name)
    # The finalizer held until the pool AKS made was deleted.
    assert sim.pools() == {} and sim.count_requests("agentpools.delete", 202) == 1
