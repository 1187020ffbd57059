"""The initialization timeout and node repair decisions, with plain fakes for the Nodes and a clock the test
moves (the end-to-end runs are in tests/integration/test_repair.py)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gpu_provisioner.api.claims import (
    MACHINE,
    NODECLAIM,
    READY,
    TERMINATION_TIMESTAMP_ANNOTATION,
    ZONE_LABEL,
    Claim,
    ClaimApi,
    rfc3339,
)
from gpu_provisioner.cloud.agentpools import PoolState
from gpu_provisioner.cloud.catalogue import SizeCatalogue
from gpu_provisioner.cloud.errors import TransientError
from gpu_provisioner.cloud.pool_request import CLAIM_TAG, MANAGED_TAG, MANAGED_VALUE
from gpu_provisioner.lifecycle.base import NextLook
from gpu_provisioner.lifecycle.controller import ClaimLifecycle
from gpu_provisioner.lifecycle.initialization import completes_initialization
from gpu_provisioner.lifecycle.nodes import pool_of_node
from gpu_provisioner.lifecycle.repair import GPU_UNAVAILABLE_SINCE, allowed_unhealthy
from gpu_provisioner.runtime.outage import Outage
from tests.unit.test_phases import START, Harness, Kube, kaito

SIZE = "Standard_NC24ads_A100_v4"


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies a merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class Nodes:
    """The Node watch's cache, and the API server's Node writes."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.patches: list[dict[str, Any]] = []

    def add(self, pool: str, ready: str = "True", since: datetime = START, gpus: str = "1",
            taints: list[dict[str, str]] | None = None, size: str = SIZE) -> dict[str, Any]:
        name = f"aks-{pool}-vmss000000"
        self.nodes[name] = {
            "metadata": {"name": name, "resourceVersion": "1", "annotations": {},
                         "labels": {"agentpool": pool, "node.kubernetes.io/instance-type": size,
                                    "karpenter.sh/registered": "true", "karpenter.sh/initialized": "true"}},
            "spec": {"providerID": f"azure:///{name}", "taints": taints or []},
            "status": {"allocatable": {"cpu": "24", "nvidia.com/gpu": gpus},
                       "conditions": [{"type": "Ready", "status": ready, "reason": "KubeletNotReady",
                                       "lastTransitionTime": rfc3339(since)}]},
        }
        return self.nodes[name]

    def nodes_for(self, claim: Claim) -> list[dict[str, Any]]:
        return [n for n in self.nodes.values() if pool_of_node(n) == claim.name]

    def nodes_of_pools(self, pools: Iterable[str]) -> list[dict[str, Any]]:
        wanted = set(pools)
        return [n for n in self.nodes.values() if pool_of_node(n) in wanted]

    def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(patch)
        return merge_patch(self.nodes[name], patch)


class NodeKube(Kube):
    def __init__(self, nodes: Nodes) -> None:
        super().__init__()
        self.nodes = nodes
        self.outage = Outage("API server")

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.nodes.patch(name, patch)


class Fleet(Harness):
    def __init__(self, **settings: Any) -> None:
        self.nodes = Nodes()
        super().__init__(kube=NodeKube(self.nodes), nodes=self.nodes, **settings)

    def pool(self, name: str, state: str = "Succeeded", api: ClaimApi = NODECLAIM, made_by_go: bool = False) -> None:
        """`made_by_go`: untagged, with the node labels the Go gpu-provisioner copied from its claim."""
        if made_by_go:
            labels = {"kaito.sh/workspace": "ws", "kaito.sh/machine-type": "gpu"}
            pool = PoolState(name, state, SIZE, node_labels=labels)
        else:
            pool = PoolState(name, state, SIZE, {MANAGED_TAG: MANAGED_VALUE, CLAIM_TAG: f"{api.plural}/{name}"})
        self.pools.pools[name] = pool
        self.list()

    def claim(self, api: ClaimApi, name: str, registered_at: datetime = START, initialized: bool = True,
              made_by_go: bool = False) -> Claim:
        """A claim whose pool (ours, or the Go gpu-provisioner's: `made_by_go`) succeeded and whose Node registered (and
        initialized) at `registered_at`."""
        self.pool(name, api=api, made_by_go=made_by_go)
        claim = kaito(api, name=name)
        phases = api.phases if initialized else api.phases[:2]
        claim.obj["status"] = {"conditions": [
            {"type": t, "status": "True", "reason": t, "lastTransitionTime": rfc3339(registered_at)}
            for t in [*phases, *([READY] if initialized else [])]]}
        return claim

    def at(self, seconds: float) -> None:
        self.clock.now = START + timedelta(seconds=seconds)

    def reconcile_fresh(self, claim: Claim) -> NextLook | None:
        """A reconcile by a controller that just started (or took over): nothing remembered."""
        self.lifecycle = ClaimLifecycle(self.deps)
        return self.reconcile(claim)


