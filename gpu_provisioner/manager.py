"""Wires the controller: informers feed a work queue, a bounded pool of workers drives claims.

Events only enqueue keys; all work happens in workers, one key at a time, except ARM's pool writes: those go
out from ARM writers (runtime/background.py), and each answer queues its claim again. Pool state comes from the
inventory's periodic LIST, Node state from the Node watch; both wake exactly the claims concerned.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import kubernetes
import structlog
import urllib3
from azure.core.credentials import TokenCredential

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import CLAIM_APIS, GROUP, READY, Claim, ClaimApi, claim_key, split_key
from gpu_provisioner.cloud.agentpools import AgentPools, PoolState, default_credential
from gpu_provisioner.cloud.catalogue import SizeCatalogue
from gpu_provisioner.cloud.compute import ComputeReads
from gpu_provisioner.cloud.errors import CloudError, TransientError
from gpu_provisioner.cloud.inventory import PoolInventory
from gpu_provisioner.lifecycle.base import Deps
from gpu_provisioner.lifecycle.controller import ClaimLifecycle
from gpu_provisioner.lifecycle.initialization import completes_initialization
from gpu_provisioner.lifecycle.launch import LAUNCH_FAILURES
from gpu_provisioner.lifecycle.nodes import NodeCache, pool_of_node
from gpu_provisioner.lifecycle.orphans import OrphanSweep
from gpu_provisioner.runtime.background import BackgroundCalls
from gpu_provisioner.runtime.events import EventRecorder
from gpu_provisioner.runtime.informer import Informer, Resource, without_managed_fields
from gpu_provisioner.runtime.kube import Kube
from gpu_provisioner.runtime.outage import Outage
from gpu_provisioner.runtime.workqueue import WorkQueue
from gpu_provisioner.settings import Settings

log = structlog.get_logger(__name__)
SYNC_POLL_S = 0.1
CLAIM_METRICS_INTERVAL_S = 5.0
STOP_S = 10.0  # the most a shutdown waits for work in hand
# Writes that only tell of progress wait until no claim has come for this long (or at most IDLE_WAIT_MAX_S): in a
# burst they would slow, in the API server, the writes that turn claims Ready; the pass that turns a claim Ready
# writes its progress too.
PROGRESS_QUIET_S = 0.5
IDLE_WAIT_MAX_S = 10.0
CLAIM_PHASES = ("Pending", "Launched", "Registered", "Initialized", "Ready", "Failed", "Terminating")


def claim_phase(claim: Claim) -> str:
    """The furthest phase a claim reached, for the claims-by-phase gauge."""
    if claim.deleting:
        return "Terminating"
    if claim.is_true(READY):
        return "Ready"
    launched = claim.condition(claim.api.launched) or {}
    if launched.get("status") == "False" and launched.get("reason") in LAUNCH_FAILURES:
        return "Failed"
    reached = [p for p in claim.api.phases if claim.is_true(p)]
    return reached[-1].removeprefix("Machine") if reached else "Pending"


class ClaimIndex:
    """Answers from the claim informers whether a claim object still exists."""

    def __init__(self, informers: dict[str, Informer]) -> None:
        self._informers = informers

    def claim_exists(self, claim: Claim) -> bool:
        current = self._informers[claim.api.name].get(claim.name)
        return current is not None and current["metadata"].get("uid") == claim.uid


class Manager:
    def __init__(
        self, settings: Settings, api_client: kubernetes.client.ApiClient, credential: TokenCredential | None = None
    ) -> None:
        self.settings = settings
        self.queue = WorkQueue("claims", quiet_s=PROGRESS_QUIET_S, idle_wait_max_s=IDLE_WAIT_MAX_S)
        self.claim_informers: dict[str, Informer] = {
            name: Informer(api_client, Resource(GROUP, api.version, api.plural, api.kind), self._on_claim_event,
                           transform=without_managed_fields)
            for name, api in CLAIM_APIS.items() if name in settings.claim_apis
        }
        self.nodes = NodeCache(api_client, self._on_node_event)
        credential = credential or default_credential(settings)
        self.pools = AgentPools(settings, credential)
        self.catalogue = SizeCatalogue(ComputeReads(self.pools) if settings.preflight else None, settings.location,
                                       settings.sku_catalogue_refresh_s, settings.quota_refresh_interval_s)
        self.inventory = PoolInventory(self.pools, settings.pool_refresh_interval_s, self._on_pool_change)
        api_server_outage = Outage("API server")
        kube = Kube(api_client, lambda api: self.claim_informers[api.name], api_server_outage,
                    node_observer=self.nodes.ours)
        self.events = EventRecorder(api_client, api_server_outage)
        arm_writes = BackgroundCalls(settings.arm_writers, self.queue.add, name="arm-writer")
        metrics.ARM_WRITES_PENDING.set_function(arm_writes.pending)
        deps = Deps(settings, kube, self.pools, self.inventory, self.nodes, ClaimIndex(self.claim_informers),
                    self.events, catalogue=self.catalogue, claims_waiting=self.queue.others_wait, arm_writes=arm_writes)
        self.lifecycle = ClaimLifecycle(deps)
        self.orphans = OrphanSweep(deps, self._claim_exists)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = False

    # start / stop -----------------------------------------------------------------------------

    def start(self) -> None:
        self.started = True
        for informer in [*self.claim_informers.values(), *self.nodes.informers]:
            informer.start()
        self._spawn("pool-inventory", self.inventory.run, self._stop)
        self._spawn("catalogue-warm-up", self.catalogue.warm_up)
        self._spawn("orphan-sweep", self._sweep_loop)
        self._spawn("claim-metrics", self._publish_claim_phases)
        for index in range(self.settings.workers):
            self._spawn(f"worker-{index}", self._work)
        for index in range(self.settings.ready_workers):
            self._spawn(f"ready-worker-{index}", lambda: self._work(first_only=True))
        log.info("controller started", claim_apis=list(self.claim_informers), cluster=self.settings.cluster_name,
                 workers=self.settings.workers, ready_workers=self.settings.ready_workers,
                 arm_writers=self.settings.arm_writers)

    def stop(self) -> None:
        """Stop and wait for the work in hand, all of it within STOP_S: a request to an API server or ARM that
        no longer answers must not keep the process (and its pod) from ending; what is left runs in daemon
        threads, which end with it."""
        if self._stop.is_set():
            return
        deadline = time.monotonic() + STOP_S
        remaining = lambda: max(deadline - time.monotonic(), 0.0)  # noqa: E731
        self._stop.set()
        self.queue.shutdown()
        self.inventory.request_refresh()
        for informer in [*self.claim_informers.values(), *self.nodes.informers]:
            informer.stop(wait_s=remaining())
        for thread in self._threads:
            thread.join(timeout=remaining())
        # Last, for the Events the stopped work recorded (a DeletingAgentPool one says a pool is going).
        self.events.flush(remaining())
        self.pools.close()

    def synced(self) -> bool:
        return self._caches_synced() and self.inventory.synced

    def not_ready_reason(self) -> str | None:
        """What keeps this replica from doing its job, for /readyz (None: nothing). A standby that has not
        started is ready: to take over."""
        if not self.started:
            return None
        if not self._caches_synced():
            return "caches not synced"
        if not self.inventory.synced:
            error = self.inventory.list_error
            return f"agent pool list failing: {error.describe()}" if error else "waiting for the first agent pool list"
        return None

    def _caches_synced(self) -> bool:
        informers = [i for i in self.claim_informers.values() if i.available]
        return all(i.has_synced for i in [*informers, *self.nodes.informers])

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # event routing ----------------------------------------------------------------------------

    def _on_claim_event(self, event_type: str, obj: dict[str, Any]) -> None:
        api = next(a for a in CLAIM_APIS.values() if obj.get("kind") == a.kind)
        claim = Claim(api, obj)
        if not claim.made_by_kaito:
            return
        if event_type == "DELETED":
            self.lifecycle.claim_deleted(claim)
        self.queue.add(claim.key)

    def _on_node_event(self, event_type: str, node: dict[str, Any]) -> None:
        self._wake_claims_named(pool_of_node(node), None if event_type == "DELETED" else node)

    def _on_pool_change(self, before: PoolState | None, after: PoolState | None) -> None:
        state = after or before
        if state is None:
            return
        if state.claim_key in self._watched_keys(state.name):
            self.queue.add(state.claim_key)
        # Also every claim of that name: one refused with AgentPoolNameTaken may go ahead once the pool is gone.
        self._wake_claims_named(state.name)

    def _watched_keys(self, name: str) -> set[str]:
        return {claim_key(CLAIM_APIS[api_name], name) for api_name in self.claim_informers}

    def _wake_claims_named(self, name: str, node: dict[str, Any] | None = None) -> None:
        """Queue every claim of that name; before other work, the one this `node` lets turn Ready now. Kaito waits for
        just that, and under a burst the claim's registration, if still queued, is then done in the same reconcile
        and its writes (Node labels, status) made once, not twice."""
        if not name:
            return
        for api_name, informer in self.claim_informers.items():
            if (obj := informer.get(name)) is not None:
                claim = Claim(CLAIM_APIS[api_name], obj)
                first = node is not None and completes_initialization(claim, node, self.catalogue.size)
                self.queue.add(claim.key, first=first)

    def _claim_exists(self, key: str) -> bool | None:
        try:
            api, name = split_key(key)
        except (ValueError, StopIteration):
            return None
        informer = self.claim_informers.get(api.name)
        if informer is None or not informer.available or not informer.has_synced:
            return None
        return informer.get(name) is not None

    # work -------------------------------------------------------------------------------------

    def _work(self, first_only: bool = False) -> None:
        """A worker's loop; `first_only`: it takes only claims turning Ready (the queue's first lane)."""
        # Nothing is reconciled before the caches hold the cluster (an empty Node cache would read as "the
        # node has not joined" and flip Ready claims, or time them out and delete them), nor before ARM has
        # answered the first pool LIST: a claim could only wait, and would say so a second too late for
        # Kaito v0.3, which reads a new Machine once, one second after making it.
        while not (self._caches_synced() and self.inventory.first_answer.is_set()):
            if self._stop.wait(SYNC_POLL_S):
                return
        # Blocks until a key is ready; None once the queue is shut down. A key taken as the controller stops
        # (its leadership lost) is left alone.
        while (key := self.queue.get(first_only=first_only)) is not None and not self._stop.is_set():
            try:
                self._process(key)
            finally:
                self.queue.done(key)

    def _process(self, key: str) -> None:
        api, name = split_key(key)
        obj = self.claim_informers[api.name].get(name)
        if obj is not None and not Claim(api, obj).made_by_kaito:
            # Woken by a Node or pool of the same name; another provisioner's claim is never written to.
            self.queue.forget(key)
            return
        started = time.monotonic()
        bound = log.bind(claim=key)
        try:
            next_look = self.lifecycle.reconcile(Claim(api, obj)) if obj else self.lifecycle.reap(key)
        except TransientError as error:
            if error.retry_after_s:
                delay = error.retry_after_s
                self.queue.add_after(key, delay)
            else:
                delay = self.queue.add_rate_limited(key)
            self._count_error(api, error.reason)
            bound.warning("reconcile will retry", error=error.describe(), error_class=error.reason, retry_in_s=delay)
            return
        except (CloudError, kubernetes.client.ApiException) as error:
            if isinstance(error, kubernetes.client.ApiException) and error.status in (404, 409):
                # A write raced a newer version of the object, or its deletion: the watch brings it, then
                # we look again (a deleted claim's pool is reaped then).
                self.queue.add_rate_limited(key)
                bound.debug("write raced a change of the claim; retrying with fresh state", status=error.status)
                return
            reason = getattr(error, "reason", None) or type(error).__name__
            self._count_error(api, str(reason))
            delay = self.queue.add_rate_limited(key)
            bound.warning("reconcile failed", error=str(error)[:500], retry_in_s=delay)
            return
        except (urllib3.exceptions.HTTPError, ConnectionError):
            # The API server is restarting or unreachable: Kube says so once per outage; every claim retries.
            self._count_error(api, "APIServerUnreachable")
            self.queue.add_rate_limited(key)
            return
        except Exception:
            self._count_error(api, "Unexpected")
            self.queue.add_rate_limited(key)
            bound.exception("reconcile crashed")
            return
        finally:
            metrics.RECONCILE_DURATION.labels(kind=api.kind).observe(time.monotonic() - started)
        self.queue.forget(key)
        if next_look is not None:
            if next_look.when_idle:
                self.queue.add(key, when_idle=True)
            if next_look.after_s is not None:
                self.queue.add_after(key, next_look.after_s)

    @staticmethod
    def _count_error(api: ClaimApi, reason: str) -> None:
        metrics.RECONCILE_ERRORS.labels(kind=api.kind, reason=reason).inc()

    def _publish_claim_phases(self) -> None:
        while not self._caches_synced():
            if self._stop.wait(SYNC_POLL_S):
                return
        foreign = self._count_claims()
        log.info("claims not made by Kaito are left alone", **{f"{kind}_ignored": n for kind, n in foreign.items()})
        while not self._stop.wait(CLAIM_METRICS_INTERVAL_S):
            self._count_claims()

    def _count_claims(self) -> dict[str, int]:
        """Publishes the claims-by-phase and foreign-claims gauges; returns the foreign count per kind."""
        foreign: dict[str, int] = {}
        for api_name, informer in self.claim_informers.items():
            api = CLAIM_APIS[api_name]
            counts = dict.fromkeys(CLAIM_PHASES, 0)
            claims = [Claim(api, obj) for obj in informer.list()]
            for claim in claims:
                if claim.made_by_kaito:
                    counts[claim_phase(claim)] += 1
            for phase, count in counts.items():
                metrics.CLAIMS.labels(kind=api.kind, phase=phase).set(count)
            foreign[api.kind] = sum(not claim.made_by_kaito for claim in claims)
            metrics.FOREIGN_CLAIMS.labels(kind=api.kind).set(foreign[api.kind])
        return foreign

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.orphan_sweep_interval_s):
            if not self.synced():
                continue
            try:
                self.orphans.sweep()
            except CloudError as error:
                log.warning("orphan sweep failed", error=error.describe())
