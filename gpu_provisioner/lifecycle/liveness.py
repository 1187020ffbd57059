"""Liveness: a claim that does not launch, register or initialize in time, whose Node or pool is gone, or
whose Node stays unhealthy (repair.py), is deleted, with an Event saying why.

Deleting it (rather than waiting forever) hands the decision back to Kaito, which makes a new claim.
A claim refused for its own content is kept: deleting it would lose the user's input, and it
never reached the cloud.
"""

from __future__ import annotations

import re
from datetime import datetime

import structlog

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import parse_time
from gpu_provisioner.cloud.agentpools import IN_PROGRESS
from gpu_provisioner.lifecycle.base import DONE, Deps, Outcome, Reconciliation, karpenter_claim_labels
from gpu_provisioner.lifecycle.initialization import awaited
from gpu_provisioner.lifecycle.launch import CAPACITY_FAILURES, CLAIM_REFUSALS, Launch
from gpu_provisioner.lifecycle.repair import REPAIR_REASON, NodeRepair

log = structlog.get_logger(__name__)
# The reason label of karpenter_nodeclaims_disrupted_total: Karpenter's word where it deletes a claim for the same
# cause (its liveness timeouts, its node repair, its garbage collection of claims whose instance is gone), else the
# Event reason in Karpenter's snake case (NodeDeleted: node_deleted).
KARPENTER_DISRUPTION_REASONS = {"LaunchTimeout": "liveness", "RegistrationTimeout": "liveness",
                                "InitializationTimeout": "liveness", "AgentPoolVanished": "garbage_collected",
                                REPAIR_REASON: "unhealthy"}


def disruption_reason(reason: str) -> str:
    return KARPENTER_DISRUPTION_REASONS.get(reason) or re.sub(r"(?<!^)(?=[A-Z])", "_", reason).lower()


class Liveness:
    def __init__(self, deps: Deps, launch: Launch, repair: NodeRepair) -> None:
        self.deps = deps
        self.launch = launch
        self.repair = repair

    def reconcile(self, r: Reconciliation) -> Outcome:
        """Never holds the claim back (DONE); deletes it when it is past saving."""
        claim, status, settings = r.claim, r.status, self.deps.settings
        launched = status.get(claim.api.launched) or {}
        inventory = self.deps.inventory
        pool = inventory.get(claim.name)
        pool_going = inventory.synced and (pool is None or pool.provisioning_state == "Deleting")
        if launched.get("status") == "True" and pool_going:
            # Someone deleted the pool under a launched claim (its Node goes with it): a new claim gets a new node.
            whereabouts = "no longer exists in AKS" if pool is None else "is being deleted outside gpu-provisioner"
            self._expire(r, "AgentPoolVanished", f"agent pool {claim.name} {whereabouts}; deleting the claim")
        elif node_gone := self._node_gone(r):
            # As in Karpenter, deleting a claim's Node deletes the claim, so that its pool goes too.
            self._expire(r, "NodeDeleted", f"{node_gone}; deleting the claim so that its agent pool goes too")
        elif launched.get("status") != "True":
            if launched.get("reason") in CLAIM_REFUSALS | CAPACITY_FAILURES:
                # Kept: deleting it loses the user's input (a refusal) or only has Kaito make the same claim,
                # which fails the same way (no capacity; retried here with backoff).
                return DONE
            timeout_s = settings.launch_timeout_s
            if pool is not None and pool.provisioning_state in IN_PROGRESS:
                # AKS accepted the pool: creating a GPU pool takes minutes and its node joins only then. Karpenter's
                # registration timeout covers that stretch once an instance exists; so it does here.
                timeout_s += settings.registration_timeout_s
            self._check(r, "LaunchTimeout", "launch", self.launch.attempt_started(r), timeout_s)
        elif not status.is_true(claim.api.registered):
            since = parse_time(launched.get("lastTransitionTime")) or claim.created or r.now
            self._check(r, "RegistrationTimeout", "registration", since, settings.registration_timeout_s)
        elif not status.is_true(claim.api.initialized):
            # Counted from registration, kept in the claim's status: a restart neither resets nor fakes it.
            registered = status.get(claim.api.registered) or {}
            since = parse_time(registered.get("lastTransitionTime")) or r.now
            self._check(r, "InitializationTimeout", "initialization", since, settings.initialization_timeout_s,
                        self._never_initialized(r))
        elif repair := self.repair.check(r):
            self._expire(r, REPAIR_REASON, repair)
        return DONE

    def _never_initialized(self, r: Reconciliation) -> str:
        """What the registered Node never did (became Ready, lost its startup taints, offered its GPUs)."""
        nodes = self.deps.nodes.nodes_for(r.claim)
        lacking = awaited(r.claim, nodes[0], self.deps.catalogue.size) if nodes else None
        return lacking.never_came if lacking else ""

    def _node_gone(self, r: Reconciliation) -> str:
        """Why the claim's registered Node is going or gone, or "" when it is not."""
        claim = r.claim
        if not claim.is_true(claim.api.registered):
            return ""
        nodes = self.deps.nodes.nodes_for(claim)
        if not nodes:
            return f"node {claim.node_name} no longer exists"
        going = next((n["metadata"]["name"] for n in nodes if n["metadata"].get("deletionTimestamp")), None)
        return f"node {going} is being deleted" if going else ""

    def _check(self, r: Reconciliation, reason: str, phase: str, since: datetime, timeout_s: float,
               never_came: str = "") -> None:
        remaining = timeout_s - (r.now - since).total_seconds()
        if remaining > 0:
            r.requeue(remaining)
            return
        blocking = next((r.status.get(p) for p in r.claim.api.phases if not r.status.is_true(p)), None) or {}
        why = never_came or f"{blocking.get('reason', 'unknown')}: {blocking.get('message', '')}"
        self._expire(r, reason, f"{phase} did not finish within {timeout_s:.0f}s ({why}); deleting the claim so "
                     "that a new one can be made")

    def _expire(self, r: Reconciliation, reason: str, message: str) -> None:
        self.deps.events.warning(r.claim.obj, reason, message)
        metrics.TERMINATIONS.labels(kind=r.claim.api.kind, result=reason).inc()
        log.warning("deleting claim", claim=r.claim.key, reason=reason)
        self.deps.kube.delete_claim(r.claim.api, r.claim.name)
        metrics.KARPENTER_NODECLAIMS_DISRUPTED.labels(
            reason=disruption_reason(reason), **karpenter_claim_labels(r.claim)).inc()