def messages(fleet: Fleet, reason: str) -> list[str]:
    return [message for r, message in fleet.events.recorded if r == reason]


@pytest.mark.parametrize(("nodes", "never_came"), [
    ({"gpus": "0"}, "nvidia.com/gpu never became allocatable on node aks-ws1-vmss000000: check the GPU driver and "
                    "the device plugin"),
    ({"ready": "False"}, "node aks-ws1-vmss000000 never became Ready"),
    ({"taints": [{"key": "driver", "effect": "NoSchedule"}]},
     "startup taints ['driver'] were never removed from node aks-ws1-vmss000000"),
], ids=["gpus", "ready", "startup-taints"])
@pytest.mark.parametrize("api", [MACHINE, NODECLAIM], ids=lambda a: a.kind)
def test_initialization_timeout_counts_from_registration_and_names_what_never_came(api, nodes, never_came):
    fleet = Fleet()
    claim = fleet.claim(api, "ws1", registered_at=START + timedelta(seconds=100), initialized=False)
    claim.obj["spec"]["startupTaints"] = [{"key": "driver", "effect": "NoSchedule"}]
    fleet.nodes.add("ws1", **nodes)
    fleet.at(100 + 899)
    assert fleet.reconcile_fresh(claim).after_s == pytest.approx(1)
    assert fleet.kube.deleted_claims == []
    # The condition keeps the reason and status the claim's Karpenter release writes while waiting.
    initialized = Claim(api, claim.obj).condition(api.initialized)
    assert initialized["status"] == api.pending_status
    assert initialized["reason"] in {"ResourceNotRegistered", "NodeNotReady", "StartupTaintsExist"}
    fleet.at(100 + 901)
    fleet.reconcile_fresh(claim)
    assert fleet.kube.deleted_claims == ["ws1"]
    [message] = messages(fleet, "InitializationTimeout")
    assert message.startswith(f"initialization did not finish within 900s ({never_came}")


def test_not_ready_is_repaired_a_toleration_after_its_transition_and_said_once_before():
    fleet = Fleet()
    claim = fleet.claim(NODECLAIM, "ws1")
    fleet.nodes.add("ws1", ready="Unknown", since=START + timedelta(seconds=50))
    before = REGISTRY.get_sample_value("gpu_provisioner_node_repairs_total",
                                       {"kind": "NodeClaim", "reason": "NodeNotReady"}) or 0
    fleet.at(50 + 599)
    assert fleet.reconcile_fresh(claim).after_s == pytest.approx(1)
    fleet.reconcile(claim)
    assert fleet.kube.deleted_claims == []
    [noticed] = messages(fleet, "NodeUnhealthy")
    assert noticed.startswith("node aks-ws1-vmss000000 is Ready=Unknown (KubeletNotReady) since 2026-11-26T12:00:50Z")
    assert "will be deleted at 2026-11-26T12:10:50Z" in noticed
    assert Claim(NODECLAIM, claim.obj).is_true(READY)  # nothing Kaito reads changes within the toleration
    fleet.at(50 + 601)
    fleet.reconcile(claim)
    assert fleet.kube.deleted_claims == ["ws1"] and len(messages(fleet, "NodeRepair")) == 1
    # The drain will not wait (Karpenter's deadline annotation, now), ...
    deadline = {TERMINATION_TIMESTAMP_ANNOTATION: "2026-11-26T12:10:51Z"}
    assert fleet.kube.claim_patches[-1] == {"metadata": {"annotations": deadline}}
    # ... and a pass that sees the annotation before the deletion makes sure of the delete, saying nothing again.
    claim.obj["metadata"]["annotations"] = {**claim.annotations, **deadline}
    fleet.reconcile_fresh(claim)
    assert fleet.kube.deleted_claims == ["ws1", "ws1"] and len(messages(fleet, "NodeRepair")) == 1
    assert REGISTRY.get_sample_value("gpu_provisioner_node_repairs_total",
                                     {"kind": "NodeClaim", "reason": "NodeNotReady"}) == before + 1


