"""GPU node repair: a Ready claim whose Node stays unhealthy is deleted, so that Kaito makes a new one.

Unhealthy: the Node's Ready condition is False or Unknown, or fewer of a GPU size's GPUs are allocatable than the
size has (a driver or device-plugin failure, an Xid error, a GPU fallen off the bus): a Kaito workload sized to
the node's GPUs cannot run on part of them. After the toleration the claim is deleted, as Karpenter's
node repair does; termination then drains the Node and deletes it and the agent pool. Held back while:
- more of the managed nodes are unhealthy than the configured share allows (Karpenter: 20% of a node pool,
  rounded up as a PodDisruptionBudget's percentage is): a fault that wide is not one replacing nodes fixes;
- the API server or ARM looks down: node states are stale then, and the pool could not be deleted nor a new
  one made;
- AKS is working on the pool (an upgrade or reimage takes the node down for a while).

Since when a Node is unhealthy must survive a restart of the controller and a change of leader:
- NotReady / Unknown: the Ready condition's lastTransitionTime, written by the kubelet or the node lifecycle
  controller, as Karpenter reads it.
- GPUs gone: the Node has no time for it, so the first time this controller saw some gone is written on the
  Node (annotation GPU_UNAVAILABLE_SINCE) and removed once they are back. A restart neither resets nor
  backdates it; GPUs lost while no replica ran count from when one is back (late, never early).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import (
    INITIALIZED_LABEL,
    INSTANCE_TYPE_LABEL,
    TERMINATION_TIMESTAMP_ANNOTATION,
    Claim,
    parse_time,
    rfc3339,
)
from gpu_provisioner.cloud.agentpools import IN_PROGRESS
from gpu_provisioner.lifecycle.base import Deps, Reconciliation
from gpu_provisioner.lifecycle.initialization import SizeOf, allocatable_of, offers

log = structlog.get_logger(__name__)
GPU_UNAVAILABLE_SINCE = "gpu-provisioner.kaito.sh/gpus-unavailable-since"
REPAIR_REASON = "NodeRepair"
# A repair held back is looked at again this often (Node changes wake the claim earlier).
BLOCKED_RETRY_S = 60.0


@dataclass(frozen=True)
class Problem:
    reason: str  # NodeNotReady or GPUUnavailable (the repair metric's reason)
    since: datetime
    description: str


def _ready_condition(node: dict[str, Any]) -> dict[str, Any]:
    conditions = (node.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Ready"), {})


def unavailable_gpus(node: dict[str, Any], size_of: SizeOf) -> str:
    """What of the Node's size's GPUs is not allocatable (such as "no allocatable nvidia.com/gpu" or "3 of 4
    nvidia.com/gpu allocatable"), or "" when all are."""
    size = size_of((node["metadata"].get("labels") or {}).get(INSTANCE_TYPE_LABEL, ""))
    if size is None or not size.is_gpu or offers(node, size.gpu_resource, size.gpu_count):
        return ""
    allocatable = allocatable_of(node, size.gpu_resource)
    if allocatable <= 0:
        return f"no allocatable {size.gpu_resource}"
    return f"{allocatable:g} of {size.gpu_count} {size.gpu_resource} allocatable"


def is_unhealthy(node: dict[str, Any], size_of: SizeOf) -> bool:
    return _ready_condition(node).get("status") in ("False", "Unknown") or bool(unavailable_gpus(node, size_of))


def gpus_noted_unavailable_since(node: dict[str, Any]) -> datetime | None:
    try:
        return parse_time((node["metadata"].get("annotations") or {}).get(GPU_UNAVAILABLE_SINCE))
    except ValueError:  # not written by us: noted again
        return None


def problems(node: dict[str, Any], size_of: SizeOf) -> list[Problem]:
    """What is wrong with the Node and since when (a GPU loss only once noted on the Node)."""
    name = node["metadata"]["name"]
    found = []
    ready = _ready_condition(node)
    ready_since = parse_time(ready.get("lastTransitionTime"))
    if ready.get("status") in ("False", "Unknown") and ready_since is not None:
        why = ready.get("reason") or "no reason given"
        found.append(Problem("NodeNotReady", ready_since, f"node {name} is Ready={ready['status']} ({why})"))
    gpus = unavailable_gpus(node, size_of)
    gpus_since = gpus_noted_unavailable_since(node)
    if gpus and gpus_since is not None:
        found.append(Problem("GPUUnavailable", gpus_since, f"node {name} has {gpus} (GPU driver, device plugin or "
                             "GPU failure)"))
    return found


def allowed_unhealthy(nodes: int, percent: int) -> int:
    """How many of `nodes` may be unhealthy for repairs to go on: `percent` of them, rounded up."""
    return -(-nodes * percent // 100)


@dataclass(frozen=True)
class Blocked:
    reason: str  # the blocked-repairs metric's reason
    message: str


class NodeRepair:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._lock = threading.Lock()
        # claim uid -> the last (reason, message) said about its Node, so each is said once per change
        self._said: dict[str, tuple[str, str]] = {}

    def forget(self, uid: str) -> None:
        with self._lock:
            self._said.pop(uid, None)

    def check(self, r: Reconciliation) -> str:
        """For an initialized claim: why it must be deleted now, or "" (asking, r.requeue, when to look again)."""
        claim, settings = r.claim, self.deps.settings
        if not settings.node_repair_enabled or not r.status.is_true(claim.api.initialized):
            return ""
        nodes = self.deps.nodes.nodes_for(claim)
        if len(nodes) != 1:  # none: liveness deletes the claim (NodeDeleted); several: registration says so
            return ""
        node = self._note_gpus(r, nodes[0])
        found = problems(node, self.deps.catalogue.size)
        if not found:
            if self._said.get(claim.uid):
                self.forget(claim.uid)
                self.deps.events.normal(claim.obj, "NodeHealthy", f"node {node['metadata']['name']} is healthy again")
            return ""
        problem = min(found, key=lambda p: p.since)
        toleration = timedelta(seconds=settings.node_repair_toleration_s)
        due = problem.since + toleration
        unhealthy = f"{problem.description} since {rfc3339(problem.since)}"
        if r.now < due:
            self._say(claim, "NodeUnhealthy", f"{unhealthy}; the claim will be deleted at {rfc3339(due)} (and Kaito "
                      "makes a new one) unless the node recovers")
            r.requeue((due - r.now).total_seconds())
            return ""
        blocked = self._blocked(claim)
        if blocked is not None:
            if self._say(claim, "NodeRepairBlocked", f"not replacing node {node['metadata']['name']} ({unhealthy}): "
                         f"{blocked.message}"):
                metrics.NODE_REPAIRS_BLOCKED.labels(reason=blocked.reason).inc()
            # Other Nodes recovering wake only their own claims: look again, sooner with a short toleration.
            r.requeue(min(BLOCKED_RETRY_S, settings.node_repair_toleration_s))
            return ""
        if TERMINATION_TIMESTAMP_ANNOTATION in claim.annotations:
            # Decided (said and counted) by an earlier pass, whose delete the watch event of its annotation overtook.
            self.deps.kube.delete_claim(claim.api, claim.name)
            return ""
        # As Karpenter's repair: the Node is out of service, so its drain does not wait (a PodDisruptionBudget
        # would otherwise hold a broken GPU node, and its pool, forever).
        self.deps.kube.patch_claim(claim.api, claim.name, {"metadata": {"annotations": {
            TERMINATION_TIMESTAMP_ANNOTATION: rfc3339(r.now)}}})
        metrics.NODE_REPAIRS.labels(kind=claim.api.kind, reason=problem.reason).inc()
        return (f"{unhealthy}, longer than {settings.node_repair_toleration_s:.0f}s: deleting the claim so that Kaito "
                "makes a new one (its agent pool is deleted)")

    def _note_gpus(self, r: Reconciliation, node: dict[str, Any]) -> dict[str, Any]:
        """Write on the Node since when its GPUs are gone, or clear it once they are back; returns the Node."""
        gone = bool(unavailable_gpus(node, self.deps.catalogue.size))
        if gone == (gpus_noted_unavailable_since(node) is not None):
            return node
        since = rfc3339(r.now) if gone else None
        name = node["metadata"]["name"]
        log.info("GPUs unavailable" if gone else "GPUs available again", claim=r.claim.key, node=name)
        return self.deps.kube.patch_node(name, {"metadata": {"annotations": {GPU_UNAVAILABLE_SINCE: since}}})

    def _blocked(self, claim: Claim) -> Blocked | None:
        """Why no repair may happen now, or None."""
        kube_outage = self.deps.kube.outage
        if kube_outage.ongoing:
            return Blocked("APIServerDown", f"the {kube_outage.what} looks down, so node states may be stale")
        inventory = self.deps.inventory
        if not inventory.synced or inventory.list_error is not None:
            why = inventory.list_error.describe() if inventory.list_error else "no answer yet"
            return Blocked("ARMDown", f"ARM looks down (listing agent pools: {why}): a new node could not be made")
        pool = inventory.get(claim.name)
        if pool is not None and pool.provisioning_state in IN_PROGRESS:
            return Blocked("AgentPoolBusy", f"AKS is working on agent pool {pool.name} "
                           f"({pool.provisioning_state.lower()}), which takes its node down for a while")
        # The Go gpu-provisioner's pools too: replacing it, this controller took them over.
        managed = [pool.name for pool in inventory.all() if pool.managed or pool.made_by_go_provisioner]
        # Nodes in service: those of our pools that were initialized (a node still coming up is the
        # initialization timeout's business, not a sign of a wide fault).
        fleet = [
            node for node in self.deps.nodes.nodes_of_pools(managed)
            if (node["metadata"].get("labels") or {}).get(INITIALIZED_LABEL) == "true"
        ]
        unhealthy = sum(is_unhealthy(node, self.deps.catalogue.size) for node in fleet)
        percent = self.deps.settings.node_repair_max_unhealthy_percent
        if unhealthy > allowed_unhealthy(len(fleet), percent):
            return Blocked("TooManyUnhealthy", f"{unhealthy} of the {len(fleet)} GPU nodes gpu-provisioner manages are "
                           f"unhealthy, more than {percent}%: a fault that wide is not fixed by replacing nodes")
        return None

    def _say(self, claim: Claim, reason: str, message: str) -> bool:
        """A Warning Event, once per change of what is said about the claim's Node; True if it was new."""
        with self._lock:
            if self._said.get(claim.uid) == (reason, message):
                return False
            self._said[claim.uid] = (reason, message)
        self.deps.events.warning(claim.obj, reason, message)
        return True
