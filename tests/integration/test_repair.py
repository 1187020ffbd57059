"""GPU nodes that never become useful, or stop being useful: the initialization timeout and node repair,
end to end through the real API server, the AKS simulator and its kubelet stand-in (timeouts shortened by
settings; the decisions' timing against a moved clock is in tests/unit/test_repair.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY

from gpu_provisioner.api.claims import GROUP, MACHINE, NODECLAIM, READY, rfc3339
from gpu_provisioner.lifecycle.repair import GPU_UNAVAILABLE_SINCE
from tests.integration.harness import kaito_claim, wait_for

REPAIR_EVENTS = {"NodeUnhealthy", "NodeRepairBlocked", "NodeRepair"}


def repairs(kind: str, reason: str) -> float:
    return REGISTRY.get_sample_value("gpu_provisioner_node_repairs_total", {"kind": kind, "reason": reason}) or 0.0


def test_simulated_nodes_in_service_lose_their_gpus_or_go_unknown_as_the_scenario_says(claims, start_sim, unique_name):
    sim = start_sim(gpus_lost_after_s=0.5, node_lost_after_s=1.5)
    sim.seed_pool(unique_name, "Standard_NC24ads_A100_v4")

    def node():
        return next((n for n in claims.core.list_node().items if n.metadata.labels.get("agentpool") == unique_name),
                    None)

    def gpus():
        current = node()
        return ((current and current.status.allocatable) or {}).get("nvidia.com/gpu")

    wait_for("the GPUs to be published", lambda: gpus() == "1")
    wait_for("the GPUs to vanish", lambda: gpus() == "0")
    assert node().status.capacity["nvidia.com/gpu"] == "1"  # the device plugin still lists the device
    ready = wait_for("Ready to turn Unknown", lambda: next(
        (c for c in node().status.conditions if c.type == "Ready" and c.status == "Unknown"), None))
    assert ready.reason == "NodeStatusUnknown"


def test_a_node_that_never_publishes_its_gpus_is_deleted_after_the_initialization_timeout(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim("no-gpu")  # a driver or device-plugin failure: the node is Ready, nvidia.com/gpu never comes
    start_controller(sim, initialization_timeout_s=3)
    names = {MACHINE: f"{unique_name}m", NODECLAIM: f"{unique_name}n"}
    for api, name in names.items():
        claims.create(api, kaito_claim(api, name))
    nodes = {}
    for api, name in names.items():
        # Meanwhile each API says it waits as its Karpenter release does (Machine False, NodeClaim Unknown).
        initialized = claims.wait_condition(api, name, api.initialized, api.pending_status,
                                            reason="ResourceNotRegistered")
        assert "nvidia.com/gpu" in initialized["message"]
        nodes[api] = claims.get(api, name)["status"]["nodeName"]
    for api, name in names.items():
        claims.wait_gone(api, name, timeout_s=30)
        [message] = claims.event_messages(name, "InitializationTimeout")
        assert message.startswith("initialization did not finish within 3s (nvidia.com/gpu never became allocatable "
                                  f"on node {nodes[api]}: check the GPU driver and the device plugin)")
        wait_for("the pool to be deleted", lambda n=name: n not in sim.pools())
        assert claims.node(nodes[api]) is None
    assert sim.count_requests("agentpools.create") == 2  # a new node is Kaito's to ask for, with a new claim


def test_a_serving_node_whose_gpus_vanish_is_replaced_after_the_toleration(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim(gpus_lost_after_s=1.0)  # every node's GPUs vanish a second after it came up whole
    start_controller(sim, node_repair_toleration_s=3, node_repair_max_unhealthy_percent=100)
    names = {MACHINE: f"{unique_name}m", NODECLAIM: f"{unique_name}n"}
    before = {api: repairs(api.kind, "GPUUnavailable") for api in names}
    for api, name in names.items():
        claims.create(api, kaito_claim(api, name))
    nodes = {}
    for api, name in names.items():
        claims.wait_condition(api, name, READY, "True")
        nodes[api] = claims.get(api, name)["status"]["nodeName"]
    for api, name in names.items():
        [noticed] = wait_for("a NodeUnhealthy event", lambda n=name: claims.event_messages(n, "NodeUnhealthy"))
        since = claims.node(nodes[api]).metadata.annotations[GPU_UNAVAILABLE_SINCE]
        assert f"node {nodes[api]} has no allocatable nvidia.com/gpu" in noticed and since in noticed
        # Within the toleration the claim stays as it was: Ready (Kaito keeps serving, or trying to).
        assert claims.condition(api, name, READY)["status"] == "True"
    for api, name in names.items():
        node_name = nodes[api]
        claims.wait_gone(api, name, timeout_s=30)
        [repaired] = claims.event_messages(name, "NodeRepair")
        assert f"node {node_name} has no allocatable nvidia.com/gpu" in repaired and "longer than 3s" in repaired
        wait_for("the pool to be deleted", lambda n=name: n not in sim.pools())
        assert claims.node(node_name) is None
    assert {api: repairs(api.kind, "GPUUnavailable") - before[api] for api in names} == {MACHINE: 1, NODECLAIM: 1}


def test_a_serving_node_that_lost_one_of_its_gpus_is_replaced_after_the_toleration(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    start_controller(sim, node_repair_toleration_s=3, node_repair_max_unhealthy_percent=100)
    claim = kaito_claim(NODECLAIM, unique_name, instance_types=["Standard_NC96ads_A100_v4"])  # 4 GPUs
    node_name = claims.create_ready(NODECLAIM, claim)["status"]["nodeName"]
    sim.kubelet.lose_gpus(node_name, remaining=3)
    [noticed] = wait_for("a NodeUnhealthy event", lambda: claims.event_messages(unique_name, "NodeUnhealthy"))
    assert f"node {node_name} has 3 of 4 nvidia.com/gpu allocatable" in noticed
    claims.wait_gone(NODECLAIM, unique_name, timeout_s=30)
    [repaired] = claims.event_messages(unique_name, "NodeRepair")
    assert f"node {node_name} has 3 of 4 nvidia.com/gpu allocatable" in repaired and "longer than 3s" in repaired
    wait_for("the pool to be deleted", lambda: unique_name not in sim.pools())


def test_no_repair_while_more_than_the_share_of_nodes_is_unhealthy(claims, start_sim, start_controller, unique_name):
    sim = start_sim()
    start_controller(sim, node_repair_toleration_s=3)  # at most 20% of the managed nodes, rounded up: 1 of 5
    names = [f"{unique_name}{i}" for i in range(5)]
    for name in names:
        claims.create(NODECLAIM, kaito_claim(NODECLAIM, name))
    nodes = {}
    for name in names:
        claims.wait_condition(NODECLAIM, name, READY, "True")
        nodes[name] = claims.get(NODECLAIM, name)["status"]["nodeName"]
    broken = names[:3]
    for name in broken:  # three at once: a fault that wide (a zone, the network) is not one replacing nodes fixes
        sim.kubelet.lose_node(nodes[name], status="False")
    for name in broken:
        [blocked] = wait_for("a NodeRepairBlocked event", lambda n=name: claims.event_messages(n, "NodeRepairBlocked"))
        assert "3 of the 5 GPU nodes gpu-provisioner manages are unhealthy, more than 20%" in blocked
    assert all(claims.get(NODECLAIM, name) for name in names) and len(sim.pools()) == 5
    assert sim.count_requests("agentpools.delete") == 0

    for name in broken[:2]:  # two recover: one unhealthy node of five is within the share, and is replaced
        sim.kubelet.restore_node(nodes[name])
    claims.wait_gone(NODECLAIM, broken[2], timeout_s=30)
    assert "NodeRepair" in claims.event_reasons(broken[2])
    for name in broken[:2]:
        wait_for("a NodeHealthy event", lambda n=name: "NodeHealthy" in claims.event_reasons(n))
        assert claims.get(NODECLAIM, name) is not None


def test_no_repair_while_arm_is_down_and_then_no_drain_holds_the_broken_node(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    manager = start_controller(sim, node_repair_toleration_s=2)
    node_name = claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, unique_name))["status"]["nodeName"]
    pod = f"{unique_name}-model"
    claims.start_guarded_pod(node_name, pod)  # a PodDisruptionBudget that allows no eviction
    sim.update_scenario(server_error_rate=1.0)  # every ARM request answers 5xx
    wait_for("a failed agent-pool LIST", lambda: manager.inventory.list_error)
    before = repairs(NODECLAIM.kind, "NodeNotReady")
    sim.kubelet.lose_node(node_name, status="False")
    [blocked] = wait_for("a NodeRepairBlocked event", lambda: claims.event_messages(unique_name, "NodeRepairBlocked"))
    assert "ARM looks down" in blocked and claims.get(NODECLAIM, unique_name) is not None

    sim.update_scenario(server_error_rate=0.0)
    try:
        # As Karpenter's repair, no drain waits on a node out of service: the budget does not hold it.
        claims.wait_gone(NODECLAIM, unique_name, timeout_s=30)
    finally:
        claims.remove_guarded_pod(pod)
    [repaired] = claims.event_messages(unique_name, "NodeRepair")
    assert f"node {node_name} is Ready=False (KubeletNotReady)" in repaired
    [forced] = claims.event_messages(unique_name, "TerminationGracePeriodExpired")
    assert "(node repair)" in forced and "DrainBlocked" not in claims.event_reasons(unique_name)
    assert repairs(NODECLAIM.kind, "NodeNotReady") - before == 1
    wait_for("the pool to be deleted", lambda: unique_name not in sim.pools())


def test_repair_switched_off_leaves_unhealthy_nodes_and_on_by_default_counts_from_the_nodes_condition(
    claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    manager = start_controller(sim, node_repair_enabled=False)
    node_name = claims.create_ready(MACHINE, kaito_claim(MACHINE, unique_name))["status"]["nodeName"]
    # Lost 700 s ago (as the node lifecycle controller would have written it), its GPUs gone too.
    lost_at = rfc3339(datetime.now(UTC) - timedelta(seconds=700))
    sim.kubelet.lose_node(node_name, status="Unknown", since=lost_at)
    sim.kubelet.lose_gpus(node_name)
    # A claim change makes the controller reconcile it after the node broke: registration copies the label.
    claims.custom.patch_cluster_custom_object(GROUP, MACHINE.version, MACHINE.plural, unique_name,
                                              {"metadata": {"labels": {"touched": "yes"}}})
    wait_for("a reconcile after the node broke", lambda: claims.node(node_name).metadata.labels.get("touched"))
    assert claims.get(MACHINE, unique_name) is not None
    assert not claims.event_reasons(unique_name) & REPAIR_EVENTS
    assert GPU_UNAVAILABLE_SINCE not in (claims.node(node_name).metadata.annotations or {})

    # Another controller with the defaults (repair on, 600 s toleration): the time comes from the Node's condition,
    # not from when this controller first saw it, so the claim goes at once.
    manager.stop()
    start_controller(sim)
    claims.wait_gone(MACHINE, unique_name, timeout_s=30)
    [repaired] = claims.event_messages(unique_name, "NodeRepair")
    assert f"node {node_name} is Ready=Unknown (NodeStatusUnknown) since {lost_at}, longer than 600s" in repaired
