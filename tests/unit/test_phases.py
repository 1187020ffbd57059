"""Each lifecycle phase on its own, with plain fakes for the cluster and ARM and a clock the test moves:
timeouts and backoffs are checked by moving time, never by sleeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import yaml

from gpu_provisioner.api.claims import MACHINE, NODECLAIM, TERMINATION_FINALIZER, Claim, ClaimApi, rfc3339
from gpu_provisioner.cloud.agentpools import PoolState
from gpu_provisioner.cloud.errors import QuotaExceededError
from gpu_provisioner.cloud.inventory import PoolInventory
from gpu_provisioner.lifecycle.base import Deps, NextLook, Reconciliation
from gpu_provisioner.lifecycle.controller import ClaimLifecycle
from gpu_provisioner.runtime.background import BackgroundCalls
from gpu_provisioner.runtime.workqueue import WorkQueue
from gpu_provisioner.sandbox import EXAMPLES
from gpu_provisioner.settings import Settings

START = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Pools:
    """ARM's agent pools as a dict; `refuse` makes every PUT fail with that error."""

    def __init__(self) -> None:
        self.pools: dict[str, PoolState] = {}
        self.puts: list[str] = []
        self.deletes: list[str] = []
        self.refuse: Exception | None = None

    def create(self, name: str, body: dict[str, Any]) -> PoolState:
        self.puts.append(name)
        if self.refuse is not None:
            raise self.refuse
        properties = body["properties"]
        self.pools[name] = PoolState(name, "Creating", properties["vmSize"], properties["tags"])
        return self.pools[name]

    def delete(self, name: str) -> None:
        self.deletes.append(name)
        self.pools.pop(name, None)

    def list(self) -> list[PoolState]:
        return list(self.pools.values())

    def cluster(self) -> Any:
        return SimpleNamespace(accepts_pool_changes=True, describe=lambda: "running")


