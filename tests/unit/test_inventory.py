"""The shared pool LIST: how often it runs when claims ask for it early, and when ARM throttles it."""

from __future__ import annotations

import threading
import time

from gpu_provisioner.cloud.agentpools import PoolState
from gpu_provisioner.cloud.errors import ThrottledError
from gpu_provisioner.cloud.inventory import PoolInventory
from gpu_provisioner.cloud.pool_request import CLAIM_TAG


class ThrottledPools:
    """Answers every LIST with 429 and Retry-After, counting the calls."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self.lists = 0

    def list(self):
        self.lists += 1
        raise ThrottledError("too many requests", "TooManyRequests", 429, self.retry_after_s)


def run_for(inventory: PoolInventory, seconds: float, nag_every_s: float) -> None:
    """Run the refresher while claims keep asking for an early LIST."""
    stop = threading.Event()
    refresher = threading.Thread(target=inventory.run, args=(stop,))
    refresher.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        inventory.request_refresh()
        time.sleep(nag_every_s)
    stop.set()
    inventory.request_refresh()
    refresher.join(timeout=5)


def test_a_throttled_list_waits_out_retry_after_however_often_claims_ask():
    pools = ThrottledPools(retry_after_s=0.6)
    inventory = PoolInventory(pools, interval_s=0.05, on_change=lambda before, after: None)
    run_for(inventory, seconds=1.0, nag_every_s=0.01)
    # One LIST at the start, one after the first pause; never one per request.
    assert 1 <= pools.lists <= 2
    assert not inventory.synced


def test_without_throttling_an_early_list_is_not_held_back():
    class EmptyPools:
        lists = 0

        def list(self):
            self.lists += 1
            return []

    pools = EmptyPools()
    inventory = PoolInventory(pools, interval_s=10.0, on_change=lambda before, after: None)
    run_for(inventory, seconds=0.5, nag_every_s=0.05)
    assert pools.lists >= 5 and inventory.synced


def _pool(name: str, claim_key: str, state: str = "Creating") -> PoolState:
    return PoolState(name, state, "Standard_NC6s_v3", {CLAIM_TAG: claim_key})


class ListedPools:
    """Answers a LIST with what `pools` holds when it is called."""

    def __init__(self) -> None:
        self.pools: list[PoolState] = []

    def list(self):
        return list(self.pools)


def test_a_pool_name_is_reserved_for_one_claim_only():
    inventory = PoolInventory(ListedPools(), interval_s=10, on_change=lambda before, after: None)
    mine = _pool("ws1", "machines/ws1")
    assert inventory.reserve(mine) is None
    assert inventory.reserve(_pool("ws1", "nodeclaims/ws1")) == mine
    assert inventory.reserve(mine) is None  # the same claim again (a retry after a lost answer)


def test_a_released_reservation_is_not_brought_back_by_a_list_that_began_before_it():
    now = [0.0]
    pools = ListedPools()
    inventory = PoolInventory(pools, interval_s=10, on_change=lambda before, after: None, clock=lambda: now[0])
    mine = _pool("ws1", "machines/ws1")
    inventory.reserve(mine)
    inventory.release(mine)
    assert inventory.get("ws1") is None
    inventory.release(mine)  # twice is harmless

    # A LIST started before the release, answered after it, cannot know of it: the release stands.
    now[0] = 1.0
    inventory.record(_pool("ws2", "machines/ws2"))
    now[0] = 0.5
    inventory.refresh()
    assert inventory.get("ws1") is None and inventory.get("ws2") is not None
    # A LIST that began later is the truth again.
    now[0] = 2.0
    pools.pools = [_pool("ws1", "nodeclaims/ws1", "Succeeded")]
    inventory.refresh()
    assert inventory.get("ws1").claim_key == "nodeclaims/ws1" and inventory.get("ws2") is None


def test_a_release_leaves_a_reservation_of_another_claim_alone():
    inventory = PoolInventory(ListedPools(), interval_s=10, on_change=lambda before, after: None)
    theirs = _pool("ws1", "nodeclaims/ws1")
    inventory.reserve(theirs)
    inventory.release(_pool("ws1", "machines/ws1"))
    assert inventory.get("ws1") == theirs


class DeletingPools:
    """Pools whose DELETE ARM accepts with a Retry-After; `gone` says which have finished going."""

    def __init__(self, retry_after_s: float | None) -> None:
        self.retry_after_s = retry_after_s
        self.deleting: set[str] = set()

    def list(self) -> list[PoolState]:
        return [PoolState(name, "Deleting", "Standard_NC6s_v3", {CLAIM_TAG: f"nodeclaims/{name}"})
                for name in self.deleting]

    def delete(self, name: str) -> float | None:
        self.deleting.add(name)
        return self.retry_after_s


def test_while_a_pool_is_being_deleted_the_list_follows_arms_retry_after_then_the_interval():
    now = [100.0]
    pools = DeletingPools(retry_after_s=2)
    inventory = PoolInventory(pools, 10.0, lambda before, after: None, clock=lambda: now[0])
    inventory.refresh()
    assert inventory._next_list_at == 110.0
    inventory.delete(PoolState("gpu1", "Succeeded", "Standard_NC6s_v3", {CLAIM_TAG: "nodeclaims/gpu1"}))
    assert inventory.get("gpu1").provisioning_state == "Deleting" and inventory._next_list_at == 102.0
    now[0] = 102.0
    inventory.refresh()  # still being deleted: look again when ARM said
    assert inventory._next_list_at == 104.0
    pools.deleting.clear()
    now[0] = 104.0
    inventory.refresh()  # gone: back to the interval
    assert inventory.get("gpu1") is None and inventory._next_list_at == 114.0


def test_a_delete_without_retry_after_is_looked_at_every_two_seconds_never_more_often_than_a_second():
    for retry_after_s, expected_s in ((None, 2.0), (0, 2.0), (0.1, 1.0), (60, 10.0)):
        inventory = PoolInventory(DeletingPools(retry_after_s), 10.0, lambda before, after: None, clock=lambda: 0.0)
        inventory.refresh()
        inventory.delete(PoolState("gpu1", "Succeeded", "Standard_NC6s_v3", {CLAIM_TAG: "nodeclaims/gpu1"}))
        assert inventory._next_list_at == expected_s, retry_after_s


def test_a_followed_create_is_listed_soon_then_every_few_seconds_until_it_ends():
    now = [0.0]
    pools = DeletingPools(retry_after_s=None)
    creating = PoolState("gpu1", "Creating", "Standard_NC6s_v3", {CLAIM_TAG: "nodeclaims/gpu1"})
    pools.list = lambda: [creating]
    inventory = PoolInventory(pools, 10.0, lambda before, after: None, clock=lambda: now[0])
    inventory.refresh()
    inventory.follow("gpu1")
    assert inventory._next_list_at == 0.5  # at once, but a quarter of its pace after the last LIST
    inventory.follow("gpu1")  # asked again by the next reconcile: no LIST sooner than the pace
    inventory.refresh()
    assert inventory._next_list_at == 2.0
    pools.list = lambda: [PoolState("gpu1", "Succeeded", "Standard_NC6s_v3", {CLAIM_TAG: "nodeclaims/gpu1"})]
    now[0] = 2.0
    inventory.refresh()
    assert inventory._next_list_at == 12.0


def test_deletions_in_a_burst_are_each_looked_at_when_due_by_a_few_shared_lists():
    """Each pool is LISTed for at its DELETE's Retry-After (not up to a whole pace later, as when the next LIST
    was planned from the last one), and pools due close together share one LIST."""
    now = [0.0]
    pools = DeletingPools(retry_after_s=1)
    inventory = PoolInventory(pools, 10.0, lambda before, after: None, clock=lambda: now[0])
    inventory.refresh()
    lists = 0
    looked_at: dict[str, float] = {}
    for index in range(8):  # a DELETE every 0.1 s
        now[0] = 0.1 * index
        inventory.delete(PoolState(f"gpu{index}", "Succeeded", "Standard_NC6s_v3",
                                   {CLAIM_TAG: f"nodeclaims/gpu{index}"}))
    while pools.deleting:
        now[0] = inventory._next_list_at
        due = [name for name, followed in inventory._followed.items() if followed.due <= now[0]]
        looked_at.update((name, now[0]) for name in due if name not in looked_at)
        pools.deleting -= set(due)  # each is gone by its first look
        inventory.refresh()
        lists += 1
    assert all(looked_at[f"gpu{i}"] - (0.1 * i + 1) <= 0.25 + 1e-9 for i in range(8)), looked_at
    assert lists == 4, lists  # 8 pools due over 0.7 s: LISTs at 1.0, 1.25, 1.5 and 1.75 s, not one a pool


def test_workers_asking_for_the_cluster_at_once_share_one_read():
    class SlowCluster:
        reads = 0
        answer = threading.Event()

        def cluster(self):
            self.reads += 1
            self.answer.wait(5)
            return object()

    pools = SlowCluster()
    inventory = PoolInventory(pools, 10.0, lambda before, after: None)
    seen = []
    workers = [threading.Thread(target=lambda: seen.append(inventory.cluster())) for _ in range(8)]
    for worker in workers:
        worker.start()
    time.sleep(0.2)  # every worker is asking while the first read waits for its answer
    pools.answer.set()
    for worker in workers:
        worker.join(timeout=5)
    assert pools.reads == 1 and len(seen) == 8 and len({id(state) for state in seen}) == 1
