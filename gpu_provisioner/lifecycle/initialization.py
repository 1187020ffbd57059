"""Initialization: the Node is Ready, its startup taints are gone and it offers what the claim needs.

Owns the Initialized condition (MachineInitialized for Machine). Kaito's claims request only
storage, so the GPUs are the catalogue's: a GPU size is not initialized until the device plugin has
published its GPUs as allocatable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from gpu_provisioner.api.claims import INITIALIZED_LABEL, INSTANCE_TYPE_LABEL, STORAGE, Claim
from gpu_provisioner.cloud.skus import AMD_GPU_RESOURCE, GPU_RESOURCE, VmSize
from gpu_provisioner.lifecycle.base import DONE, WAITING, Deps, Outcome, Reconciliation

GPU_RESOURCES = frozenset({GPU_RESOURCE, AMD_GPU_RESOURCE})
# What a VM size is (its GPUs), by name: the live catalogue's answer, or the built-in table's.
SizeOf = Callable[[str], VmSize | None]


def required_resources(claim: Claim, vm_size: str, size_of: SizeOf) -> dict[str, Any]:
    """Non-zero requests except storage, plus the size's GPUs."""
    required = {k: v for k, v in claim.requests.items() if k != STORAGE and parse_quantity(v) > 0}
    size = size_of(vm_size)
    if size is not None and size.is_gpu:
        required.setdefault(size.gpu_resource, str(size.gpu_count))
    return required


def node_is_ready(node: dict[str, Any]) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def allocatable_of(node: dict[str, Any], resource: str) -> Decimal:
    """How much of `resource` the Node has allocatable (0 when it lists none)."""
    return parse_quantity(((node.get("status") or {}).get("allocatable") or {}).get(resource, 0))


def offers(node: dict[str, Any], resource: str, amount: Any) -> bool:
    """Whether the Node's allocatable has at least `amount` of `resource`."""
    return allocatable_of(node, resource) >= parse_quantity(amount)


@dataclass(frozen=True)
class Awaited:
    """What a registered claim's Node still lacks before the claim is initialized."""

    reason: str  # the Initialized condition's reason, as Karpenter writes it
    message: str  # the condition's message
    never_came: str  # for the initialization timeout's Event: what never came, and what to check


def awaited(claim: Claim, node: dict[str, Any], size_of: SizeOf) -> Awaited | None:
    """The first thing the Node lacks (Ready, startup taints gone, the requested resources and GPUs), or None."""
    name = node["metadata"]["name"]
    if not node_is_ready(node):
        return Awaited("NodeNotReady", f"node {name} is not Ready yet",
                       f"node {name} never became Ready: check its kubelet and conditions (kubectl describe node)")
    taints = {(t.get("key"), t.get("effect")) for t in (node.get("spec") or {}).get("taints") or []}
    waiting_taints = [t["key"] for t in claim.startup_taints if (t.get("key"), t.get("effect")) in taints]
    if waiting_taints:
        return Awaited("StartupTaintsExist", f"node {name} still has startup taints {waiting_taints}",
                       f"startup taints {waiting_taints} were never removed from node {name}: check what removes them")
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    instance_type = (node["metadata"].get("labels") or {}).get(INSTANCE_TYPE_LABEL, "")
    missing = {
        resource: amount for resource, amount in required_resources(claim, instance_type, size_of).items()
        if not offers(node, resource, amount)
    }
    if not missing:
        return None
    wanted = ", ".join(f"{resource} (want {amount}, node has {allocatable.get(resource, 0)})"
                       for resource, amount in missing.items())
    gpus = [resource for resource in missing if resource in GPU_RESOURCES]
    hint = "check the GPU driver and the device plugin" if gpus else "check what should publish them"
    return Awaited("ResourceNotRegistered", f"node {name} does not offer {wanted} yet (GPU device plugin not ready?)",
                   f"{', '.join(missing)} never became allocatable on node {name}: {hint}")


def completes_initialization(claim: Claim, node: dict[str, Any], size_of: SizeOf) -> bool:
    """Whether this Node lets the claim be initialized (and so Ready) now: it lacks nothing, and the claim is not
    initialized yet."""
    return not claim.is_true(claim.api.initialized) and awaited(claim, node, size_of) is None


class Initialization:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def reconcile(self, r: Reconciliation) -> Outcome:
        claim, condition = r.claim, r.claim.api.initialized
        if r.status.is_true(condition):
            # Once, as in Karpenter: a kubelet or device-plugin restart on a serving node must not flip Ready
            # (a Node that stays unhealthy is node repair's business, see repair.py).
            return DONE
        nodes = self.deps.nodes.nodes_for(claim)
        if not nodes:
            return WAITING
        node = nodes[0]
        name = node["metadata"]["name"]
        lacking = awaited(claim, node, self.deps.catalogue.size)
        if lacking is not None:
            r.status.wait(condition, lacking.reason, lacking.message)
            r.defer_status()
            return WAITING
        if (node["metadata"].get("labels") or {}).get(INITIALIZED_LABEL) != "true":
            self.deps.kube.patch_node(name, {"metadata": {"labels": {INITIALIZED_LABEL: "true"}}})
        node_status = node.get("status") or {}
        r.status.status["capacity"] = node_status.get("capacity") or {}
        r.status.status["allocatable"] = node_status.get("allocatable") or {}
        r.status.set(condition, "True", "Initialized", "")
        return DONE
