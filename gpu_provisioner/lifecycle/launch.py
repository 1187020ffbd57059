"""Launch: one agent pool of one VM for the claim, trying the next listed size when one cannot be had.

Owns the Launched condition (MachineLaunched for Machine). The PUT goes out from an ARM writer, and the
claim's next pass reads ARM's answer; the operation is left running, the pool's state comes back through the
inventory's shared LIST, and the Node watch may say earlier that the node joined.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
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
from gpu_provisioner.runtime.background import Call

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
        writes = self.deps.arm_writes
        if (write := writes.get(claim.key)) is not None and isinstance(write.context, _Put | _FailedPool):
            if not write.ended:
                # Its answer queues the claim again.
                if isinstance(write.context, _Put):
                    self._say_launching(r, write.context)
                return WAITING
            writes.take(claim.key)
            if isinstance(write.context, _FailedPool):
                return self._failed_pool_deleted(r, write)
            if (refused := self._put_answered(r, write)) is not None:
                return refused
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
        if pool is not None and not pool.managed and not pool.made_by_go_provisioner_for(claim):
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
            r.defer_status()
        r.requeue(self.deps.inventory.interval_s * 3)
        return WAITING

    # steps ------------------------------------------------------------------------------------

    def _create(self, r: Reconciliation, request: PoolRequest) -> Outcome:
        claim = r.claim
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
        refusal = catalogue.reserve(size, claim.key)
        if refusal is not None:
            log.info("pre-flight refused a size; no request sent", claim=claim.key, vm_size=size.name,
                     reason=refusal.reason, detail=refusal.message)
            return self._size_unavailable(r, request, size, refusal)
        put = _Put(request, size, PoolState(request.name, "Creating", size.name, request.tags))
        try:
            cluster = inventory.cluster()
            if not cluster.accepts_pool_changes:
                raise ClusterUnavailableError(f"cluster {self.deps.settings.cluster_name}: {cluster.describe()}")
        except CloudError as error:
            catalogue.release(claim.key)
            return self._put_failed(r, put, error)
        if not self.deps.claims.claim_exists(claim):
            # Deleted while this reconcile ran (its DELETED event came in meanwhile): no pool for it.
            catalogue.release(claim.key)
            return WAITING
        if (holder := inventory.reserve(put.reservation)) is not None:
            catalogue.release(claim.key)
            self._fail(r, "AgentPoolNameTaken", f"agent pool {claim.name} belongs to claim {holder.claim_key}")
            return WAITING
        self.deps.arm_writes.start(claim.key, lambda: self._put(claim, put), put)
        if answered := self.deps.arm_writes.take(claim.key):  # ARM_WRITERS=0: answered on this worker
            if (refused := self._put_answered(r, answered)) is not None:
                return refused
            self._say_launching(r, put, answered=True)
            r.requeue(inventory.interval_s * 3)
            return WAITING
        self._say_launching(r, put)
        return WAITING

    @staticmethod
    def _say_launching(r: Reconciliation, put: _Put, answered: bool = False) -> None:
        """The PUT is on its way (`answered`: ARM accepted it): what Kaito reads as a claim on its way, written when
        no other claim waits. A failure said before stands until ARM accepts the retry, so that each retry does not
        turn the condition Unknown and back (and say the failure again in an Event)."""
        condition = r.claim.api.launched
        if not answered and (r.status.get(condition) or {}).get("status") == "False":
            return
        r.status.wait(condition, "Launching", _launching(put.request.name, put.size.name, "Creating"))
        r.defer_status()

    def _put(self, claim: Claim, put: _Put) -> PoolState:
        """Runs off the workers: the PUT, and what its answer says of the pool recorded at once. A refused PUT is
        counted here; an accepted one once its pool is up or has failed."""
        inventory = self.deps.inventory
        try:
            state = self.deps.pools.create(put.request.name, put.request.body(put.size))
        except CloudError as error:
            metrics.LAUNCHES.labels(kind=claim.api.kind, result=error.reason).inc()
            if not _may_have_landed(error):
                inventory.release(put.reservation)
                self.deps.catalogue.release(claim.key)
            # Otherwise the reservation (and the size's vCPUs counted in flight) stand for it, so that no other PUT
            # goes out before a LIST tells.
            raise
        inventory.record(state)
        return state

    def _put_answered(self, r: Reconciliation, answered: Call) -> Outcome | None:
        """ARM's answer to the PUT: what the claim waits for if it was not accepted, None if it was (the pool's
        state is in the inventory by then, and the pass goes on: the claim may turn Ready in it, if its node came
        while its answer waited to be read)."""
        put: _Put = answered.context
        try:
            answered.future.result()
        except CloudError as error:
            return self._put_failed(r, put, error)
        claim, name = r.claim, put.request.name
        self.deps.events.normal(claim.obj, "LaunchingAgentPool", f"creating agent pool {name} with {put.size.name}")
        log.info("agent pool create started", claim=claim.key, pool=name, vm_size=put.size.name)
        return None

    def _put_failed(self, r: Reconciliation, put: _Put, error: CloudError) -> Outcome:
        """The PUT could not go out or ARM did not accept it."""
        if isinstance(error, TransientError):
            message = f"creating agent pool {put.request.name}: {error.describe()}"
            r.report(self.deps.events, r.claim.api.launched, error.reason, message)
            raise error
        # AKS refused it: nothing was created.
        return self._refused(r, put.request, put.size, error)

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
        """The create LRO ended Failed: delete the pool (off the worker); its answer's pass goes on."""
        failed = _FailedPool(request, pool)
        self.deps.arm_writes.start(r.claim.key, lambda: self.deps.inventory.delete(pool), failed)
        if answered := self.deps.arm_writes.take(r.claim.key):  # ARM_WRITERS=0: answered on this worker
            return self._failed_pool_deleted(r, answered)
        return WAITING

    def _failed_pool_deleted(self, r: Reconciliation, answered: Call) -> Outcome:
        """The failed pool is on its way out: remember why it failed, and try again (or the next size). A DELETE that
        failed raises here: the pool is still Failed, and the retry deletes it again."""
        request, pool = answered.context.request, answered.context.pool
        answered.future.result()
        error = classify_code(pool.error_code, pool.error_message or f"agent pool {pool.name} provisioning failed")
        size = self.deps.catalogue.size(pool.vm_size)
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


@dataclass(frozen=True)
class _Put:
    """A pool PUT sent off the workers: what its answer is read with."""

    request: PoolRequest
    size: VmSize
    reservation: PoolState  # the pool name taken in the inventory for it


@dataclass(frozen=True)
class _FailedPool:
    """The DELETE of a pool whose create failed, sent off the workers."""

    request: PoolRequest
    pool: PoolState


def _may_have_landed(error: CloudError) -> bool:
    """Whether ARM may have carried out a PUT that failed so: a 5xx or a lost answer, but not a throttled one."""
    return isinstance(error, TransientError) and not isinstance(error, ThrottledError)


def _size_labels(vm_size: str) -> dict[str, str]:
    return {INSTANCE_TYPE_LABEL: vm_size, CAPACITY_TYPE_LABEL: ON_DEMAND}


def _missing(claim: Claim, labels: dict[str, str]) -> dict[str, str]:
    """Those of `labels` the claim does not carry with the same value."""
    return {key: value for key, value in labels.items() if claim.labels.get(key) != value}