def test_gpu_loss_is_noted_on_the_node_so_a_restart_neither_resets_nor_backdates_it():
    fleet = Fleet()
    claim = fleet.claim(MACHINE, "ws1")
    node = fleet.nodes.add("ws1", gpus="0")
    fleet.at(10)
    fleet.reconcile_fresh(claim)
    assert node["metadata"]["annotations"][GPU_UNAVAILABLE_SINCE] == rfc3339(START + timedelta(seconds=10))
    node["status"]["allocatable"]["nvidia.com/gpu"] = "1"  # a device-plugin restart: back before the toleration
    fleet.at(100)
    fleet.reconcile(claim)
    assert GPU_UNAVAILABLE_SINCE not in node["metadata"]["annotations"]
    assert messages(fleet, "NodeHealthy") == ["node aks-ws1-vmss000000 is healthy again"]

    node["status"]["allocatable"]["nvidia.com/gpu"] = "0"
    fleet.at(200)
    fleet.reconcile(claim)
    fleet.at(200 + 599)
    # A restart counts on from the note, not from itself.
    assert fleet.reconcile_fresh(claim).after_s == pytest.approx(1)
    assert fleet.kube.deleted_claims == []
    fleet.at(200 + 600)
    fleet.reconcile_fresh(claim)
    assert fleet.kube.deleted_claims == ["ws1"]
    [repaired] = messages(fleet, "NodeRepair")
    assert "has no allocatable nvidia.com/gpu" in repaired and "since 2026-11-26T12:03:20Z" in repaired


def test_a_node_with_some_of_its_gpus_lost_is_unhealthy_and_replaced_after_the_toleration():
    fleet = Fleet()
    claim = fleet.claim(NODECLAIM, "ws1")
    node = fleet.nodes.add("ws1", gpus="3", size="Standard_NC96ads_A100_v4")  # 4 GPUs: one fell off the bus
    fleet.at(10)
    assert fleet.reconcile_fresh(claim).after_s == pytest.approx(600)
    assert node["metadata"]["annotations"][GPU_UNAVAILABLE_SINCE] == rfc3339(START + timedelta(seconds=10))
    [unhealthy] = messages(fleet, "NodeUnhealthy")
    assert unhealthy.startswith("node aks-ws1-vmss000000 has 3 of 4 nvidia.com/gpu allocatable (GPU driver")
    fleet.at(610)
    fleet.reconcile(claim)
    assert fleet.kube.deleted_claims == ["ws1"]


@pytest.mark.parametrize(("nodes", "percent", "allowed"), [
    (1, 20, 1), (3, 20, 1), (5, 20, 1), (6, 20, 2), (10, 20, 2), (11, 20, 3), (0, 20, 0), (5, 0, 0), (4, 100, 4),
])
def test_the_unhealthy_share_is_rounded_up_as_karpenters_is(nodes, percent, allowed):
    assert allowed_unhealthy(nodes, percent) == allowed


def test_no_repair_above_the_share_and_repair_once_within_it():
    fleet = Fleet()
    claims = [fleet.claim(NODECLAIM, f"ws{i}") for i in range(5)]
    for i in range(5):
        fleet.nodes.add(f"ws{i}", ready="False" if i < 2 else "True")
    fleet.nodes.add("other", ready="False")  # a node of a pool not ours counts neither way
    fleet.at(601)
    assert fleet.reconcile_fresh(claims[0]).after_s == pytest.approx(60)
    assert fleet.kube.deleted_claims == []
    [blocked] = messages(fleet, "NodeRepairBlocked")
    assert "2 of the 5 GPU nodes gpu-provisioner manages are unhealthy, more than 20%" in blocked

    fleet.nodes.nodes["aks-ws1-vmss000000"]["status"]["conditions"][0]["status"] = "True"
    fleet.reconcile(claims[0])
    assert fleet.kube.deleted_claims == ["ws0"]


