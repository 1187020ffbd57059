"""What every lifecycle phase shares: the claim being reconciled, its next status, and the outcome type."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from gpu_provisioner.api.claims import Claim, StatusWriter, utc_now
from gpu_provisioner.cloud.agentpools import AgentPools
from gpu_provisioner.cloud.catalogue import SizeCatalogue
from gpu_provisioner.cloud.inventory import PoolInventory
from gpu_provisioner.runtime.background import BackgroundCalls
from gpu_provisioner.runtime.events import EventRecorder
from gpu_provisioner.runtime.kube import Kube
from gpu_provisioner.settings import Settings


class NodeLookup(Protocol):
    def nodes_for(self, claim: Claim) -> list[dict[str, Any]]:
        """The Nodes of the claim's agent pool (by providerID, else by agent-pool label)."""
        ...

    def nodes_of_pools(self, pools: Iterable[str]) -> list[dict[str, Any]]:
        """The Nodes of these agent pools."""
        ...


class ClaimLookup(Protocol):
    def claim_exists(self, claim: Claim) -> bool:
        """Whether the watch still shows this claim object (same uid): False once it was deleted."""
        ...


# Karpenter's capacity type label; AKS pools made here are regular-priority VMs, which Karpenter calls on-demand.
CAPACITY_TYPE_LABEL = "karpenter.sh/capacity-type"


def karpenter_nodepool(claim: Claim) -> str:
    """The `nodepool` label of Karpenter's metrics: a NodeClaim's nodepool, a Machine's provisioner."""
    key, default = claim.api.pool_label
    return claim.labels.get(key, default)


def karpenter_claim_labels(claim: Claim) -> dict[str, str]:
    """The `nodepool` and `capacity_type` labels of Karpenter's nodeclaim metrics for a claim."""
    return {"nodepool": karpenter_nodepool(claim), "capacity_type": claim.labels.get(CAPACITY_TYPE_LABEL, "on-demand")}


@dataclass
class Deps:
    """The collaborators of the phases; one set per controller. Time comes from `clock` only, so that a
    timeout is tested by moving a clock."""

    settings: Settings
    kube: Kube
    pools: AgentPools
    inventory: PoolInventory
    nodes: NodeLookup
    claims: ClaimLookup
    events: EventRecorder
    clock: Callable[[], datetime] = utc_now
    # The region's VM sizes and the pre-flight before a PUT; the default knows only the built-in table.
    catalogue: SizeCatalogue = field(default_factory=SizeCatalogue)
    # For a pass over the claim of this key: whether other claims wait for a worker, or came moments ago, for work
    # someone waits for (see Reconciliation.defer_status).
    claims_waiting: Callable[[str], bool] = lambda key: False
    # Pool PUTs and DELETEs, by claim key, off the workers; by default each runs on the worker that starts it.
    arm_writes: BackgroundCalls = field(default_factory=lambda: BackgroundCalls(0, lambda key: None))


@dataclass(frozen=True)
class NextLook:
    """When to reconcile a claim again, besides on its next event: after `after_s` seconds, and (`when_idle`) as
    soon as no other claim waits, for writes nobody waits for."""

    after_s: float | None = None
    when_idle: bool = False


@dataclass
class Reconciliation:
    """One pass over one claim at one moment (`now`): phases read the claim, write its next status here
    and say when to look again."""

    claim: Claim
    now: datetime
    # Other claims waited for a worker, or came moments ago, when this pass began: what only tells of progress may
    # wait (defer_status).
    claims_waiting: bool = False
    status: StatusWriter = field(init=False)
    requeue_after: list[float] = field(default_factory=list)
    # Writes nobody waits for are left to a pass when no other claim waits (see defer_until_idle).
    requeue_when_idle: bool = False
    # The status write may wait for such a pass (see defer_status).
    status_deferred: bool = False

    def __post_init__(self) -> None:
        self.status = StatusWriter(self.claim, self.now)

    @property
    def claim_age_s(self) -> float:
        created = self.claim.created
        return (self.now - created).total_seconds() if created else 0.0

    def requeue(self, after_s: float) -> None:
        self.requeue_after.append(max(after_s, 0.0))

    def defer_until_idle(self) -> None:
        """Another pass, once no other claim waits: for a write nobody waits for. In a burst the workers go on to
        the claims that wait (their launches, their Ready) first; any event of this claim brings its pass sooner."""
        self.requeue_when_idle = True

    def defer_status(self) -> None:
        """This pass only tells of progress (launching, what the node still lacks, a registration that can wait):
        if other claims waited when it began, it writes no status and the claim comes back in a pass when none
        does, which finds the same state, or a newer one, and writes that. In a burst the claims that turn Ready
        meanwhile get the workers and the API server first; with no other claim waiting it is written at once.
        Only for a phase that ends the pass (WAITING): a failure or a claim turning Ready is never held back."""
        self.status_deferred = True

    def next_look(self) -> NextLook | None:
        """When to reconcile the claim again: the soonest any phase asked for, and once idle if one asked; None:
        on the next event."""
        if not (self.requeue_after or self.requeue_when_idle):
            return None
        return NextLook(min(self.requeue_after, default=None), self.requeue_when_idle)

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
    """What every phase's `reconcile(r)` returns. done: the phase has nothing left to do (its condition is
    True, or for termination the claim is released), so the next phase may run."""

    done: bool


DONE = Outcome(True)
WAITING = Outcome(False)
