"""Leader election: the leader steps down when it cannot renew, and expiry is measured on the standby's own
clock, never against the holder's timestamps (the holder's clock may be skewed)."""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client import ApiException, V1Lease, V1LeaseSpec, V1ObjectMeta
from urllib3.exceptions import MaxRetryError

from gpu_provisioner.runtime.leader import LEASE_NAME, LeaderElector

LEASE_S = 15


class UnreachableAfterElection:
    """A Lease API that lets the first candidate create the Lease, then cannot be reached at all."""

    def __init__(self) -> None:
        self.created = False

    def read_namespaced_lease(self, name, namespace, **kwargs):
        if not self.created:
            raise ApiException(status=404)
        raise MaxRetryError(None, "/apis/coordination.k8s.io/v1/leases", "connection refused")

    def create_namespaced_lease(self, namespace, body, **kwargs):
        self.created = True
        return _lease(body, "1")


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


def _time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _lease(body: dict[str, Any], resource_version: str) -> V1Lease:
    spec = body["spec"]
    return V1Lease(metadata=V1ObjectMeta(name=LEASE_NAME, namespace="default", resource_version=resource_version),
                   spec=V1LeaseSpec(holder_identity=spec["holderIdentity"],
                                    lease_duration_seconds=spec["leaseDurationSeconds"],
                                    acquire_time=_time(spec["acquireTime"]), renew_time=_time(spec["renewTime"]),
                                    lease_transitions=spec["leaseTransitions"]))


class LeaseStore:
    """One Lease as the API server keeps it: optimistic concurrency on resourceVersion."""

    def __init__(self) -> None:
        self.lease: V1Lease | None = None
        self.version = 0

    def read_namespaced_lease(self, name, namespace, **kwargs):
        if self.lease is None:
            raise ApiException(status=404)
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace, body, **kwargs):
        if self.lease is not None:
            raise ApiException(status=409)
        return self._store(body)

    def replace_namespaced_lease(self, name, namespace, body, **kwargs):
        if self.lease is None:
            raise ApiException(status=404)
        version = body.metadata.resource_version if isinstance(body, V1Lease) else body["metadata"]["resourceVersion"]
        if version != self.lease.metadata.resource_version:
            raise ApiException(status=409)
        return self._store(body)

    def _store(self, body: dict[str, Any] | V1Lease) -> V1Lease:
        self.version += 1
        self.lease = copy.deepcopy(body) if isinstance(body, V1Lease) else _lease(body, "")
        self.lease.metadata.resource_version = str(self.version)
        return copy.deepcopy(self.lease)


class FakeClock:
    """A replica's clocks: a monotonic one and a wall clock `skew_s` off the true time."""

    def __init__(self, skew_s: float = 0.0) -> None:
        self.elapsed, self.skew_s = 0.0, skew_s

    def monotonic(self) -> float:
        return 1000.0 + self.elapsed  # a different origin than the wall clock, as on a real machine

    def wall(self) -> datetime:
        return datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=self.elapsed + self.skew_s)


def _candidate(store: LeaseStore, identity: str, clock: FakeClock) -> LeaderElector:
    elector = LeaderElector(None, "default", identity, lease_duration_s=LEASE_S, renew_deadline_s=10,
                            clock=clock.monotonic, wall_clock=clock.wall)
    elector._api = store
    return elector


def _advance(seconds: float, *clocks: FakeClock) -> None:
    for clock in clocks:
        clock.elapsed += seconds


def test_a_standby_never_takes_a_lease_that_a_skewed_holder_keeps_renewing():
    store, holder_clock, standby_clock = LeaseStore(), FakeClock(skew_s=-20), FakeClock()
    holder = _candidate(store, "holder", holder_clock)
    standby = _candidate(store, "standby", standby_clock)
    assert holder._try_acquire_or_renew()
    # Every renewTime the holder writes is 20 s old by the standby's clock, more than the lease duration.
    assert store.lease.spec.renew_time < standby_clock.wall() - timedelta(seconds=LEASE_S)
    for _ in range(60):  # two minutes of renewals every 2 s
        _advance(2, holder_clock, standby_clock)
        assert holder._try_acquire_or_renew()
        assert not standby._try_acquire_or_renew()
    assert store.lease.spec.holder_identity == "holder" and store.lease.spec.lease_transitions == 0


def test_a_standby_takes_over_once_the_holder_stops_renewing_for_the_lease_duration_on_its_own_clock():
    store, holder_clock, standby_clock = LeaseStore(), FakeClock(skew_s=-20), FakeClock()
    holder = _candidate(store, "holder", holder_clock)
    standby = _candidate(store, "standby", standby_clock)
    assert holder._try_acquire_or_renew()
    _advance(2, holder_clock, standby_clock)
    assert holder._try_acquire_or_renew()
    assert not standby._try_acquire_or_renew()  # the last renewal, seen at standby time 2 s
    for _ in range(LEASE_S):  # the holder is gone; the standby keeps looking every second
        _advance(1, standby_clock)
        assert not standby._try_acquire_or_renew()
    _advance(0.5, standby_clock)
    assert standby._try_acquire_or_renew()
    spec = store.lease.spec
    assert spec.holder_identity == "standby" and spec.lease_transitions == 1
    assert spec.acquire_time == spec.renew_time == standby_clock.wall()
    # The old holder, back, finds a record it did not write and a lease that is not expired.
    _advance(1, holder_clock, standby_clock)
    assert not holder._try_acquire_or_renew()


def test_a_fresh_standby_waits_a_full_lease_duration_even_when_the_renew_time_looks_ancient():
    store, holder_clock = LeaseStore(), FakeClock(skew_s=-3600)
    assert _candidate(store, "holder", holder_clock)._try_acquire_or_renew()
    standby_clock = FakeClock()
    standby = _candidate(store, "standby", standby_clock)
    # It cannot know when the holder last renewed, only when it first saw this record.
    assert not standby._try_acquire_or_renew()
    _advance(LEASE_S, standby_clock)
    assert not standby._try_acquire_or_renew()
    _advance(0.5, standby_clock)
    assert standby._try_acquire_or_renew()


def test_a_released_lease_is_taken_at_once():
    store, clock = LeaseStore(), FakeClock()
    holder = _candidate(store, "holder", clock)
    standby = _candidate(store, "standby", clock)
    assert holder._try_acquire_or_renew()
    assert not standby._try_acquire_or_renew()
    holder._release()  # a clean shutdown
    assert store.lease.spec.holder_identity == ""
    assert standby._try_acquire_or_renew()
    assert store.lease.spec.holder_identity == "standby"


def test_the_lease_duration_is_the_one_the_holder_wrote():
    store, clock = LeaseStore(), FakeClock()
    holder = LeaderElector(None, "default", "holder", lease_duration_s=40, clock=clock.monotonic,
                           wall_clock=clock.wall)
    holder._api = store
    assert holder._try_acquire_or_renew()
    standby = _candidate(store, "standby", clock)
    assert not standby._try_acquire_or_renew()
    _advance(LEASE_S + 1, clock)
    assert not standby._try_acquire_or_renew()  # its own 15 s are over, the holder's 40 s are not
    _advance(40 - LEASE_S, clock)
    assert standby._try_acquire_or_renew()
