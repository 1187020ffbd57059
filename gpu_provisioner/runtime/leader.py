"""Leader election on a coordination.k8s.io Lease, as client-go does it: only the holder reconciles;
a standby takes the Lease once the holder has not renewed it for the lease duration.

As in client-go, the times written in the Lease are never compared with this replica's clock (the holder's
clock may be skewed): a standby remembers the record it last saw and the local monotonic time at which it
saw it change, and the Lease is expired only when it has not changed for the lease duration since."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import kubernetes
import structlog
from kubernetes.client import ApiException

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import utc_now

log = structlog.get_logger(__name__)
# The Go gpu-provisioner's (every release of its chart): replacing it, a replica waits until its leader lets go,
# so that the two never reconcile at once.
LEASE_NAME = "gpu-provisioner-leader-election"


def _micro_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


class LeaderElector:
    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str, identity: str,
                 lease_duration_s: float = 15.0, renew_deadline_s: float = 10.0, retry_period_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], datetime] = utc_now) -> None:
        self._api = kubernetes.client.CoordinationV1Api(api_client)
        self.namespace, self.identity = namespace, identity
        self.lease_duration_s, self.renew_deadline_s, self.retry_period_s = (
            lease_duration_s, renew_deadline_s, retry_period_s)
        self.is_leader = False
        # `clock` measures every duration; `wall_clock` only fills the Lease's timestamps, which others read.
        self._clock, self._wall_clock = clock, wall_clock
        self._observed: dict[str, object] | None = None  # the Lease record last seen (or written)
        self._observed_at = 0.0  # `clock` when that record last changed
        # No Lease call may outlast the renew deadline, or a hung request would keep a deposed leader working.
        self._timeout_s = max(renew_deadline_s / 2, 1.0)

    def run(self, on_started_leading: Callable[[], None], on_stopped_leading: Callable[[], None],
            stop: threading.Event) -> None:
        """Campaign until `stop`; call on_started_leading once elected and on_stopped_leading if the Lease
        is lost (the caller should then exit: a deposed leader must not keep reconciling)."""
        last_renewed = 0.0
        while not stop.is_set():
            try:
                held = self._try_acquire_or_renew()
            except Exception as error:
                # Any failure (an unreachable API server too) is a missed renewal: were this thread to die,
                # a leader would keep reconciling while a standby takes the Lease.
                log.warning("lease update failed", error=str(error)[:300], lease=LEASE_NAME)
                held = False
            now = self._clock()
            if held:
                last_renewed = now
                if not self.is_leader:
                    self.is_leader = True
                    metrics.LEADER.set(1)
                    log.info("became leader", identity=self.identity, lease=f"{self.namespace}/{LEASE_NAME}")
                    on_started_leading()
            elif self.is_leader and now - last_renewed > self.renew_deadline_s:
                self.is_leader = False
                metrics.LEADER.set(0)
                log.error("lost leadership", identity=self.identity)
                on_stopped_leading()
                return
            stop.wait(self.retry_period_s)
        if self.is_leader:
            self._release()

    def _try_acquire_or_renew(self) -> bool:
        now = self._wall_clock()
        try:
            lease = self._api.read_namespaced_lease(LEASE_NAME, self.namespace, _request_timeout=self._timeout_s)
        except ApiException as error:
            if error.status != 404:
                raise
            created = self._api.create_namespaced_lease(self.namespace, _request_timeout=self._timeout_s, body={
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": LEASE_NAME, "namespace": self.namespace},
                "spec": self._spec(now, now, 0),
            })
            self._observe(created.spec)
            return True
        spec = lease.spec
        self._observe(spec)
        holder = spec.holder_identity or ""
        duration = spec.lease_duration_seconds or self.lease_duration_s
        # Expired only by this replica's clock: the renewTime in it was written by the holder's clock.
        if holder and holder != self.identity and self._clock() - self._observed_at <= duration:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        acquired = _parse(spec.acquire_time) if holder == self.identity else now
        body = {"metadata": {"name": LEASE_NAME, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": self._spec(acquired or now, now, transitions)}
        try:
            written = self._api.replace_namespaced_lease(LEASE_NAME, self.namespace, body,
                                                         _request_timeout=self._timeout_s)
        except ApiException as error:
            if error.status == 409:  # another candidate wrote first
                return False
            raise
        self._observe(written.spec)
        return True

    def _observe(self, spec: kubernetes.client.V1LeaseSpec) -> None:
        # Any change of the record (a renewal, a new holder, a release) restarts the lease duration.
        record = spec.to_dict()
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()

    def _spec(self, acquired: datetime, renewed: datetime, transitions: int) -> dict[str, object]:
        return {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.lease_duration_s),
                "acquireTime": _micro_time(acquired), "renewTime": _micro_time(renewed),
                "leaseTransitions": transitions}

    def _release(self) -> None:
        # Hand over at once on a clean shutdown instead of making the standby wait out the lease.
        try:
            lease = self._api.read_namespaced_lease(LEASE_NAME, self.namespace, _request_timeout=self._timeout_s)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                self._api.replace_namespaced_lease(LEASE_NAME, self.namespace, lease, _request_timeout=self._timeout_s)
        except Exception as error:
            log.warning("lease release failed", error=str(error)[:300])
