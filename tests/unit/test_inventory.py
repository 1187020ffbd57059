"""The shared pool LIST: how often it runs when claims ask for it early, and when ARM throttles it."""

from __future__ import annotations

import threading
import time

from gpu_provisioner.cloud.errors import ThrottledError
from gpu_provisioner.cloud.inventory import PoolInventory


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
