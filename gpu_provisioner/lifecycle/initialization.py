"""Initialization: the Node is Ready, its startup taints are gone and it offers what the claim needs.

Owns the Initialized condition (MachineInitialized for Machine). Kaito's claims request only
storage, so the GPUs are the catalogue's: a GPU size is not initialized until the device plugin has
published its GPUs as allocatable.
"""

from __future__ import annotations

from typing import Any

from kubernetes.utils.quantity import parse_quantity

from gpu_provisioner.api.claims import INITIALIZED_LABEL, STORAGE, Claim
from gpu_provisioner.cloud.skus import lookup
from gpu_provisioner.lifecycle.base import DONE, WAITING, Deps, Outcome, Reconciliation


def required_resources(claim: Claim, vm_size: str) -> dict[str, Any]:
    """Non-zero requests except storage, plus the size's GPUs."""
    required = {k: v for k, v in claim.requests.items() if k != STORAGE and parse_quantity(v) > 0}
    size = lookup(vm_size)
    if size is not None and size.is_gpu:
        required.setdefault(size.gpu_resource, str(size.gpu_count))
    return required


def node_is_ready(node: dict[str, Any]) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class Initialization:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def reconcile(self, r: Reconciliation) -> Outcome:
        claim, condition = r.claim, r.claim.api.initialized
        if r.status.is_true(condition):
            # Once, as in Karpenter: a kubelet or device-plugin restart on a serving node must not flip Ready.
            return DONE
        nodes = self.deps.nodes.nodes_for(claim)
        if not nodes:
            return WAITING
        node = nodes[0]
        name = node["metadata"]["name"]
        if not node_is_ready(node):
            r.status.wait(condition, "NodeNotReady", f"node {name} is not Ready yet")
            return WAITING
        taints = {(t.get("key"), t.get("effect")) for t in (node.get("spec") or {}).get("taints") or []}
        waiting_taints = [t["key"] for t in claim.startup_taints if (t.get("key"), t.get("effect")) in taints]
        if waiting_taints:
            message = f"node {name} still has startup taints {waiting_taints}"
            r.status.wait(condition, "StartupTaintsExist", message)
            return WAITING
        node_status = node.get("status") or {}
        allocatable = node_status.get("allocatable") or {}
        instance_type = (node["metadata"].get("labels") or {}).get("node.kubernetes.io/instance-type", "")
        missing = [
            f"{resource} (want {amount}, node has {allocatable.get(resource, 0)})"
            for resource, amount in required_resources(claim, instance_type).items()
            if parse_quantity(allocatable.get(resource, 0)) < parse_quantity(amount)
        ]
        if missing:
            r.status.wait(condition, "ResourceNotRegistered",
                          f"node {name} does not offer {', '.join(missing)} yet (GPU device plugin not ready?)")
            return WAITING
        if (node["metadata"].get("labels") or {}).get(INITIALIZED_LABEL) != "true":
            self.deps.kube.patch_node(name, {"metadata": {"labels": {INITIALIZED_LABEL: "true"}}})
            self.deps.events.normal(claim.obj, "Initialized", f"node {name} is ready with its GPUs")
        r.status.status["capacity"] = node_status.get("capacity") or {}
        r.status.status["allocatable"] = allocatable
        r.status.set(condition, "True", "Initialized", "")
        return DONE