def test_the_go_provisioners_nodes_count_in_the_share_once_taken_over():
    fleet = Fleet()
    claims = [fleet.claim(NODECLAIM, f"ws{i}", made_by_go=i > 0) for i in range(5)]
    for i in range(5):
        fleet.nodes.add(f"ws{i}", ready="False" if i in (1, 2) else "True")
    fleet.at(601)
    fleet.reconcile_fresh(claims[1])
    assert fleet.kube.deleted_claims == []
    [blocked] = messages(fleet, "NodeRepairBlocked")
    assert "2 of the 5 GPU nodes gpu-provisioner manages are unhealthy" in blocked


@pytest.mark.parametrize("cause", ["api-server", "arm", "pool-upgrading", "switched-off"])
def test_no_repair_while_the_api_server_or_arm_is_down_aks_works_on_the_pool_or_repair_is_off(cause):
    fleet = Fleet(node_repair_enabled=cause != "switched-off")
    claim = fleet.claim(NODECLAIM, "ws1")
    fleet.nodes.add("ws1", ready="False", gpus="0")
    if cause == "api-server":
        fleet.kube.outage.failed(ConnectionError("connection refused"))
    elif cause == "arm":
        fleet.inventory.list_error = TransientError("Service Unavailable", status=503)  # the last LIST failed
    elif cause == "pool-upgrading":
        fleet.pool("ws1", state="Upgrading")
    fleet.at(3600)
    fleet.reconcile_fresh(claim)
    assert fleet.kube.deleted_claims == []
    expected = {"api-server": "the API server looks down", "arm": "ARM looks down",
                "pool-upgrading": "AKS is working on agent pool ws1 (upgrading)", "switched-off": None}[cause]
    if expected is None:
        assert fleet.events.recorded == [] and GPU_UNAVAILABLE_SINCE not in str(fleet.nodes.patches)
    else:
        [blocked] = messages(fleet, "NodeRepairBlocked")
        assert expected in blocked


def test_the_zone_label_goes_on_the_claim_in_the_pass_after_the_one_that_registers_it():
    fleet = Fleet()
    claim = fleet.claim(NODECLAIM, "ws1", initialized=False)
    claim.obj["status"]["conditions"] = [c for c in claim.obj["status"]["conditions"] if c["type"] == "Launched"]
    node = fleet.nodes.add("ws1", ready="False")
    node["metadata"]["labels"][ZONE_LABEL] = "eastus-1"
    # Queued again for when no other claim waits.
    assert fleet.reconcile(claim).when_idle
    assert fleet.kube.claim_patches == [] and Claim(NODECLAIM, claim.obj).is_true(NODECLAIM.registered)
    # A pass that something else brought while other claims wait (a burst of deletions) leaves it for later still.
    fleet.claims_waiting = True
    assert fleet.reconcile(claim).when_idle and fleet.kube.claim_patches == []
    fleet.claims_waiting = False
    fleet.reconcile(claim)
    assert fleet.kube.claim_patches == [{"metadata": {"labels": {ZONE_LABEL: "eastus-1"}}}]


@pytest.mark.parametrize("startup_taints", [False, True], ids=["gpu-ready", "startup-taints"])
def test_a_node_met_already_gpu_ready_is_registered_and_initialized_in_one_write(startup_taints):
    fleet = Fleet()
    claim = fleet.claim(NODECLAIM, "ws1", initialized=False)
    claim.obj["status"]["conditions"] = [c for c in claim.obj["status"]["conditions"] if c["type"] == "Launched"]
    if startup_taints:
        claim.obj["spec"]["startupTaints"] = [{"key": "driver", "effect": "NoSchedule"}]
    node = fleet.nodes.add("ws1", taints=Claim(NODECLAIM, claim.obj).taints)  # as the pool made it
    for label in ("karpenter.sh/registered", "karpenter.sh/initialized"):
        del node["metadata"]["labels"][label]
    fleet.reconcile(claim)
    labels = [patch["metadata"].get("labels", {}) for patch in fleet.nodes.patches]
    if startup_taints:
        # The startup taint goes on with registration, and initialization waits for it to be removed.
        assert len(fleet.nodes.patches) == 1 and "karpenter.sh/initialized" not in labels[0]
        assert not Claim(NODECLAIM, claim.obj).is_true(NODECLAIM.initialized)
    else:
        assert len(fleet.nodes.patches) == 1
        assert labels[0]["karpenter.sh/registered"] == labels[0]["karpenter.sh/initialized"] == "true"
        assert Claim(NODECLAIM, claim.obj).is_true(READY)


