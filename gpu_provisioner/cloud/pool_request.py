"""From a claim to the agent-pool request AKS gets, with every local check done before any cloud write."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from gpu_provisioner.api.claims import (
    AZURE_SKU_LABEL,
    INSTANCE_TYPE_LABEL,
    NODE_IMAGE_FAMILY_ANNOTATION,
    STORAGE,
    Claim,
)
from gpu_provisioner.cloud.skus import VmSize, lookup

POOL_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
# AKS's OS disk size range, in GiB.
OS_DISK_MIN_GB, OS_DISK_MAX_GB = 30, 2048
OS_SKUS = {"": "Ubuntu", "ubuntu": "Ubuntu", "azurelinux": "AzureLinux"}
TAINT_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}

# Tags that mark a pool as made by this controller, and for which claim.
MANAGED_TAG = "kaito-gpu-provisioner"
MANAGED_VALUE = "managed"
CLAIM_TAG = "kaito-claim"
CLAIM_UID_TAG = "kaito-claim-uid"
CREATED_TAG = "kaito-created-at"
# On every node of a pool gpu-provisioner makes ("gpu" or "cpu"), as the Go gpu-provisioner labels them.
MACHINE_TYPE_LABEL = "kaito.sh/machine-type"
# The claim's creation time, on every node of its pool (the Go gpu-provisioner's label, from its v0.3), in its layout:
# RFC 3339 with '-' for ':', which a label value may not hold.
CREATION_LABEL = "kaito.sh/creation-timestamp"
CREATION_LABEL_FORMAT = "%Y-%m-%dT%H-%M-%SZ"

# Label domains owned by AKS and the kubelet: AKS refuses them in nodeLabels, and a claim must not be
# able to overwrite them on a Node (node-restriction.kubernetes.io is the one domain meant for users).
_RESERVED_DOMAINS = ("kubernetes.azure.com", "kubernetes.io", "k8s.io")
_USER_DOMAINS = ("node-restriction.kubernetes.io",)
# Reserved labels that only describe the node (Kubernetes' well-known labels, the kubelet's node.kubernetes.io):
# Karpenter copies single-value requirements into them, so a claim may carry them; AKS sets them itself.
_NODE_DESCRIPTION_LABELS = frozenset({
    "kubernetes.io/arch", "kubernetes.io/os", "beta.kubernetes.io/arch", "beta.kubernetes.io/os",
    "beta.kubernetes.io/instance-type", "topology.kubernetes.io/zone", "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/region",
})
_NODE_DESCRIPTION_DOMAIN = "node.kubernetes.io"
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
# A Kubernetes resource quantity as apimachinery parses it (the claim CRDs' pattern also lets "1e1.5" through).
_QUANTITY = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class InvalidClaim(Exception):
    """The claim cannot be turned into an agent pool; nothing in the cloud is touched."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _domain(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else ""


def is_reserved_label(key: str) -> bool:
    """A label in a domain AKS and the kubelet own: never sent to AKS nor synced onto the Node."""
    domain = _domain(key)
    if domain in _USER_DOMAINS:
        return False
    return any(domain == d or domain.endswith("." + d) for d in _RESERVED_DOMAINS)


def is_restricted_label(key: str) -> bool:
    """A reserved label a claim may not carry at all: it would make the node pass for what the platform
    decides (kubernetes.azure.com/mode=system, node-role.kubernetes.io/..., kubernetes.io/hostname)."""
    domain = _domain(key)
    describes_node = key in _NODE_DESCRIPTION_LABELS or domain == _NODE_DESCRIPTION_DOMAIN or domain.endswith(
        "." + _NODE_DESCRIPTION_DOMAIN)
    return is_reserved_label(key) and not describes_node


def is_valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return bool(_LABEL_NAME.match(name))


@dataclass(frozen=True)
class PoolRequest:
    name: str
    # Candidate sizes in the claim's order; launch tries the next one when a size is unavailable.
    vm_sizes: tuple[VmSize, ...]
    os_disk_gb: int | None
    os_sku: str
    node_labels: dict[str, str] = field(default_factory=dict)
    node_taints: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    def body(self, vm_size: VmSize) -> dict[str, Any]:
        """The ARM agent-pool resource for one candidate size."""
        properties: dict[str, Any] = {
            "count": 1,
            "vmSize": vm_size.name,
            "osType": "Linux",
            "osSKU": self.os_sku,
            "mode": "User",
            "type": "VirtualMachineScaleSets",
            "nodeLabels": self.node_labels,
            "nodeTaints": list(self.node_taints),
            "tags": self.tags,
        }
        if self.os_disk_gb is not None:
            properties["osDiskSizeGB"] = self.os_disk_gb
        return {"properties": properties}


