"""What every lifecycle phase shares: the claim being reconciled, its next status, and the outcome type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from gpu_provisioner.api.claims import Claim, StatusWriter
from gpu_provisioner.cloud.agentpools import AgentPools
from gpu_provisioner.cloud.inventory import PoolInventory
from gpu_provisioner.runtime.events import EventRecorder
from gpu_provisioner.runtime.kube import Kube
from gpu_provisioner.settings import Settings


class NodeLookup(Protocol):
    def nodes_for(self, claim: Claim) -> list[dict[str, Any]]:
        """The Nodes of the claim's agent pool (by providerID, else by agent-pool label)."""
        ...


class ClaimLookup(Protocol):
    def claim_exists(self, claim: Claim) -> bool:
        """Whether the watch still shows this claim object (same uid): False once it was deleted."""
        ...


@dataclass
class Deps:
    """The collaborators of the phases; one set per controller."""

    settings: Settings
    kube: Kube
    pools: AgentPools
    inventory: PoolInventory
    nodes: NodeLookup
    claims: ClaimLookup
    events: EventRecorder

    def claim_exists(self, claim: Claim) -> bool:
        return self.claims.claim_exists(claim)


@dataclass
class Reconciliation:
    """One pass over one claim: phases read the claim and write its next status here."""

    claim: Claim
    status: StatusWriter
    requeue_after: list[float] = field(default_factory=list)

    def requeue(self, after_s: float) -> None:
        self.requeue_after.append(max(after_s, 0.0))

    def report(self, events: EventRecorder, condition: str, reason: str, message: str, *, failed: bool = False,
               event_message: str = "") -> bool:
        """Set a condition that is not True (False when `failed`, else as the API says a phase is pending); a
        Warning Event says it (or `event_message`) once per change. True if it changed."""
        previous = self.status.get(condition) or {}
        status = "False" if failed else self.claim.api.pending_status
        self.status.set(condition, status, reason, message)
        changed = (previous.get("status"), previous.get("reason")) != (status, reason)
        if changed:
            events.warning(self.claim.obj, reason, event_message or message)
        return changed


@dataclass(frozen=True)
class Outcome:
    """done: the phase's condition is True and the next phase may run."""

    done: bool


DONE = Outcome(True)
WAITING = Outcome(False)
