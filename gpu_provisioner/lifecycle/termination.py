"""Termination: cordon and drain the Node, delete it, delete the agent pool, wait until it is gone,
then release the claim's finalizer. Nothing is released before the cloud confirms, so no VM leaks.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from kubernetes.client import ApiException

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import TERMINATION_FINALIZER, Claim
from gpu_provisioner.cloud.agentpools import PoolState
from gpu_provisioner.cloud.errors import AccessDeniedError, RequestFailedError
from gpu_provisioner.lifecycle.base import Deps
from gpu_provisioner.lifecycle.launch import IN_PROGRESS, REFUSED_RETRY_S

log = structlog.get_logger(__name__)
DRAIN_RETRY_S = 2.0


def _drainable(pod: Any) -> bool:
    """Whether a drain moves the pod off its node: all but static pods (the kubelet owns them) and DaemonSet pods."""
    metadata = pod.metadata
    if (metadata.annotations or {}).get("kubernetes.io/config.mirror"):
        return False
    return not any(owner.kind == "DaemonSet" for owner in metadata.owner_references or [])


def _still_leaving(pod: Any, now: datetime) -> bool:
    """An evicted pod inside its grace period (the API server sets deletionTimestamp to its end): its
    in-flight work finishes before the VM goes."""
    going = pod.metadata.deletion_timestamp
    return going is not None and now < going and (pod.status.phase if pod.status else None) not in (
        "Succeeded", "Failed")


def _drain_time_is_up(claim: Claim) -> bool:
    grace_s, deleted_at = claim.termination_grace_s, claim.deleted_at
    if grace_s is None or deleted_at is None:
        return False
    return datetime.now(UTC) >= deleted_at + timedelta(seconds=grace_s)


def _belongs_to(claim: Claim, node: dict[str, Any]) -> bool:
    """Whether registration made this Node the claim's (its providerID, or its ownerReference)."""
    metadata = node["metadata"]
    if claim.provider_id and (node.get("spec") or {}).get("providerID") == claim.provider_id:
        return True
    return any(owner.get("uid") == claim.uid for owner in metadata.get("ownerReferences") or [])


class Termination:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._lock = threading.Lock()
        # claim uid -> inventory clock time (our DELETE, or the start of termination) after which a LIST that
        # lacks the pool proves it gone
        self._gone_after: dict[str, float] = {}

    def forget(self, uid: str) -> None:
        with self._lock:
            self._gone_after.pop(uid, None)

    def reconcile(self, claim: Claim) -> float | None:
        """Returns when to look again, or None once the finalizer is released."""
        if TERMINATION_FINALIZER not in claim.finalizers:
            return None
        inventory = self.deps.inventory
        pool = inventory.get(claim.name)
        pool_is_ours = pool is not None and pool.managed and pool.claim_key in ("", claim.key)
        for node in self.deps.nodes.nodes_for(claim):
            # A pool of the claim's name made by someone else (AgentPoolNameTaken) keeps its nodes.
            if not (pool_is_ours or _belongs_to(claim, node)):
                continue
            wait = self._retire_node(claim, node)
            if wait is not None:
                return wait
        if pool_is_ours:
            if pool.provisioning_state in IN_PROGRESS:
                # AKS refuses a DELETE while the create runs: wait for the LIST to show it ended.
                return inventory.interval_s
            if pool.provisioning_state != "Deleting":
                try:
                    self.deps.pools.delete(pool.name)
                except (AccessDeniedError, RequestFailedError) as error:
                    self.deps.events.warning(claim.obj, error.reason, f"may not delete agent pool {pool.name}, so "
                                             f"the claim is kept until it can: {error.describe()}")
                    return REFUSED_RETRY_S
                inventory.record(PoolState(pool.name, "Deleting", pool.vm_size, pool.tags))
                with self._lock:
                    self._gone_after[claim.uid] = inventory.now()
                self.deps.events.normal(claim.obj, "DeletingAgentPool", f"deleting agent pool {pool.name}")
                log.info("agent pool delete started", claim=claim.key, pool=pool.name)
            return inventory.interval_s * 3
        with self._lock:
            # No pool in sight yet may still mean a PUT whose answer was lost: only a LIST that began after
            # termination did can say there is none.
            gone_after = self._gone_after.setdefault(claim.uid, inventory.now())
        if not inventory.synced or not inventory.listed_since(gone_after):
            inventory.request_refresh()
            return min(inventory.interval_s, 1.0)
        self.deps.kube.patch_claim(claim.api, claim.name, {"metadata": {
            "finalizers": [f for f in claim.finalizers if f != TERMINATION_FINALIZER],
            "resourceVersion": claim.metadata["resourceVersion"],
        }})
        with self._lock:
            self._gone_after.pop(claim.uid, None)
        self.deps.events.normal(claim.obj, "Terminated", f"agent pool {claim.name} deleted")
        metrics.TERMINATIONS.labels(kind=claim.api.kind, result="Terminated").inc()
        log.info("claim terminated", claim=claim.key)
        return None

    def _retire_node(self, claim: Claim, node: dict[str, Any]) -> float | None:
        """Cordon, drain and delete one Node; returns a wait while pods are still leaving."""
        kube, name = self.deps.kube, node["metadata"]["name"]
        if not (node.get("spec") or {}).get("unschedulable"):
            node = kube.patch_node(name, {"spec": {"unschedulable": True}})
        now = datetime.now(UTC)
        drainable = [pod for pod in kube.pods_on_node(name) if _drainable(pod)]
        pods = [pod for pod in drainable if pod.metadata.deletion_timestamp is None]
        leaving = [pod for pod in drainable if _still_leaving(pod, now)]
        if (pods or leaving) and _drain_time_is_up(claim):
            # The NodeClaim's terminationGracePeriod bounds the drain: the Node goes with its pods on it
            # (the pod garbage collector removes them), so a blocked eviction cannot keep a GPU VM forever.
            self.deps.events.warning(claim.obj, "TerminationGracePeriodExpired", f"terminationGracePeriod "
                                     f"{claim.spec.get('terminationGracePeriod')} has passed: deleting node {name} "
                                     f"with {len(pods) + len(leaving)} pod(s) still on it")
            pods, leaving = [], []
        blocked = []
        for pod in pods:
            try:
                kube.evict(pod)
            except ApiException as error:
                if error.status != 429:  # 429: a PodDisruptionBudget says not yet
                    raise
                blocked.append(f"{pod.metadata.namespace}/{pod.metadata.name}")
        if blocked:
            # Said, because the node and its pool (and their cost) stay until the budget allows it.
            self.deps.events.warning(claim.obj, "DrainBlocked", f"node {name} keeps running: a PodDisruptionBudget "
                                     f"does not allow evicting {', '.join(sorted(blocked))} yet")
        if pods:
            self.deps.events.normal(claim.obj, "Draining", f"evicting {len(pods)} pod(s) from node {name}")
        if pods or leaving:
            return DRAIN_RETRY_S
        finalizers = node["metadata"].get("finalizers") or []
        if TERMINATION_FINALIZER in finalizers:
            kube.patch_node(name, {"metadata": {
                "finalizers": [f for f in finalizers if f != TERMINATION_FINALIZER],
                "resourceVersion": node["metadata"]["resourceVersion"],
            }})
        if not node["metadata"].get("deletionTimestamp"):
            kube.delete_node(name)
        return None
