"""One reconcile of one claim: the phases in order, then one status write if anything changed."""

from __future__ import annotations

import structlog

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import TERMINATION_FINALIZER, Claim
from gpu_provisioner.lifecycle.base import Deps, NextLook, Reconciliation, karpenter_claim_labels, karpenter_nodepool
from gpu_provisioner.lifecycle.initialization import Initialization
from gpu_provisioner.lifecycle.launch import Launch
from gpu_provisioner.lifecycle.liveness import Liveness
from gpu_provisioner.lifecycle.registration import Registration
from gpu_provisioner.lifecycle.repair import NodeRepair
from gpu_provisioner.lifecycle.termination import Termination

log = structlog.get_logger(__name__)


class ClaimLifecycle:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.launch = Launch(deps)
        self.phases = (self.launch, Registration(deps), Initialization(deps))
        self.repair = NodeRepair(deps)
        self.liveness = Liveness(deps, self.launch, self.repair)
        self.termination = Termination(deps)

    def claim_deleted(self, claim: Claim) -> None:
        """The watch saw the claim go: drop what the phases remember of it, and have `reap` make sure that
        no pool outlives it."""
        self.launch.forget(claim.uid)
        self.repair.forget(claim.uid)
        self.termination.claim_deleted(claim)

    def reap(self, key: str) -> NextLook | None:
        """For a key whose claim is gone: delete a pool left behind; returns when to look again."""
        after_s = self.termination.reap(key)
        return None if after_s is None else NextLook(after_s)

    def reconcile(self, claim: Claim) -> NextLook | None:
        """Drive the claim one step; returns when to look again (None: only on the next event)."""
        if claim.deleting:
            r = Reconciliation(claim, self.deps.clock())
            self.termination.reconcile(r)
            return r.next_look()
        if TERMINATION_FINALIZER not in claim.finalizers:
            # Before any cloud call, so a deletion can never skip cleaning up; with the size labels when they
            # are already settled (one write less).
            metadata = {"finalizers": [*claim.finalizers, TERMINATION_FINALIZER],
                        "resourceVersion": claim.metadata["resourceVersion"]}
            if labels := self.launch.labels_before_launch(claim, self.deps.clock()):
                metadata["labels"] = labels
            claim = Claim(claim.api, self.deps.kube.patch_claim(claim.api, claim.name, {"metadata": metadata}))
            # Taken on: what Karpenter counts when its provisioner creates a nodeclaim.
            metrics.KARPENTER_NODECLAIMS_CREATED.labels(reason="provisioned", **karpenter_claim_labels(claim)).inc()
        r = Reconciliation(claim, self.deps.clock(), self.deps.claims_waiting(claim.key))
        try:
            for index, phase in enumerate(self.phases):
                if not phase.reconcile(r).done:
                    self._later_phases_wait(r, index)
                    break
            self.liveness.reconcile(r)
        finally:
            # Also when a later phase failed: what earlier phases achieved (and announced) must stick,
            # or the next attempt would do and announce it again.
            if r.status_deferred and r.claims_waiting:
                r.defer_until_idle()
            elif r.status.changed():
                status = r.status.render()
                self.deps.kube.patch_claim_status(claim.api, claim.name, status)
                self._record_transitions(r, status)
        return r.next_look()

    @staticmethod
    def _later_phases_wait(r: Reconciliation, blocked: int) -> None:
        """The phases after the one that is not done say why they wait for it, as Karpenter's do (and a
        condition written by an older version, such as a Machine's Unknown, is brought in line)."""
        api = r.claim.api
        reason, message = api.not_launched if blocked == 0 else ("NodeNotFound", "Node not registered with cluster")
        for phase in api.phases[blocked + 1:]:
            if not r.status.is_true(phase):  # Initialized is set once
                r.status.wait(phase, reason, message)

    @staticmethod
    def _record_transitions(r: Reconciliation, status: dict) -> None:
        claim = r.claim
        for condition in status["conditions"]:
            before = claim.condition(condition["type"]) or {}
            if (before.get("status"), before.get("reason")) == (condition["status"], condition["reason"]):
                continue
            log.info("condition changed", claim=claim.key, condition=condition["type"],
                     status=condition["status"], reason=condition["reason"], message=condition["message"])
            if condition["status"] == "True":
                stage = condition["type"].removeprefix("Machine").lower()
                metrics.STAGE_SECONDS.labels(kind=claim.api.kind, stage=stage).observe(r.claim_age_s)
                if stage == "registered":
                    metrics.KARPENTER_NODES_CREATED.labels(nodepool=karpenter_nodepool(claim)).inc()