def build_pool_request(claim: Claim, created_at: str,
                       size_of: Callable[[str], VmSize | None] = lookup) -> PoolRequest:
    """The request for `claim`, or InvalidClaim naming the first thing a person must fix."""
    if not POOL_NAME.match(claim.name):
        raise InvalidClaim(
            "InvalidPoolName",
            f"claim name {claim.name!r} cannot be an AKS agent pool name: it must be 1-12 lowercase "
            "letters or digits starting with a letter",
        )
    sizes = _vm_sizes(claim, size_of)
    return PoolRequest(
        name=claim.name,
        vm_sizes=sizes,
        os_disk_gb=_os_disk_gb(claim),
        os_sku=_os_sku(claim),
        node_labels=_node_labels(claim, sizes, created_at),
        node_taints=tuple(_taint_string(t) for t in claim.taints),
        tags={MANAGED_TAG: MANAGED_VALUE, CLAIM_TAG: claim.key, CLAIM_UID_TAG: claim.uid, CREATED_TAG: created_at},
    )


def _vm_sizes(claim: Claim, size_of: Callable[[str], VmSize | None]) -> tuple[VmSize, ...]:
    names = claim.requirement_values(INSTANCE_TYPE_LABEL) or claim.requirement_values(AZURE_SKU_LABEL)
    if not names:
        raise InvalidClaim(
            "InstanceTypeMissing",
            f"the claim has no `{INSTANCE_TYPE_LABEL} In [...]` requirement naming the VM size to create",
        )
    sizes = [size for size in map(size_of, names) if size is not None]
    if not sizes:
        raise InvalidClaim(
            "UnknownInstanceType",
            f"none of the requested instance types {names} is a VM size gpu-provisioner knows; "
            "use an Azure GPU size such as Standard_NC24ads_A100_v4",
        )
    return tuple(sizes)


def _os_disk_gb(claim: Claim) -> int | None:
    storage = claim.requests.get(STORAGE)
    if storage is None:
        return None  # AKS's default OS disk
    size = _quantity(storage)
    if size is None:
        raise InvalidClaim("InvalidStorageRequest",
                           f"storage request {storage!r} is not a Kubernetes quantity; write a size such as 128Gi")
    if size < 0:
        raise InvalidClaim("InvalidStorageRequest",
                           f"storage request {storage} is negative; write a size such as 128Gi, or 0 for AKS's default")
    if size == 0:
        return None  # AKS's default OS disk, as Kaito asks for a workspace without a preset
    # Compared before any int(): "1e999999999" would otherwise be built as a billion-digit integer.
    if size > OS_DISK_MAX_GB << 30:
        raise InvalidClaim(
            "InvalidStorageRequest",
            f"storage request {storage} exceeds the largest AKS OS disk ({OS_DISK_MAX_GB} GiB)",
        )
    if size != size.to_integral_value():
        # Most likely a size without its unit ("0.5" meaning 0.5Gi): guessing one could be 1000x off.
        raise InvalidClaim("InvalidStorageRequest",
                           f"storage request {storage} is not a whole number of bytes; give the unit, such as 128Gi")
    # A disk bigger than asked still satisfies the request; AKS refuses anything below its minimum.
    return max(int(size) >> 30, OS_DISK_MIN_GB)


def _quantity(value: object) -> Decimal | None:
    # parse_quantity alone takes what Kubernetes does not ("NaN", "1_000", "1e3Gi"), so check the grammar first.
    if isinstance(value, bool) or not _QUANTITY.fullmatch(str(value)):
        return None
    try:
        return parse_quantity(str(value))
    except ValueError:  # a suffix on an exponent too large for Decimal
        return None


def _os_sku(claim: Claim) -> str:
    family = claim.annotations.get(NODE_IMAGE_FAMILY_ANNOTATION, "").strip().lower()
    if family not in OS_SKUS:
        raise InvalidClaim(
            "UnsupportedNodeImageFamily",
            f"annotation {NODE_IMAGE_FAMILY_ANNOTATION}={family!r} is not supported; use ubuntu or azurelinux",
        )
    return OS_SKUS[family]


def _node_labels(claim: Claim, sizes: tuple[VmSize, ...], created_at: str) -> dict[str, str]:
    restricted = sorted(key for key in claim.labels if is_restricted_label(key))
    if restricted:
        raise InvalidClaim(
            "RestrictedLabel",
            f"labels {restricted} are in domains AKS and the kubelet own (kubernetes.azure.com, kubernetes.io, "
            "k8s.io); a claim may not set them on a node: remove them from the workspace's labelSelector",
        )
    pool_key, pool_value = claim.api.pool_label
    labels = {key: value for key, value in claim.labels.items() if not is_reserved_label(key)}
    labels.setdefault(pool_key, pool_value)
    labels[MACHINE_TYPE_LABEL] = "gpu" if all(s.is_gpu for s in sizes) else "cpu"
    labels[CREATION_LABEL] = creation_label(created_at)
    return labels


def creation_label(created_at: str) -> str:
    """An RFC 3339 time (whole seconds, UTC) in CREATION_LABEL_FORMAT."""
    return created_at.replace(":", "-")


def _taint_string(taint: dict[str, Any]) -> str:
    key, value, effect = taint.get("key", ""), taint.get("value", "") or "", taint.get("effect", "")
    if not is_valid_label_key(key) or not _LABEL_VALUE.match(value) or effect not in TAINT_EFFECTS:
        raise InvalidClaim("InvalidTaint", f"taint {key}={value}:{effect} is not a valid Kubernetes taint")
    return f"{key}={value}:{effect}"
