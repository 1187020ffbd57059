"""Launch: one agent pool of one VM for the claim, trying the next listed size when one cannot be had.

Owns the Launched condition (MachineLaunched for Machine). The PUT is started and left running; the
pool's state comes back through the inventory's shared LIST, and the Node watch may say earlier that
the node joined.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import structlog

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import CAPACITY_TYPE_LABEL, INSTANCE_TYPE_LABEL, ON_DEMAND, Claim, rfc3339
from gpu_provisioner.cloud.agentpools import IN_PROGRESS, PoolState
from gpu_provisioner.cloud.errors import (
    INSUFFICIENT_CAPACITY_PHRASE,
    AccessDeniedError,
    AllocationFailedError,
    CapacityError,
    CloudError,
    ClusterUnavailableError,
    InvalidRequestError,
    QuotaExceededError,
    RequestFailedError,
    SkuUnavailableError,
    ThrottledError,
    TransientError,
    classify_code,
)
from gpu_provisioner.cloud.pool_request import InvalidClaim, PoolRequest, build_pool_request
from gpu_provisioner.cloud.skus import VmSize
from gpu_provisioner.lifecycle.base import DONE, WAITING, Deps, Outcome, Reconciliation

log = structlog.get_logger(__name__)

# Provisioning states of a pool on its way up (AKS reports more than Creating while it works).
# After every size failed for capacity, try the whole list again this much later, doubling each time up to
# the maximum: quota or capacity may come back, and waiting costs nothing while asking costs ARM writes.
CAPACITY_RETRY_S = 60.0
CAPACITY_RETRY_MAX_S = 900.0
CLUSTER_RETRY_S = 30.0
# A refusal that is not the claim's fault (a missing role, a full subnet) is tried again this much later.
REFUSED_RETRY_S = 60.0
# Launched reasons that mean "fix the claim", never "wait longer": the claim itself is refused.
CLAIM_REFUSALS = frozenset({
    "InvalidPoolName", "InstanceTypeMissing", "UnknownInstanceType", "InvalidStorageRequest",
    "UnsupportedNodeImageFamily", "InvalidTaint", "RestrictedLabel", "InvalidAgentPoolRequest", "AgentPoolNameTaken",
})
# Launched reasons that mean no size could be had: the claim is kept and retried, never timed out (Kaito
# would make the same claim again at once, and it would fail the same way).
CAPACITY_FAILURES = frozenset(
    error.reason for error in (CapacityError, QuotaExceededError, SkuUnavailableError, AllocationFailedError)
)
# Every Launched reason that means the launch failed (rather than is on its way): the claim's fault, no
# capacity, or a refusal that needs a person.
LAUNCH_FAILURES = CLAIM_REFUSALS | CAPACITY_FAILURES | {AccessDeniedError.reason, RequestFailedError.reason}


def _launching(pool: str, vm_size: str, provisioning_state: str) -> str:
    """The Launched message while the pool is on its way up: the same after the PUT and when a LIST shows the pool
    Creating, so that the LIST costs no status write."""
    if provisioning_state == "Creating":
        return f"creating agent pool {pool} ({vm_size})"
    return f"agent pool {pool} ({vm_size}) is {provisioning_state.lower()}"


class Launch:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._lock = threading.Lock()
        # claim uid -> sizes that failed for capacity in this launch attempt
        self._unavailable: dict[str, dict[str, CloudError]] = {}
        # claim uid -> generation ARM refused: no retry until the claim changes
        self._rejected: dict[str, int] = {}
        # claim uid -> (time before which no size is tried again, how often all were unavailable)
        self._capacity_backoff: dict[str, tuple[datetime, int]] = {}
        # claim uid -> when a claim refused earlier became launchable (its launch timeout starts there)
        self._refusal_ended: dict[str, datetime] = {}

    def forget(self, uid: str) -> None:
        with self._lock:
            for memory in (self._unavailable, self._rejected, self._capacity_backoff, self._refusal_ended):
                memory.pop(uid, None)

    def attempt_started(self, r: Reconciliation) -> datetime:
        """When the current launch attempt began: the claim's creation, or the moment a refused claim was fixed."""
        with self._lock:
            return self._refusal_ended.get(r.claim.uid) or r.claim.created or r.now

    def labels_before_launch(self, claim: Claim, now: datetime) -> dict[str, str]:
        """The size labels a claim for exactly one valid size can carry before its launch (Karpenter's NodeClaims
        carry the labels of single-valued requirements from creation), so that they go out with the finalizer
        and the launch has no labels left to write; {} if the size is not settled or nothing is missing."""
        try:
            request = build_pool_request(claim, created_at=rfc3339(claim.created or now),
                                         size_of=self.deps.catalogue.size)
        except InvalidClaim:
            return {}
        if len(request.vm_sizes) != 1:
            return {}
        return _missing(claim, _size_labels(request.vm_sizes[0].name))

    def reconcile(self, r: Reconciliation) -> Outcome:
        claim, condition = r.claim, r.claim.api.launched
        if r.status.is_true(condition):
            return DONE
        try:
            request = build_pool_request(claim, created_at=rfc3339(claim.created or r.now),
                                         size_of=self.deps.catalogue.size)
        except InvalidClaim as invalid:
            self._fail(r, invalid.reason, invalid.message)
            return WAITING
        if self._rejected.get(claim.uid) == claim.generation:
            return WAITING
        previous = claim.condition(condition) or {}
        if previous.get("status") == "False" and previous.get("reason") in CLAIM_REFUSALS:
            with self._lock:
                self._refusal_ended[claim.uid] = r.now
        inventory = self.deps.inventory
        if not inventory.synced:
            # After a restart a PUT may be in flight: only a LIST can tell, so no write before one.
            error = inventory.list_error
            if error is None:
                inventory.request_refresh()
                r.requeue(1.0)
            else:
                message = f"cannot list the cluster's agent pools: {error.describe()}"
                r.report(self.deps.events, condition, error.reason, message)
                r.requeue(inventory.interval_s)
            return WAITING
        pool = inventory.get(claim.name)
        if pool is not None and not pool.managed:
            self._fail(r, "AgentPoolNameTaken", f"agent pool {claim.name} exists and was not made by gpu-provisioner; "
                       "it is left alone: rename the workspace or delete that pool")
            return WAITING
        if pool is not None and pool.claim_key and pool.claim_key != claim.key:
            self._fail(r, "AgentPoolNameTaken", f"agent pool {claim.name} belongs to claim {pool.claim_key}")
            return WAITING
        if pool is None:
            return self._create(r, request)
        if pool.provisioning_state == "Succeeded" or (
            pool.provisioning_state in IN_PROGRESS and self.deps.nodes.nodes_for(claim)
        ):
            return self._launched(r, pool)
        if pool.provisioning_state == "Failed":
            return self._failed_pool(r, request, pool)
        # Creating, or Deleting after a failed size (whose condition already says why): the next LIST
        # or the Node watch wakes us.
        if pool.provisioning_state != "Deleting":
            r.status.wait(condition, "Launching", _launching(pool.name, pool.vm_size, pool.provisioning_state))
        r.requeue(self.deps.inventory.interval_s * 3)
        return WAITING

    # steps ------------------------------------------------------------------------------------

    def _create(self, r: Reconciliation, request: PoolRequest) -> Outcome:
        claim, condition = r.claim, r.claim.api.launched
        retry_at = self._capacity_backoff.get(claim.uid, (r.now, 0))[0]
        wait = (retry_at - r.now).total_seconds()
        if wait > 0:
            # Every size just failed for capacity: asking again at once would only burn ARM writes.
            r.requeue(wait)
            return WAITING
        size = self._next_size(claim.uid, request)
        if size is None:
            return self._all_unavailable(r)
        inventory, catalogue = self.deps.inventory, self.deps.catalogue
        # The pre-flight: a restricted size or a used-up quota costs no PUT, and the next size is tried.
        refusal = catalogue.reserve(size)
        if refusal is not None:
            log.info("pre-flight refused a size; no request sent", claim=claim.key, vm_size=size.name,
                     reason=refusal.reason, detail=refusal.message)
            return self._size_unavailable(r, request, size, refusal)
        # The size's vCPUs stay counted in flight once a PUT may have landed; otherwise they are released.
        put_may_have_landed = False
        reservation = PoolState(request.name, "Creating", size.name, request.tags)
        try:
            cluster = inventory.cluster()
            if not cluster.accepts_pool_changes:
                raise ClusterUnavailableError(f"cluster {self.deps.settings.cluster_name}: {cluster.describe()}")
            if not self.deps.claims.claim_exists(claim):
                # Deleted while this reconcile ran (its DELETED event came in meanwhile): no pool for it.
                return WAITING
            holder = inventory.reserve(reservation)
            if holder is not None:
                self._fail(r, "AgentPoolNameTaken", f"agent pool {claim.name} belongs to claim {holder.claim_key}")
                return WAITING
            state = self._put(claim, request, size)
        except TransientError as error:
            if isinstance(error, ThrottledError):
                inventory.release(reservation)
            else:
                # A 5xx, a lost answer: the PUT may have landed. The reservation stands for it, so no other
                # PUT goes out before a LIST tells.
                put_may_have_landed = True
            message = f"creating agent pool {request.name}: {error.describe()}"
            r.report(self.deps.events, condition, error.reason, message)
            raise
        except CloudError as error:
            # AKS refused it: nothing was created.
            inventory.release(reservation)
            return self._refused(r, request, size, error)
        else:
            put_may_have_landed = True
        finally:
            if not put_may_have_landed:
                catalogue.release(size)
        self.deps.inventory.record(state)
        r.status.wait(condition, "Launching", _launching(request.name, size.name, "Creating"))
        # Kaito reads a claim without conditions as one on its way; the next claim's PUT should not wait for this.
        r.defer_status()
        self.deps.events.normal(claim.obj, "LaunchingAgentPool", f"creating agent pool {request.name} with {size.name}")
        log.info("agent pool create started", claim=claim.key, pool=request.name, vm_size=size.name)
        r.requeue(self.deps.inventory.interval_s * 3)
        return WAITING

    def _put(self, claim: Claim, request: PoolRequest, size: VmSize) -> PoolState:
        """One launch attempt. A refused PUT is counted here; an accepted one once its pool is up or has failed."""
        try:
            return self.deps.pools.create(request.name, request.body(size))
        except CloudError as error:
            metrics.LAUNCHES.labels(kind=claim.api.kind, result=error.reason).inc()
            raise

    def _refused(self, r: Reconciliation, request: PoolRequest, size: VmSize, error: CloudError) -> Outcome:
        claim, condition = r.claim, r.claim.api.launched
        if isinstance(error, CapacityError):
            return self._size_unavailable(r, request, size, error)
        if isinstance(error, ClusterUnavailableError):
            r.report(self.deps.events, condition, error.reason,
                     f"waiting before creating agent pool: {error.describe()}")
            r.requeue(CLUSTER_RETRY_S)
            return WAITING
        self._fail(r, error.reason, f"AKS refused agent pool {request.name} ({size.name}): {error.describe()}")
        if isinstance(error, InvalidRequestError):
            self._rejected[claim.uid] = claim.generation
        else:
            # A missing role, a full subnet: not the claim's fault, and it may pass.
            r.requeue(REFUSED_RETRY_S)
        return WAITING

    def _launched(self, r: Reconciliation, pool: PoolState) -> Outcome:
        claim = r.claim
        size = self.deps.catalogue.size(pool.vm_size)
        with self._lock:
            self._unavailable.pop(claim.uid, None)
            self._capacity_backoff.pop(claim.uid, None)
        if size is not None:
            capacity = size.capacity()
            r.status.status.setdefault("capacity", capacity)
            r.status.status.setdefault("allocatable", capacity)
        # The Type and Capacity printer columns and Karpenter's consumers read these labels, as Karpenter writes
        # them at launch (here usually already with the finalizer).
        if labels := _missing(claim, _size_labels(pool.vm_size)):
            self.deps.kube.patch_claim(claim.api, claim.name, {"metadata": {"labels": labels}})
        r.status.set(claim.api.launched, "True", "Launched", f"agent pool {pool.name} ({pool.vm_size}) created")
        metrics.LAUNCHES.labels(kind=claim.api.kind, result="Launched").inc()
        return DONE

    def _failed_pool(self, r: Reconciliation, request: PoolRequest, pool: PoolState) -> Outcome:
        """The create LRO ended Failed: remember why, delete the pool, and try again (or the next size)."""
        error = classify_code(pool.error_code, pool.error_message or f"agent pool {pool.name} provisioning failed")
        size = self.deps.catalogue.size(pool.vm_size)
        self.deps.inventory.delete(pool)
        # Counted once the failed pool is on its way out, so that a retry after a failed DELETE does not count again.
        metrics.LAUNCHES.labels(kind=r.claim.api.kind, result=error.reason).inc()
        if isinstance(error, CapacityError) and size is not None:
            return self._size_unavailable(r, request, size, error)
        r.status.wait(r.claim.api.launched, "LaunchFailed",
                      f"agent pool {pool.name} ({pool.vm_size}) failed: {error.describe()}; retrying")
        self.deps.events.warning(r.claim.obj, "LaunchFailed", f"agent pool {pool.name} failed: {error.describe()}")
        r.requeue(CAPACITY_RETRY_S)
        return WAITING

    def _size_unavailable(self, r: Reconciliation, request: PoolRequest, size: VmSize, error: CloudError) -> Outcome:
        with self._lock:
            self._unavailable.setdefault(r.claim.uid, {})[size.name] = error
        next_size = self._next_size(r.claim.uid, request)
        if next_size is None:
            # Said once for all sizes, and once per change rather than per retry.
            return self._all_unavailable(r)
        previous = r.status.get(r.claim.api.launched) or {}
        if not (previous.get("status") == "False" and previous.get("reason") in CAPACITY_FAILURES):
            # Not a Warning: the claim may still launch; if no size can be had, one Warning says so for all.
            # A retry after every size failed says nothing until its outcome differs.
            message = f"{size.name} unavailable ({error.reason}: {error.describe()}); trying {next_size.name}"
            self.deps.events.normal(r.claim.obj, "TryingNextInstanceType", message)
            r.status.wait(r.claim.api.launched, "Launching", f"{size.name} unavailable ({error.reason}), "
                          f"trying {next_size.name}")
        r.requeue(0)
        return WAITING

    def _all_unavailable(self, r: Reconciliation) -> Outcome:
        with self._lock:
            causes = self._unavailable.pop(r.claim.uid, {})
            failures = self._capacity_backoff.get(r.claim.uid, (r.now, 0))[1] + 1
            retry_s = min(CAPACITY_RETRY_S * 2 ** (failures - 1), CAPACITY_RETRY_MAX_S)
            self._capacity_backoff[r.claim.uid] = (r.now + timedelta(seconds=retry_s), failures)
        detail = "; ".join(f"{name}: {cause.describe()}" for name, cause in causes.items())
        reasons = {cause.reason for cause in causes.values()}
        reason = reasons.pop() if len(reasons) == 1 else "InsufficientCapacity"
        detailed = f"{INSUFFICIENT_CAPACITY_PHRASE} ({detail}); trying again in {retry_s:.0f}s"
        # Kaito v0.3 fails fast only on the bare phrase: there the detail is in the Event.
        message = INSUFFICIENT_CAPACITY_PHRASE if r.claim.api.exact_capacity_message else detailed
        self._fail(r, reason, message, event_message=detailed)
        r.requeue(retry_s)
        return WAITING

    def _next_size(self, uid: str, request: PoolRequest) -> VmSize | None:
        with self._lock:
            failed = self._unavailable.get(uid, {})
        return next((size for size in request.vm_sizes if size.name not in failed), None)

    def _fail(self, r: Reconciliation, reason: str, message: str, event_message: str = "") -> None:
        r.report(self.deps.events, r.claim.api.launched, reason, message, failed=True, event_message=event_message)


def _size_labels(vm_size: str) -> dict[str, str]:
    return {INSTANCE_TYPE_LABEL: vm_size, CAPACITY_TYPE_LABEL: ON_DEMAND}


def _missing(claim: Claim, labels: dict[str, str]) -> dict[str, str]:
    """Those of `labels` the claim does not carry with the same value."""
    return {key: value for key, value in labels.items() if claim.labels.get(key) != value}
