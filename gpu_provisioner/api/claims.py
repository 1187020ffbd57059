"""The two claim APIs Kaito writes (Machine, NodeClaim) behind one read view and one condition writer.

Claims stay plain dicts, exactly as the API server sends them: the controller reads a few fields
and writes back status, so a typed model would only add a second copy to keep in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GROUP = "karpenter.sh"
TERMINATION_FINALIZER = "karpenter.sh/termination"
REGISTERED_LABEL = "karpenter.sh/registered"
INITIALIZED_LABEL = "karpenter.sh/initialized"
# Karpenter v1's deadline for a claim's drain; node repair sets it to the moment it deletes the claim.
TERMINATION_TIMESTAMP_ANNOTATION = "karpenter.sh/nodeclaim-termination-timestamp"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
ZONE_LABEL = "topology.kubernetes.io/zone"
CAPACITY_TYPE_LABEL = "karpenter.sh/capacity-type"
# Every pool this controller makes is of regular (not Spot) VMs.
ON_DEMAND = "on-demand"
AZURE_SKU_LABEL = "karpenter.azure.com/sku-name"
NODE_IMAGE_FAMILY_ANNOTATION = "kaito.sh/node-image-family"
STORAGE = "storage"
READY = "Ready"
AWAITING_RECONCILIATION = "AwaitingReconciliation"


@dataclass(frozen=True)
class ClaimApi:
    """What differs between Machine (karpenter.sh/v1alpha5) and NodeClaim (karpenter.sh/v1)."""

    name: str  # the CLI / settings name
    kind: str
    version: str
    plural: str
    launched: str
    registered: str
    initialized: str
    # The label (and value) Kaito puts on its claims and the Go provisioner copies onto pools.
    pool_label: tuple[str, str]
    # NodeClaim uses metav1.Condition (lastTransitionTime required, observedGeneration);
    # Machine uses knative-style conditions (severity).
    metav1_conditions: bool
    # The status of a phase condition that is not True yet. karpenter-core v0.29 (the Machine API's) writes
    # False, never Unknown, and Kaito v0.3 counts a Machine as on its way only while MachineInitialized is
    # False: with Unknown it makes a second Machine, a second GPU node. Karpenter v1 writes Unknown.
    pending_status: str
    # Reason and message of the later phases while the claim has not launched.
    not_launched: tuple[str, str]
    # Kaito v0.3 fails fast only when the MachineLaunched message equals its capacity phrase; later Kaito
    # looks for the phrase inside the message, so it can carry the detail.
    exact_capacity_message: bool
    # Whether the status has `imageID` (Karpenter v1's NodeClaim; v1alpha5's Machine has none).
    has_image_id: bool

    @property
    def api_version(self) -> str:
        return f"{GROUP}/{self.version}"

    @property
    def phases(self) -> tuple[str, str, str]:
        return (self.launched, self.registered, self.initialized)


MACHINE = ClaimApi(
    "machine", "Machine", "v1alpha5", "machines",
    "MachineLaunched", "MachineRegistered", "MachineInitialized",
    ("karpenter.sh/provisioner-name", "default"), metav1_conditions=False,
    pending_status="False", not_launched=("MachineNotLaunched", "Machine is not launched"),
    exact_capacity_message=True, has_image_id=False,
)
NODECLAIM = ClaimApi(
    "nodeclaim", "NodeClaim", "v1", "nodeclaims",
    "Launched", "Registered", "Initialized",
    ("karpenter.sh/nodepool", "kaito"), metav1_conditions=True,
    pending_status="Unknown", not_launched=(AWAITING_RECONCILIATION, "object is awaiting reconciliation"),
    exact_capacity_message=False, has_image_id=True,
)
CLAIM_APIS: dict[str, ClaimApi] = {api.name: api for api in (MACHINE, NODECLAIM)}

# The label naming the Kaito object a claim is for (Workspace, or RAGEngine from Kaito v0.4 on).
KAITO_OWNER_LABELS = ("kaito.sh/workspace", "kaito.sh/ragengine")
# The node classes Kaito's NodeClaims refer to: (group, kind). Kaito v0.4.2-v0.6 sends an empty group
# with AKSNodeClass; from v0.7 on its own class. Azure's Karpenter uses karpenter.azure.com.
KAITO_NODE_CLASSES = frozenset({("kaito.sh", "KaitoNodeClass"), ("", "AKSNodeClass")})


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


_DURATION_PART = re.compile(r"([0-9]+)([smh])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def parse_duration(value: str | None) -> float | None:
    """Seconds of a Karpenter duration such as "1h30m" (the CRD's pattern); None when unset or not one."""
    parts = _DURATION_PART.findall(value or "")
    if not parts or "".join(number + unit for number, unit in parts) != value:
        return None
    return float(sum(int(number) * _UNIT_S[unit] for number, unit in parts))


@dataclass(frozen=True)
class Claim:
    """A read view over one claim object."""

    api: ClaimApi
    obj: dict[str, Any]

    @property
    def key(self) -> str:
        return claim_key(self.api, self.name)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.obj["metadata"]

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def uid(self) -> str:
        return self.metadata["uid"]

    @property
    def generation(self) -> int:
        return int(self.metadata.get("generation", 1))

    @property
    def labels(self) -> dict[str, str]:
        return self.metadata.get("labels") or {}

    @property
    def annotations(self) -> dict[str, str]:
        return self.metadata.get("annotations") or {}

    @property
    def finalizers(self) -> list[str]:
        return self.metadata.get("finalizers") or []

    @property
    def created(self) -> datetime | None:
        """creationTimestamp (the API server always sets it)."""
        return parse_time(self.metadata.get("creationTimestamp"))

    @property
    def deleting(self) -> bool:
        return bool(self.metadata.get("deletionTimestamp"))

    @property
    def deleted_at(self) -> datetime | None:
        return parse_time(self.metadata.get("deletionTimestamp"))

    @property
    def termination_grace_s(self) -> float | None:
        """NodeClaim spec.terminationGracePeriod: the longest drain once deletion starts; None: no limit."""
        return parse_duration(self.spec.get("terminationGracePeriod"))

    @property
    def spec(self) -> dict[str, Any]:
        return self.obj.get("spec") or {}

    @property
    def status(self) -> dict[str, Any]:
        return self.obj.get("status") or {}

    @property
    def requirements(self) -> list[dict[str, Any]]:
        return self.spec.get("requirements") or []

    @property
    def taints(self) -> list[dict[str, Any]]:
        return self.spec.get("taints") or []

    @property
    def startup_taints(self) -> list[dict[str, Any]]:
        return self.spec.get("startupTaints") or []

    @property
    def requests(self) -> dict[str, Any]:
        return (self.spec.get("resources") or {}).get("requests") or {}

    @property
    def provider_id(self) -> str:
        return self.status.get("providerID", "")

    @property
    def node_name(self) -> str:
        return self.status.get("nodeName", "")

    def requirement_values(self, key: str) -> list[str]:
        """Values of the `In` requirement on `key`, in the order the claim lists them."""
        values: list[str] = []
        for requirement in self.requirements:
            if requirement.get("key") == key and requirement.get("operator") == "In":
                values.extend(v for v in requirement.get("values") or [] if v not in values)
        return values

    @property
    def made_by_kaito(self) -> bool:
        """Whether Kaito wrote this claim: only those are ours. Karpenter's own (Azure's node
        auto-provisioning, or Karpenter's Machines) share the API and the cluster and must not be touched."""
        labels = self.labels
        pool_key, pool_value = self.api.pool_label
        if labels.get(pool_key) != pool_value or not any(labels.get(k) for k in KAITO_OWNER_LABELS):
            return False
        if self.api.kind != NODECLAIM.kind:
            return True
        reference = self.spec.get("nodeClassRef") or {}
        return (reference.get("group") or "", reference.get("kind") or "") in KAITO_NODE_CLASSES

    def condition(self, condition_type: str) -> dict[str, Any] | None:
        return next((c for c in self.status.get("conditions") or [] if c.get("type") == condition_type), None)

    def is_true(self, condition_type: str) -> bool:
        condition = self.condition(condition_type)
        return condition is not None and condition.get("status") == "True"


def claim_key(api: ClaimApi, name: str) -> str:
    return f"{api.plural}/{name}"


def split_key(key: str) -> tuple[ClaimApi, str]:
    plural, name = key.split("/", 1)
    api = next(a for a in CLAIM_APIS.values() if a.plural == plural)
    return api, name


class StatusWriter:
    """Builds the next status of a claim: conditions keep their transition time unless the status flips.

    Ready is derived, as each API's Karpenter derives its root condition: True when the three phase conditions are.
    Otherwise a Machine's repeats the reason and message of the first phase that is not True (karpenter-core v0.29's
    knative conditions copy a failing phase's); a NodeClaim's says UnhealthyDependents (False, a phase False) or
    ReconcilingDependents (Unknown) and lists the phases not True, the latest changed first (Karpenter v1's
    operatorpkg). Kaito v0.12 reads the phases' reasons, not Ready's.
    """

    def __init__(self, claim: Claim, now: datetime) -> None:
        self.claim = claim
        self.now = now
        self.status: dict[str, Any] = {k: v for k, v in claim.status.items() if k != "conditions"}
        self._conditions: dict[str, dict[str, Any]] = {
            c["type"]: dict(c) for c in claim.status.get("conditions") or [] if "type" in c
        }

    def set(self, condition_type: str, status: str, reason: str, message: str = "") -> None:
        previous = self._conditions.get(condition_type)
        transitioned = previous is None or previous.get("status") != status
        condition: dict[str, Any] = {
            "type": condition_type,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": rfc3339(self.now) if transitioned else previous.get("lastTransitionTime"),
        }
        if self.claim.api.metav1_conditions:
            condition["observedGeneration"] = self.claim.generation
        self._conditions[condition_type] = condition

    def wait(self, condition_type: str, reason: str, message: str) -> None:
        """The phase is not there yet: its condition in the claim API's own way of saying so."""
        self.set(condition_type, self.claim.api.pending_status, reason, message)

    def get(self, condition_type: str) -> dict[str, Any] | None:
        return self._conditions.get(condition_type)

    def is_true(self, condition_type: str) -> bool:
        condition = self._conditions.get(condition_type)
        return condition is not None and condition["status"] == "True"

    def render(self) -> dict[str, Any]:
        api = self.claim.api
        for phase in api.phases:
            if phase not in self._conditions:
                self.wait(phase, AWAITING_RECONCILIATION, "object is awaiting reconciliation")
        blocking = [self._conditions[p] for p in api.phases if not self.is_true(p)]
        if not blocking:
            self.set(READY, "True", READY, "")
        elif api.metav1_conditions:
            failed = any(c["status"] == "False" for c in blocking)
            latest_first = sorted(blocking, key=lambda c: c.get("lastTransitionTime") or "", reverse=True)
            self.set(READY, "False" if failed else "Unknown",
                     "UnhealthyDependents" if failed else "ReconcilingDependents",
                     ", ".join(f"{c['type']}={c['status']}" for c in latest_first))
        else:
            first = blocking[0]
            self.set(READY, "False" if first["status"] == "False" else "Unknown", first["reason"], first["message"])
        order = [*api.phases, READY]
        conditions = sorted(
            self._conditions.values(), key=lambda c: order.index(c["type"]) if c["type"] in order else len(order)
        )
        return {**self.status, "conditions": conditions}

    def changed(self) -> bool:
        return _comparable(self.render()) != _comparable(self.claim.status)


def _comparable(status: dict[str, Any]) -> dict[str, Any]:
    """Status without transition times, so an unchanged condition never causes a write."""
    conditions = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
    ]
    return {**status, "conditions": conditions}
