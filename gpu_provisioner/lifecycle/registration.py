"""Registration: the claim's Node has joined; make it the claim's (labels, taints, finalizer, owner).

Owns the Registered condition (MachineRegistered for Machine).
"""

from __future__ import annotations

from typing import Any

from gpu_provisioner.api.claims import INITIALIZED_LABEL, REGISTERED_LABEL, TERMINATION_FINALIZER, ZONE_LABEL, Claim
from gpu_provisioner.cloud.pool_request import is_reserved_label
from gpu_provisioner.lifecycle.base import DONE, WAITING, Deps, Outcome, Reconciliation
from gpu_provisioner.lifecycle.initialization import awaited

# AKS labels each node with the node image it runs.
NODE_IMAGE_VERSION_LABEL = "kubernetes.azure.com/node-image-version"


def claim_owner_reference(claim: Claim) -> dict[str, Any]:
    return {
        "apiVersion": claim.api.api_version, "kind": claim.api.kind, "name": claim.name, "uid": claim.uid,
        "blockOwnerDeletion": True,
    }


def merged_taints(current: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`current` plus every wanted taint whose key and effect are not on the Node yet."""
    present = {(t.get("key"), t.get("effect")) for t in current}
    extra = [
        {k: v for k, v in t.items() if k in ("key", "value", "effect")}
        for t in wanted if (t.get("key"), t.get("effect")) not in present
    ]
    return [*current, *extra]


class Registration:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def reconcile(self, r: Reconciliation) -> Outcome:
        claim, condition = r.claim, r.claim.api.registered
        nodes = self.deps.nodes.nodes_for(claim)
        if not nodes:
            message = f"waiting for the node of agent pool {claim.name} to join"
            r.status.wait(condition, "NodeNotFound", message)
            return WAITING
        if len(nodes) > 1:
            names = ", ".join(sorted(n["metadata"]["name"] for n in nodes))
            message = f"agent pool {claim.name} has several nodes: {names}"
            r.report(self.deps.events, condition, "MultipleNodesFound", message, failed=True)
            return WAITING
        node = nodes[0]
        lacking = awaited(claim, node, self.deps.catalogue.size)
        if r.claims_waiting and lacking is not None and not r.status.is_true(condition):
            # Progress only: no pod runs on a Node that cannot be initialized yet. In a burst it is registered in the
            # pass that initializes it (one Node write and one status write, not two each), or when idle.
            r.defer_status()
            return WAITING
        patch = self._node_patch(claim, node)
        if patch and "spec" not in patch and lacking is None:
            # A Node met already initialized (under load it is often GPU-ready before it is registered) gets
            # initialization's label in this write, so that one write, not two, comes before the claim is Ready.
            # Not when this write adds taints: they may be startup taints, which initialization waits out.
            patch["metadata"].setdefault("labels", {})[INITIALIZED_LABEL] = "true"
        if patch:
            self.deps.kube.patch_node(node["metadata"]["name"], patch)
        r.status.status["providerID"] = (node.get("spec") or {}).get("providerID", "")
        r.status.status["nodeName"] = node["metadata"]["name"]
        node_labels = node["metadata"].get("labels") or {}
        if claim.api.has_image_id and node_labels.get(NODE_IMAGE_VERSION_LABEL):
            # What the VM was made from, as Karpenter's Azure provider writes it (here AKS's node image version).
            r.status.status["imageID"] = node_labels[NODE_IMAGE_VERSION_LABEL]
        zone = node_labels.get(ZONE_LABEL)
        if zone and claim.labels.get(ZONE_LABEL) != zone:
            # Known once the node is there (the pool names no zone): the Zone printer column reads it, nothing waits
            # for it. So it goes on in a pass after the one that registers the claim, when no other claim waits (not
            # in a pass that something else brought while others wait, such as a burst of deletions).
            if r.status.is_true(condition) and not r.claims_waiting:
                self.deps.kube.patch_claim(claim.api, claim.name, {"metadata": {"labels": {ZONE_LABEL: zone}}})
            else:
                r.defer_until_idle()
        r.status.set(condition, "True", "Registered", "")
        return DONE

    @staticmethod
    def _node_patch(claim: Claim, node: dict[str, Any]) -> dict[str, Any]:
        """A merge patch that makes the Node carry what the claim asks for, or {} if it already does."""
        metadata = node["metadata"]
        labels = metadata.get("labels") or {}
        wanted_labels = {k: v for k, v in claim.labels.items() if not is_reserved_label(k)}
        wanted_labels[REGISTERED_LABEL] = "true"
        label_changes = {k: v for k, v in wanted_labels.items() if labels.get(k) != v}
        annotations = metadata.get("annotations") or {}
        # Annotations in the platform's domains (kubectl's last-applied-configuration, AKS's) stay the claim's.
        annotation_changes = {
            k: v for k, v in claim.annotations.items() if not is_reserved_label(k) and annotations.get(k) != v
        }
        finalizers = metadata.get("finalizers") or []
        owners = metadata.get("ownerReferences") or []
        taints = (node.get("spec") or {}).get("taints") or []
        # Startup taints go on once, before the registered label: whatever removes them later must win.
        unregistered = labels.get(REGISTERED_LABEL) != "true"
        wanted_taints = [*claim.taints, *(claim.startup_taints if unregistered else [])]
        new_taints = merged_taints(taints, wanted_taints)

        patch_metadata: dict[str, Any] = {}
        if label_changes:
            patch_metadata["labels"] = label_changes
        if annotation_changes:
            patch_metadata["annotations"] = annotation_changes
        # Kube.patch_node merges these two lists: only what is added is sent.
        if TERMINATION_FINALIZER not in finalizers:
            patch_metadata["finalizers"] = [TERMINATION_FINALIZER]
        if not any(o.get("uid") == claim.uid for o in owners):
            patch_metadata["ownerReferences"] = [claim_owner_reference(claim)]
        patch: dict[str, Any] = {}
        if new_taints != taints:
            # Taints are replaced whole: the write holds only if the Node is still the one they were computed from.
            patch["spec"] = {"taints": new_taints}
            patch_metadata["resourceVersion"] = metadata["resourceVersion"]
        if patch_metadata:
            patch["metadata"] = patch_metadata
        return patch