class Kube:
    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.deleted_claims: list[str] = []
        self.claim_patches: list[dict[str, Any]] = []

    def patch_claim(self, api: ClaimApi, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.claim_patches.append(patch)
        return patch

    def patch_claim_status(self, api: ClaimApi, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.statuses.append(status)
        return status

    def delete_claim(self, api: ClaimApi, name: str) -> None:
        self.deleted_claims.append(name)


class Events:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, str]] = []

    def normal(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self.recorded.append((reason, message))

    warning = normal

    def reasons(self) -> list[str]:
        return [reason for reason, _ in self.recorded]


class Harness:
    """The lifecycle with fakes; `kube` and `nodes` replace the fakes that know no Nodes, `settings` the defaults."""

    def __init__(self, launch_timeout_s: float = 300.0, kube: Any = None, nodes: Any = None, **settings: Any) -> None:
        self.clock = Clock()
        self.pools = Pools()
        self.kube = kube or Kube()
        self.events = Events()
        self.list_clock = [0.0]
        self.inventory = PoolInventory(self.pools, 10.0, lambda before, after: None, clock=lambda: self.list_clock[0])
        self.list()
        self.settings = Settings.model_construct(launch_timeout_s=launch_timeout_s, cluster_name="kaito", **settings)
        self.claims_waiting = False  # other claims in the work queue
        self.deps = Deps(self.settings, self.kube, self.pools, self.inventory,
                         nodes or SimpleNamespace(nodes_for=lambda c: []),
                         SimpleNamespace(claim_exists=lambda c: True), self.events, clock=self.clock,
                         claims_waiting=lambda key: self.claims_waiting)
        self.lifecycle = ClaimLifecycle(self.deps)

    def list(self) -> None:
        """One LIST, begun after everything recorded so far."""
        self.list_clock[0] += 1
        self.inventory.refresh()

    def writes_off_the_worker(self) -> list[str]:
        """ARM writes on a thread of their own, as in production; returns the keys their answers woke, in order."""
        woken: list[str] = []
        self.deps.arm_writes = BackgroundCalls(1, woken.append)
        return woken

    def pool_becomes(self, claim: Claim, state: str, *error: str) -> None:
        """ARM's pool of the claim reaches `state` (with an error code and message), and a LIST sees it."""
        pool = self.pools.pools[claim.name]
        self.pools.pools[claim.name] = PoolState(claim.name, state, pool.vm_size, pool.tags, *error)
        self.list()

    def reconcile(self, claim: Claim) -> NextLook | None:
        requeue = self.lifecycle.reconcile(claim)
        if self.kube.statuses:
            claim.obj["status"] = self.kube.statuses[-1]
        return requeue


def wait_until(condition: Callable[[], bool]) -> None:
    """For a call on another thread: its end, not a time."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the call did not end"
        time.sleep(0.01)


def kaito(api: ClaimApi, **metadata: Any) -> Claim:
    obj = yaml.safe_load((EXAMPLES / f"kaito-{api.name}.yaml").read_text())
    obj["metadata"].update({"uid": "uid-1", "resourceVersion": "1", "creationTimestamp": rfc3339(START),
                            "finalizers": [TERMINATION_FINALIZER], **metadata})
    return Claim(api, obj)


def test_the_launch_timeout_fires_when_the_clock_passes_it_and_not_before():
    harness = Harness(launch_timeout_s=300)
    harness.pools.cluster = lambda: SimpleNamespace(accepts_pool_changes=False, describe=lambda: "stopped")
    claim = kaito(NODECLAIM)
    harness.clock.advance(299)
    requeue = harness.reconcile(claim)
    assert harness.kube.deleted_claims == [] and requeue is not None and requeue.after_s <= 1.0
    harness.clock.advance(2)
    harness.reconcile(claim)
    assert harness.kube.deleted_claims == [claim.name] and "LaunchTimeout" in harness.events.reasons()


def test_a_capacity_failure_is_kept_past_the_launch_timeout_and_retried_with_doubling_backoff():
    harness = Harness(launch_timeout_s=300)
    harness.pools.refuse = QuotaExceededError("Insufficient vcpu quota", "ErrCode_InsufficientVCPUQuota", 400)
    claim = kaito(MACHINE)
    assert harness.reconcile(claim) == NextLook(60)
    launched = Claim(MACHINE, claim.obj).condition(MACHINE.launched)
    assert (launched["status"], launched["reason"]) == ("False", "QuotaExceeded")
    assert launched["message"] == "all requested instance types were unavailable during launch"
    retries = [len(harness.pools.puts)]
    for wait in (60, 120, 240, 480, 900, 900):
        harness.clock.advance(wait - 1)
        harness.reconcile(claim)  # too early: no PUT
        harness.clock.advance(1)
        harness.reconcile(claim)
        retries.append(len(harness.pools.puts))
    assert retries == [1, 2, 3, 4, 5, 6, 7]
    assert harness.kube.deleted_claims == []  # 45 minutes on, past any launch timeout
    assert harness.events.reasons().count("QuotaExceeded") == 1


def test_registration_timeout_counts_from_launch():
    harness = Harness()
    claim = kaito(NODECLAIM)
    harness.reconcile(claim)  # PUT
    harness.pools.pools[claim.name] = PoolState(claim.name, "Succeeded", "Standard_NC24ads_A100_v4",
                                                harness.pools.pools[claim.name].tags)
    harness.clock.advance(100)
    harness.list()
    harness.reconcile(claim)  # launched, no node
    registered = Claim(NODECLAIM, claim.obj).condition(NODECLAIM.registered)
    assert (registered["status"], registered["reason"]) == ("Unknown", "NodeNotFound")
    harness.clock.advance(899)
    harness.reconcile(claim)
    assert harness.kube.deleted_claims == []
    harness.clock.advance(2)
    harness.reconcile(claim)
    assert harness.kube.deleted_claims == [claim.name] and "RegistrationTimeout" in harness.events.reasons()


def test_termination_releases_a_claim_only_after_a_list_that_began_after_it_and_says_what_happened():
    harness = Harness()
    claim = kaito(NODECLAIM, deletionTimestamp=rfc3339(START))
    harness.reconcile(claim)
    assert harness.kube.claim_patches == []  # an earlier LIST cannot tell whether a PUT is still landing
    harness.list()
    assert harness.reconcile(claim) is None
    assert harness.kube.claim_patches[-1]["metadata"]["finalizers"] == []
    assert ("Terminated", "AKS has no agent pool for this claim (none was created, or it was already gone)") in (
        harness.events.recorded)


def test_termination_deletes_our_pool_and_says_so():
    harness = Harness()
    claim = kaito(NODECLAIM)
    harness.reconcile(claim)  # PUT
    harness.pool_becomes(claim, "Succeeded")
    claim.obj["metadata"]["deletionTimestamp"] = rfc3339(START)
    harness.reconcile(claim)
    assert harness.pools.deletes == [claim.name]
    assert ("DeletingAgentPool", f"deleting agent pool {claim.name}") in harness.events.recorded
    harness.list()
    assert harness.reconcile(claim) is None
    assert harness.kube.claim_patches[-1]["metadata"]["finalizers"] == []
    # Released: DeletingAgentPool said what became of the pool, and no Terminated Event repeats it.
    assert "Terminated" not in harness.events.reasons()


def test_reap_deletes_the_pool_of_a_claim_deleted_despite_its_finalizer():
    harness = Harness()
    claim = kaito(MACHINE)
    harness.reconcile(claim)  # PUT
    harness.lifecycle.claim_deleted(claim)  # the watch's DELETED, termination never ran
    assert harness.lifecycle.reap(claim.key) == NextLook(10.0)  # AKS refuses a DELETE while the create runs
    harness.pool_becomes(claim, "Succeeded")
    assert harness.lifecycle.reap(claim.key) is None
    assert harness.pools.deletes == [claim.name]
    assert harness.lifecycle.reap(claim.key) is None and harness.pools.deletes == [claim.name]


def test_a_claim_deleted_while_arm_has_not_answered_its_put_is_kept_until_the_pool_the_put_made_is_deleted():
    """The PUT runs off the worker; the claim is deleted before ARM answers it, and a LIST meanwhile does not show the
    pool yet (the PUT has not landed). Termination waits for the answer rather than take that LIST's word."""
    harness = Harness()
    woken = harness.writes_off_the_worker()
    landing, create = threading.Event(), harness.pools.create
    harness.pools.create = lambda name, body: landing.wait(10) and create(name, body)
    claim = kaito(NODECLAIM)
    harness.reconcile(claim)
    assert harness.pools.puts == [] and woken == []
    deleting = kaito(NODECLAIM, deletionTimestamp=rfc3339(START))
    harness.list()
    assert harness.reconcile(deleting) is None  # the PUT's answer wakes it
    harness.list()  # begun after termination did, and still without the pool
    harness.reconcile(deleting)
    assert harness.kube.claim_patches == [] and harness.pools.deletes == []  # released now, the pool would leak

    landing.set()
    wait_until(lambda: woken == [claim.key])
    harness.reconcile(deleting)  # the pool is Creating: AKS refuses a DELETE until it ends
    harness.pool_becomes(claim, "Succeeded")
    harness.reconcile(deleting)
    wait_until(lambda: woken == [claim.key] * 2)
    harness.reconcile(deleting)  # takes the DELETE's answer
    assert harness.pools.deletes == [claim.name]
    assert ("DeletingAgentPool", f"deleting agent pool {claim.name}") in harness.events.recorded
    harness.list()
    assert harness.reconcile(deleting) is None
    assert harness.kube.claim_patches[-1]["metadata"]["finalizers"] == []


def test_a_put_answered_off_the_worker_is_read_by_the_claims_next_pass():
    harness = Harness()
    woken = harness.writes_off_the_worker()
    harness.pools.refuse = QuotaExceededError("Insufficient vcpu quota", "ErrCode_InsufficientVCPUQuota", 400)
    claim = kaito(NODECLAIM)
    harness.reconcile(claim)
    wait_until(lambda: woken == [claim.key])
    assert harness.reconcile(claim) == NextLook(60)
    launched = Claim(NODECLAIM, claim.obj).condition(NODECLAIM.launched)
    assert (launched["status"], launched["reason"]) == ("False", "QuotaExceeded")
    assert harness.inventory.get(claim.name) is None  # the name taken for the PUT is free again


def test_a_pass_that_reads_the_puts_answer_and_finds_the_pool_up_holds_back_no_status_while_others_wait():
    """The answer's own pass can come after the node did (a claim turning Ready is taken first): that pass goes on to
    the later phases, and the claim's Ready must be written at once, not left for when no other claim waits."""
    harness = Harness()
    woken = harness.writes_off_the_worker()
    claim = kaito(NODECLAIM)
    harness.reconcile(claim)
    wait_until(lambda: woken == [claim.key])
    harness.pool_becomes(claim, "Succeeded")
    r = Reconciliation(claim, harness.clock(), claims_waiting=True)
    assert harness.lifecycle.launch.reconcile(r).done
    assert r.status.is_true(NODECLAIM.launched) and not r.status_deferred
    assert "LaunchingAgentPool" in harness.events.reasons()


def test_the_delete_of_a_failed_pool_runs_off_the_worker_and_its_answer_moves_the_launch_on():
    harness = Harness()
    woken = harness.writes_off_the_worker()
    claim = kaito(NODECLAIM)
    harness.reconcile(claim)
    wait_until(lambda: woken == [claim.key])
    harness.reconcile(claim)  # the PUT's answer
    harness.pool_becomes(claim, "Failed", "AllocationFailed", "Allocation failed: no capacity for the size")
    answering, delete = threading.Event(), harness.pools.delete
    harness.pools.delete = lambda name: answering.wait(10) and delete(name)
    harness.reconcile(claim)  # sends the DELETE
    harness.reconcile(claim)  # still on its way: no second DELETE, nothing said yet
    assert harness.pools.deletes == [] and "AllocationFailed" not in harness.events.reasons()
    answering.set()
    wait_until(lambda: woken == [claim.key] * 2)
    harness.reconcile(claim)
    assert harness.pools.deletes == [claim.name]
    assert harness.inventory.get(claim.name).provisioning_state == "Deleting"
    launched = Claim(NODECLAIM, claim.obj).condition(NODECLAIM.launched)
    assert (launched["status"], launched["reason"]) == ("False", "AllocationFailed")  # its only size


def test_reap_leaves_a_pool_made_for_another_claim_of_that_name_alone():
    harness = Harness()
    claim = kaito(MACHINE)
    harness.reconcile(claim)
    harness.pool_becomes(claim, "Succeeded")
    older = kaito(MACHINE, uid="uid-0")  # an earlier claim of the same name
    harness.lifecycle.claim_deleted(older)
    assert harness.lifecycle.reap(claim.key) is None and harness.pools.deletes == []


def test_transition_times_are_the_reconciliation_time_not_the_wall_clock():
    later = START + timedelta(hours=1)
    r = Reconciliation(kaito(NODECLAIM), later)
    r.status.set("Launched", "Unknown", "Launching", "creating")
    assert r.status.get("Launched")["lastTransitionTime"] == rfc3339(later)
    assert r.claim_age_s == 3600


def test_while_other_claims_wait_the_pass_that_creates_a_pool_leaves_its_status_to_a_pass_that_creates_nothing():
    harness = Harness()
    harness.claims_waiting = True
    claim = kaito(NODECLAIM)
    # The worker goes on to the next claim's PUT; this claim is queued again for when no other claim waits.
    assert harness.reconcile(claim).when_idle
    assert harness.pools.puts == [claim.name] and harness.kube.statuses == []
    harness.claims_waiting = False
    harness.reconcile(claim)
    assert harness.pools.puts == [claim.name]
    [status] = harness.kube.statuses
    launched = next(c for c in status["conditions"] if c["type"] == "Launched")
    assert (launched["status"], launched["reason"]) == ("Unknown", "Launching")
    assert launched["message"] == f"creating agent pool {claim.name} (Standard_NC24ads_A100_v4)"


def test_with_no_other_claim_waiting_the_pass_that_creates_a_pool_writes_its_status_too():
    harness = Harness()
    claim = kaito(NODECLAIM)
    look = harness.reconcile(claim)
    assert look is not None and not look.when_idle
    [status] = harness.kube.statuses
    assert harness.pools.puts == [claim.name]
    assert next(c for c in status["conditions"] if c["type"] == "Launched")["reason"] == "Launching"


def test_claims_left_for_when_the_queue_is_idle_do_not_hold_back_each_others_status():
    harness = Harness()
    queue = WorkQueue("t")
    harness.deps.claims_waiting = queue.others_wait
    claim = kaito(NODECLAIM)
    queue.add("nodeclaims/another", when_idle=True)  # its status held too: it waits for when idle, as this one
    look = harness.reconcile(claim)
    assert look is not None and not look.when_idle and len(harness.kube.statuses) == 1


class NodeKube(Kube):
    """Kube with one Node, as the Node cache shows it: a write's answer at once, a deletion only once watched."""

    def __init__(self, node_name: str) -> None:
        super().__init__()
        self.node: dict[str, Any] = {"metadata": {"name": node_name, "uid": "node-uid", "finalizers": [
            TERMINATION_FINALIZER]}, "spec": {}}
        self.pod_lists = 0
        self.node_deletes = 0

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        metadata, spec = self.node["metadata"], self.node["spec"]
        if "$deleteFromPrimitiveList/finalizers" in patch.get("metadata", {}):
            metadata["finalizers"] = []
        spec.update(patch.get("spec") or {})
        return self.node

    def pods_on_node(self, name: str) -> list[dict[str, Any]]:
        self.pod_lists += 1
        return []

    def delete_node(self, name: str) -> bool:
        self.node_deletes += 1
        return self.node_deletes == 1  # the API server has it no more after the first


def test_a_node_termination_deleted_is_not_drained_or_deleted_again_while_the_cache_still_shows_it():
    kube = NodeKube("aks-ws-vmss000000")
    harness = Harness(kube=kube, nodes=SimpleNamespace(nodes_for=lambda c: [kube.node]))
    claim = kaito(NODECLAIM)
    harness.reconcile(claim)  # PUT
    harness.pool_becomes(claim, "Succeeded")
    claim.obj["metadata"]["deletionTimestamp"] = rfc3339(START)
    harness.reconcile(claim)  # drained, the pool's DELETE sent, the Node deleted
    assert (kube.pod_lists, kube.node_deletes, harness.pools.deletes) == (1, 1, [claim.name])
    harness.reconcile(claim)  # woken again before the Node's deletion is watched: the pool is not gone yet
    assert (kube.pod_lists, kube.node_deletes) == (1, 1)
    harness.list()  # the pool is gone
    assert harness.reconcile(claim) is None  # released
    assert harness.kube.claim_patches[-1]["metadata"]["finalizers"] == []
