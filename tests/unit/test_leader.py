"""Leader election when the API server cannot be reached: the leader steps down instead of working on."""

from __future__ import annotations

import threading

from kubernetes.client import ApiException
from urllib3.exceptions import MaxRetryError

from gpu_provisioner.runtime.leader import LeaderElector


class UnreachableAfterElection:
    """A Lease API that lets the first candidate create the Lease, then cannot be reached at all."""

    def __init__(self) -> None:
        self.created = False

    def read_namespaced_lease(self, name, namespace, **kwargs):
        if not self.created:
            raise ApiException(status=404)
        raise MaxRetryError(None, "/apis/coordination.k8s.io/v1/leases", "connection refused")

    def create_namespaced_lease(self, namespace, **kwargs):
        self.created = True


def test_a_leader_that_cannot_renew_steps_down_within_the_renew_deadline():
    elector = LeaderElector(None, "default", "replica-a", lease_duration_s=0.6, renew_deadline_s=0.4,
                            retry_period_s=0.05)
    elector._api = UnreachableAfterElection()
    started, stopped = threading.Event(), threading.Event()
    campaign = threading.Thread(target=elector.run, args=(started.set, stopped.set, threading.Event()))
    campaign.start()
    campaign.join(timeout=5)
    assert started.is_set() and stopped.is_set()
    assert not elector.is_leader and not campaign.is_alive()
