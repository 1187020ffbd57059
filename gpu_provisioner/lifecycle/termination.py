"""Termination: cordon and drain the Node, delete it, delete the agent pool, wait until it is gone,
then release the claim's finalizer. Nothing is released before the cloud confirms, so no VM leaks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from kubernetes.client import ApiException

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import (
    CLAIM_APIS,
    TERMINATION_FINALIZER,
    TERMINATION_TIMESTAMP_ANNOTATION,
    Claim,
    parse_time,
)
from gpu_provisioner.cloud.agentpools import IN_PROGRESS, PoolState
from gpu_provisioner.cloud.errors import AccessDeniedError, RequestFailedError
from gpu_provisioner.lifecycle.base import (
    DONE,
    WAITING,
    Deps,
    Outcome,
    Reconciliation,
    karpenter_claim_labels,
    karpenter_nodepool,
)
from gpu_provisioner.lifecycle.launch import REFUSED_RETRY_S
from gpu_provisioner.runtime.background import Call

log = structlog.get_logger(__name__)
DRAIN_RETRY_S = 2.0
# A strategic merge patch that takes gpu-provisioner's finalizer off a Node and leaves any other.
RELEASE_NODE = {"metadata": {"$deleteFromPrimitiveList/finalizers": [TERMINATION_FINALIZER]}}


def _drainable(pod: dict[str, Any]) -> bool:
    """Whether a drain moves the pod off its node: all but static pods (the kubelet owns them) and DaemonSet pods."""
    metadata = pod["metadata"]
    if (metadata.get("annotations") or {}).get("kubernetes.io/config.mirror"):
        return False
    return not any(owner.get("kind") == "DaemonSet" for owner in metadata.get("ownerReferences") or [])


def _still_leaving(pod: dict[str, Any], now: datetime) -> bool:
    """An evicted pod inside its grace period (the API server sets deletionTimestamp to its end): its
    in-flight work finishes before the VM goes."""
    going = parse_time(pod["metadata"].get("deletionTimestamp"))
    return going is not None and now < going and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def _drain_time_up(claim: Claim, now: datetime) -> str:
    """Why the drain may not go on (a NodeClaim's terminationGracePeriod has passed, or node repair set no time
    for it, as Karpenter's does), or "" while it may."""
    grace_s, deleted_at = claim.termination_grace_s, claim.deleted_at
    if grace_s is not None and deleted_at is not None and now >= deleted_at + timedelta(seconds=grace_s):
        return f"terminationGracePeriod {claim.spec.get('terminationGracePeriod')} has passed"
    try:
        deadline = parse_time(claim.annotations.get(TERMINATION_TIMESTAMP_ANNOTATION))
    except ValueError:  # not a time: no deadline
        deadline = None
    if deadline is not None and now >= deadline:
        return f"the drain's deadline {claim.annotations[TERMINATION_TIMESTAMP_ANNOTATION]} has passed (node repair)"
    return ""


def _belongs_to(claim: Claim, node: dict[str, Any]) -> bool:
    """Whether registration made this Node the claim's (its providerID, or its ownerReference)."""
    metadata = node["metadata"]
    if claim.provider_id and (node.get("spec") or {}).get("providerID") == claim.provider_id:
        return True
    return any(owner.get("uid") == claim.uid for owner in metadata.get("ownerReferences") or [])


@dataclass(frozen=True)
class _Delete:
    """A pool DELETE sent off the workers."""

    pool: PoolState


@dataclass
class _Progress:
    """What termination of one claim has seen so far."""

    # inventory clock time (our DELETE, or the start of termination) after which a LIST that lacks the
    # pool proves it gone
    gone_after: float
    # the claim's pool was ours to delete (DeletingAgentPool said so; no Terminated Event repeats it)
    pool_deleted: bool = False
    # uids of the Nodes deleted: the cache shows one until its deletion is watched, and it is not drained again
    nodes_deleted: set[str] = field(default_factory=set)


class Termination:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._lock = threading.Lock()
        self._progress: dict[str, _Progress] = {}
        # claim key -> the last object of a claim the watch saw deleted, until no pool made for it is left
        self._vanished: dict[str, dict[str, Any]] = {}

    def forget(self, uid: str) -> None:
        with self._lock:
            self._progress.pop(uid, None)

    def claim_deleted(self, claim: Claim) -> None:
        """The watch says the claim object is gone; `reap` checks that no pool outlives it."""
        self.forget(claim.uid)
        with self._lock:
            self._vanished[claim.key] = claim.obj

    def reap(self, key: str) -> float | None:
        """Delete at once the pool made for a deleted claim that termination never released.

        That happens when the API server deletes a claim despite the finalizer: a DELETE that read the
        claim before the finalizer was added does not look again (so the PUT may already be out), or
        someone removes the finalizer by hand. Returns when to look again, or None when nothing is left.
        """
        with self._lock:
            obj = self._vanished.get(key)
        if obj is None:
            return None
        claim = Claim(next(a for a in CLAIM_APIS.values() if a.kind == obj.get("kind")), obj)
        inventory = self.deps.inventory
        if (write := self.deps.arm_writes.get(key)) is not None:
            if not write.ended:
                # A write still on its way (a PUT: its pool is in the inventory once ARM answers, which queues the key
                # again).
                return inventory.interval_s
            self.deps.arm_writes.take(key)
        if not inventory.synced:
            inventory.request_refresh()
            return min(inventory.interval_s, 1.0)
        pool = inventory.get(claim.name)
        made_for_it = pool is not None and ((pool.managed and pool.claim_uid == claim.uid)
                                            or pool.made_by_go_provisioner_for(claim))
        if not made_for_it or pool.provisioning_state == "Deleting":
            with self._lock:
                self._vanished.pop(key, None)
            return None
        if pool.provisioning_state in IN_PROGRESS:
            # AKS refuses a DELETE while the create runs: follow the pool until it ends.
            inventory.follow(pool.name)
            return inventory.interval_s
        try:
            # On this worker, unlike termination's: a DELETE still on its way would be a write on the key that a new
            # claim of the same name (same key) could meet, and launch onto the pool it deletes.
            inventory.delete(pool)
        except (AccessDeniedError, RequestFailedError) as error:
            log.warning("agent pool of a deleted claim not deleted yet", claim=key, pool=pool.name,
                        error=error.describe())
            return REFUSED_RETRY_S
        metrics.ORPHANS_DELETED.inc()
        self.deps.events.warning(obj, "DeletingAgentPool", f"claim {claim.name} was deleted before gpu-provisioner "
                                 f"could release it: deleting its agent pool {pool.name}")
        log.warning("deleting the agent pool of a deleted claim", claim=key, pool=pool.name)
        with self._lock:
            self._vanished.pop(key, None)
        return None

    def reconcile(self, r: Reconciliation) -> Outcome:
        """DONE once the finalizer is released; until then it asks (r.requeue) when to look again."""
        claim = r.claim
        if TERMINATION_FINALIZER not in claim.finalizers:
            return DONE
        writes = self.deps.arm_writes
        if (write := writes.get(claim.key)) is not None:
            if not write.ended:
                # The launch's PUT or this DELETE, still on its way: its answer queues the claim again.
                return WAITING
            writes.take(claim.key)
            # The launch's PUT's outcome is in the inventory; a DELETE's is read here.
            if isinstance(write.context, _Delete) and not self._delete_answered(r, write):
                return WAITING
        inventory = self.deps.inventory
        pool = inventory.get(claim.name)
        pool_is_ours = pool is not None and ((pool.managed and pool.claim_key in ("", claim.key))
                                             or pool.made_by_go_provisioner_for(claim))
        # A pool of the claim's name made by someone else (AgentPoolNameTaken) keeps its nodes.
        drained: list[tuple[dict[str, Any], bool]] = []
        with self._lock:
            progress = self._progress.get(claim.uid)
        deleted = progress.nodes_deleted if progress else set()
        for node in self.deps.nodes.nodes_for(claim):
            if node["metadata"].get("uid") in deleted:
                continue
            if pool_is_ours or _belongs_to(claim, node):
                try:
                    wait, node, released = self._drain(r, node)
                except ApiException as error:
                    if error.status == 404:  # deleted since the cache saw it (by this controller, a moment ago)
                        continue
                    raise
                if wait is not None:
                    r.requeue(wait)
                    return WAITING
                drained.append((node, released))
        try:
            pool_gone = self._delete_pool(r, pool, pool_is_ours)
        finally:
            # After the pool's DELETE went out (as Karpenter deletes the instance before it lets the Node go), so
            # that the VM's removal does not wait for these writes; before the claim is released.
            for node, released in drained:
                self._remove_node(claim, node, released)
        return self._release_claim(r, pool) if pool_gone else WAITING

    def _delete_pool(self, r: Reconciliation, pool: PoolState | None, pool_is_ours: bool) -> bool:
        """Delete the claim's pool if it is ours; True once a LIST shows that no pool of the claim is left."""
        claim, inventory = r.claim, self.deps.inventory
        progress = self._progress_of(claim)
        if pool_is_ours:
            progress.pool_deleted = True
            if pool.provisioning_state in IN_PROGRESS:
                # AKS refuses a DELETE while the create runs: follow the pool until a LIST shows it ended (it
                # often has: the node joined while the create was still recorded as running).
                inventory.follow(pool.name)
                r.requeue(inventory.interval_s)
                return False
            if pool.provisioning_state != "Deleting":
                self.deps.arm_writes.start(claim.key, lambda: self._delete(pool), _Delete(pool))
                if answered := self.deps.arm_writes.take(claim.key):  # ARM_WRITERS=0: answered on this worker
                    self._delete_answered(r, answered)
                return False
            r.requeue(inventory.interval_s * 3)
            return False
        if not inventory.synced or not inventory.listed_since(progress.gone_after):
            inventory.request_refresh()
            r.requeue(min(inventory.interval_s, 1.0))
            return False
        return True

    def _delete(self, pool: PoolState) -> float:
        """Runs off the workers: the DELETE, recorded in the inventory once ARM accepts it; returns then, on the
        inventory's clock, after which a LIST that lacks the pool proves it gone."""
        self.deps.inventory.delete(pool)
        return self.deps.inventory.now()

    def _delete_answered(self, r: Reconciliation, answered: Call) -> bool:
        """ARM's answer to the pool's DELETE; True if it was accepted. A transient failure raises, for a retry."""
        claim, pool = r.claim, answered.context.pool
        try:
            gone_after = answered.future.result()
        except (AccessDeniedError, RequestFailedError) as error:
            self.deps.events.warning(claim.obj, error.reason, f"may not delete agent pool {pool.name}, so "
                                     f"the claim is kept until it can: {error.describe()}")
            r.requeue(REFUSED_RETRY_S)
            return False
        progress = self._progress_of(claim)
        progress.gone_after, progress.pool_deleted = gone_after, True
        self.deps.events.normal(claim.obj, "DeletingAgentPool", f"deleting agent pool {pool.name}")
        log.info("agent pool delete started", claim=claim.key, pool=pool.name)
        r.requeue(self.deps.inventory.interval_s * 3)
        return True

    def _progress_of(self, claim: Claim) -> _Progress:
        with self._lock:
            # No pool in sight yet may still mean a PUT whose answer was lost: only a LIST that began after
            # termination did can say there is none.
            return self._progress.setdefault(claim.uid, _Progress(self.deps.inventory.now()))

    def _release_claim(self, r: Reconciliation, pool: PoolState | None) -> Outcome:
        """Remove the finalizer: nothing of the claim's is left in AKS."""
        claim = r.claim
        with self._lock:
            progress = self._progress.get(claim.uid)
        self.deps.kube.patch_claim(claim.api, claim.name, {"metadata": {
            "finalizers": [f for f in claim.finalizers if f != TERMINATION_FINALIZER],
            "resourceVersion": claim.metadata["resourceVersion"],
        }})
        self.forget(claim.uid)
        if not (progress and progress.pool_deleted):
            # A pool this controller deleted was said by DeletingAgentPool; any other outcome is said here.
            self.deps.events.normal(claim.obj, "Terminated", self._no_pool_of_ours(claim, pool))
        metrics.TERMINATIONS.labels(kind=claim.api.kind, result="Terminated").inc()
        metrics.KARPENTER_NODECLAIMS_TERMINATED.labels(**karpenter_claim_labels(claim)).inc()
        log.info("claim terminated", claim=claim.key)
        return DONE

    @staticmethod
    def _no_pool_of_ours(claim: Claim, pool: PoolState | None) -> str:
        if pool is not None:
            return f"agent pool {pool.name} was not made by gpu-provisioner for this claim and is left alone"
        return "AKS has no agent pool for this claim (none was created, or it was already gone)"

    def _drain(self, r: Reconciliation, node: dict[str, Any]) -> tuple[float | None, dict[str, Any], bool]:
        """Cordon and drain one Node; returns a wait while pods are still leaving, the Node as last written, and
        whether this call let go of the Node's finalizer."""
        claim, now = r.claim, r.now
        kube, name = self.deps.kube, node["metadata"]["name"]
        # The Node's finalizer goes in the cordon's write: from here the claim's own finalizer keeps everything
        # until the pool is gone. Not from a Node someone else deleted: its finalizer holds it through the drain.
        release = TERMINATION_FINALIZER in (node["metadata"].get("finalizers") or []) and not node["metadata"].get(
            "deletionTimestamp")
        if release or not (node.get("spec") or {}).get("unschedulable"):
            node = kube.patch_node(name, {"spec": {"unschedulable": True}, **(RELEASE_NODE if release else {})})
        drainable = [pod for pod in kube.pods_on_node(name) if _drainable(pod)]
        pods = [pod for pod in drainable if not pod["metadata"].get("deletionTimestamp")]
        leaving = [pod for pod in drainable if _still_leaving(pod, now)]
        if (pods or leaving) and (time_up := _drain_time_up(claim, now)):
            # The NodeClaim's terminationGracePeriod bounds the drain: the Node goes with its pods on it
            # (the pod garbage collector removes them), so a blocked eviction cannot keep a GPU VM forever.
            self.deps.events.warning(claim.obj, "TerminationGracePeriodExpired", f"{time_up}: deleting node {name} "
                                     f"with {len(pods) + len(leaving)} pod(s) still on it")
            pods, leaving = [], []
        blocked = []
        for pod in pods:
            try:
                kube.evict(pod)
            except ApiException as error:
                if error.status != 429:  # 429: a PodDisruptionBudget says not yet
                    raise
                blocked.append(f"{pod['metadata']['namespace']}/{pod['metadata']['name']}")
        if blocked:
            # Said, because the node and its pool (and their cost) stay until the budget allows it.
            self.deps.events.warning(claim.obj, "DrainBlocked", f"node {name} keeps running: a PodDisruptionBudget "
                                     f"does not allow evicting {', '.join(sorted(blocked))} yet")
        if pods:
            self.deps.events.normal(claim.obj, "Draining", f"evicting {len(pods)} pod(s) from node {name}")
        return (DRAIN_RETRY_S if pods or leaving else None), node, release

    def _remove_node(self, claim: Claim, node: dict[str, Any], released: bool) -> None:
        """Delete a drained Node, and let it go if it still has gpu-provisioner's finalizer (someone else deleted it
        first). `released`: the drain let it go."""
        kube, name = self.deps.kube, node["metadata"]["name"]
        gone = self._progress_of(claim).nodes_deleted
        try:
            if TERMINATION_FINALIZER in (node["metadata"].get("finalizers") or []):
                kube.patch_node(name, RELEASE_NODE)
                released = True
            # The cache may still show a Node deleted a moment ago (by someone else too): only a DELETE that found
            # it counts.
            deleted = not node["metadata"].get("deletionTimestamp") and kube.delete_node(name)
        except ApiException as error:
            if error.status == 404:  # gone since the cache saw it
                gone.add(node["metadata"].get("uid"))
                return
            raise
        gone.add(node["metadata"].get("uid"))
        if released or deleted:
            # Counted once: a Node already deleted and released is only waited for.
            metrics.KARPENTER_NODES_TERMINATED.labels(nodepool=karpenter_nodepool(claim)).inc()
