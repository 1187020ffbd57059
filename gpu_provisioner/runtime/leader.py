"""Leader election on a coordination.k8s.io Lease, as client-go does it: only the holder reconciles;
a standby takes the Lease once the holder has not renewed it for the lease duration."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import kubernetes
import structlog
from kubernetes.client import ApiException

from gpu_provisioner import metrics

log = structlog.get_logger(__name__)
LEASE_NAME = "gpu-provisioner-leader"


def _micro_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


class LeaderElector:
    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str, identity: str,
                 lease_duration_s: float = 15.0, renew_deadline_s: float = 10.0, retry_period_s: float = 2.0) -> None:
        self._api = kubernetes.client.CoordinationV1Api(api_client)
        self.namespace, self.identity = namespace, identity
        self.lease_duration_s, self.renew_deadline_s, self.retry_period_s = (
            lease_duration_s, renew_deadline_s, retry_period_s)
        self.is_leader = False
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
            now = time.monotonic()
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
        now = datetime.now(UTC)
        try:
            lease = self._api.read_namespaced_lease(LEASE_NAME, self.namespace, _request_timeout=self._timeout_s)
        except ApiException as error:
            if error.status != 404:
                raise
            self._api.create_namespaced_lease(self.namespace, _request_timeout=self._timeout_s, body={
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": LEASE_NAME, "namespace": self.namespace},
                "spec": self._spec(now, now, 0),
            })
            return True
        spec = lease.spec
        holder = spec.holder_identity or ""
        renewed = _parse(spec.renew_time) or _parse(spec.acquire_time) or datetime.min.replace(tzinfo=UTC)
        duration = timedelta(seconds=spec.lease_duration_seconds or self.lease_duration_s)
        if holder and holder != self.identity and now < renewed + duration:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        acquired = _parse(spec.acquire_time) if holder == self.identity else now
        body = {"metadata": {"name": LEASE_NAME, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": self._spec(acquired or now, now, transitions)}
        try:
            self._api.replace_namespaced_lease(LEASE_NAME, self.namespace, body, _request_timeout=self._timeout_s)
        except ApiException as error:
            if error.status == 409:  # another candidate wrote first
                return False
            raise
        return True

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