@pytest.mark.parametrize("api", [NODECLAIM, MACHINE], ids=lambda api: api.name)
def test_only_a_node_that_lets_its_claim_be_initialized_now_jumps_the_queue(api):
    nodes, size_of = Nodes(), SizeCatalogue().size
    claim = kaito(api, name="ws1")
    assert completes_initialization(claim, nodes.add("ws1"), size_of)
    assert not completes_initialization(claim, nodes.add("ws1", gpus="0"), size_of)  # no device plugin yet
    assert not completes_initialization(claim, nodes.add("ws1", ready="False"), size_of)
    # Once initialized, the Node's later updates (a kubelet's status, a label) are ordinary work.
    claim.obj["status"] = {"conditions": [{"type": api.initialized, "status": "True", "reason": "Initialized"}]}
    assert not completes_initialization(claim, nodes.add("ws1"), size_of)


@pytest.mark.parametrize("api", [MACHINE, NODECLAIM], ids=lambda a: a.kind)
def test_while_other_claims_wait_progress_waits_for_the_pass_that_turns_the_claim_ready_which_does_not_wait(api):
    fleet = Fleet()
    fleet.claims_waiting = True
    claim = fleet.claim(api, "ws1", initialized=False)
    claim.obj["status"]["conditions"] = [c for c in claim.obj["status"]["conditions"] if c["type"] == api.launched]
    # As AKS makes it: with the claim's taint, from the pool.
    node = fleet.nodes.add("ws1", ready="False", taints=[{"key": "sku", "value": "gpu", "effect": "NoSchedule"}])
    del node["metadata"]["labels"]["karpenter.sh/registered"], node["metadata"]["labels"]["karpenter.sh/initialized"]
    # The Node joined, not Ready yet: no pod runs on it, nobody waits for its registration or that status.
    assert fleet.reconcile(claim).when_idle
    assert fleet.kube.statuses == [] and fleet.nodes.patches == []
    node["status"]["conditions"][0]["status"] = "True"
    node["status"]["allocatable"]["nvidia.com/gpu"] = "0"
    assert fleet.reconcile(claim).when_idle  # Ready, its GPUs not yet
    assert fleet.kube.statuses == [] and fleet.nodes.patches == []
    # Its GPUs: registered and initialized in one Node write, and the Ready status Kaito waits for, written at once
    # whoever else waits.
    node["status"]["allocatable"]["nvidia.com/gpu"] = "1"
    fleet.reconcile(claim)
    [status] = fleet.kube.statuses
    assert {c["type"]: c["status"] for c in status["conditions"]} == dict.fromkeys([*api.phases, READY], "True")
    [patch] = fleet.nodes.patches
    assert {"karpenter.sh/registered", "karpenter.sh/initialized"} <= patch["metadata"]["labels"].keys()


def test_a_claim_that_failed_says_so_at_once_whoever_else_waits():
    fleet = Fleet()
    fleet.claims_waiting = True
    claim = fleet.claim(NODECLAIM, "ws1", initialized=False)
    fleet.nodes.add("ws1")
    second = "aks-ws1-vmss000001"
    fleet.nodes.nodes[second] = {**fleet.nodes.nodes["aks-ws1-vmss000000"],
                                 "metadata": {"name": second, "labels": {"agentpool": "ws1"}}}
    fleet.reconcile(claim)
    [status] = fleet.kube.statuses
    registered = next(c for c in status["conditions"] if c["type"] == NODECLAIM.registered)
    assert (registered["status"], registered["reason"]) == ("False", "MultipleNodesFound")
