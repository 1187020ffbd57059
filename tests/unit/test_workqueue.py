"""The work queue: dedup, order, per-key serialisation, delays and backoff."""

from __future__ import annotations

import threading
import time

import pytest

from gpu_provisioner.runtime.workqueue import WorkQueue


def test_a_waiting_key_is_queued_once_and_order_is_fifo():
    queue = WorkQueue("t")
    for key in ["a", "b", "a", "c", "b"]:
        queue.add(key)
    assert len(queue) == 3
    assert [queue.get(0), queue.get(0), queue.get(0)] == ["a", "b", "c"]
    assert queue.get(0) is None


def test_a_key_added_while_processing_comes_back_only_after_done():
    queue = WorkQueue("t")
    queue.add("a")
    assert queue.get(0) == "a"
    queue.add("a")
    assert queue.get(0) is None  # not handed to a second worker
    queue.done("a")
    assert queue.get(0) == "a"


def test_no_key_is_ever_worked_on_by_two_workers_at_once():
    queue = WorkQueue("t")
    holders: dict[str, int] = {}
    overlaps = []
    processed = []
    lock = threading.Lock()

    def worker() -> None:
        while (key := queue.get(timeout_s=0.5)) is not None:
            with lock:
                holders[key] = holders.get(key, 0) + 1
                if holders[key] > 1:
                    overlaps.append(key)
            time.sleep(0.001)
            with lock:
                holders[key] -= 1
                processed.append(key)
            queue.done(key)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for i in range(2000):
        queue.add(f"k{i % 5}")
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert set(processed) == {f"k{i}" for i in range(5)}


def test_add_after_waits_and_the_earliest_request_wins():
    queue = WorkQueue("t")
    queue.add_after("late", 0.2)
    queue.add_after("soon", 0.05)
    queue.add_after("soon", 5)  # later than already planned: ignored
    started = time.monotonic()
    assert queue.get(1) == "soon"
    assert queue.get(1) == "late"
    assert 0.15 < time.monotonic() - started < 1.0


def test_backoff_doubles_per_failure_up_to_the_cap_with_jitter_and_forget_resets():
    queue = WorkQueue("t", base_delay_s=1, max_delay_s=8, jitter=0.1)
    delays = [queue.add_rate_limited("k") for _ in range(6)]
    for delay, expected in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert expected * 0.9 <= delay <= expected * 1.1
    assert queue.failures("k") == 6
    queue.forget("k")
    assert queue.failures("k") == 0
    assert queue.add_rate_limited("k") == pytest.approx(1, rel=0.1)


def test_shutdown_releases_a_blocked_worker():
    queue = WorkQueue("t")
    result = []
    waiter = threading.Thread(target=lambda: result.append(queue.get()))
    waiter.start()
    time.sleep(0.05)
    queue.shutdown()
    waiter.join(timeout=1)
    assert not waiter.is_alive() and result == [None]


def test_a_key_added_first_is_handed_out_before_keys_that_waited_longer():
    queue = WorkQueue("t")
    for key in ["a", "b", "c"]:
        queue.add(key)
    queue.add("d", first=True)
    queue.add("b", first=True)  # already waiting: moves up, still once
    queue.add("d")  # added again without: stays first
    assert len(queue) == 4
    assert [queue.get(0) for _ in range(4)] == ["d", "b", "a", "c"]
    assert queue.get(0) is None


def test_a_key_added_first_while_processing_goes_first_once_done():
    queue = WorkQueue("t")
    queue.add("a")
    assert queue.get(0) == "a"
    queue.add("b")
    queue.add("a", first=True)  # parked: a worker holds it
    assert queue.get(0) == "b"
    queue.add("c")
    queue.done("a")
    assert queue.get(0) == "a"
    queue.done("a")
    queue.add("a")  # an ordinary add later is ordinary again
    assert [queue.get(0), queue.get(0)] == ["c", "a"]


def test_a_key_added_when_idle_waits_while_any_other_key_does_and_moves_up_when_added_again():
    queue = WorkQueue("t")
    queue.add("a", when_idle=True)
    queue.add("b", when_idle=True)
    queue.add("c")
    queue.add("c", when_idle=True)  # already waiting in a higher lane: stays there
    queue.add("d", first=True)
    queue.add("b")  # news of it: moves up to the plain lane
    assert len(queue) == 4
    assert [queue.get(0) for _ in range(2)] == ["d", "c"]
    assert queue.others_wait("c")  # b, moved up
    assert queue.get(0) == "b"
    assert len(queue) == 1 and not queue.others_wait("b")  # a waits for when idle: nothing else waits
    assert queue.get(0) == "a"
    assert queue.get(0) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_with_a_quiet_period_the_when_idle_lane_waits_until_no_key_has_come_for_that_long():
    clock = Clock()
    queue = WorkQueue("t", clock=clock, quiet_s=0.5, idle_wait_max_s=10)
    queue.add("a", when_idle=True)
    queue.add("b")
    assert queue.get(0) == "b"
    assert queue.others_wait("b")  # b itself came moments ago: a burst may be going on
    queue.done("b")
    assert queue.get(0) is None  # the queue is empty, but not quiet yet
    clock.now += 0.4
    queue.add("c")  # the burst goes on
    assert queue.get(0) == "c"
    queue.done("c")
    clock.now += 0.4
    assert queue.get(0) is None and queue.others_wait("c")
    clock.now += 0.1
    assert not queue.others_wait("c")
    assert queue.get(0) == "a"


def test_a_key_waits_in_the_when_idle_lane_at_most_idle_wait_max_s_however_often_keys_come():
    clock = Clock()
    queue = WorkQueue("t", clock=clock, quiet_s=0.5, idle_wait_max_s=2)
    queue.add("a", when_idle=True)
    for _ in range(7):  # a key every 0.3 s: never quiet
        clock.now += 0.3
        queue.add("b")
        assert queue.get(0) == "b"
        queue.done("b")
    assert clock.now - 1000 == pytest.approx(2.1)
    assert queue.get(0) == "a"
    # Taken from the when-idle lane: the pass it was left to, which must not leave it to another.
    assert not queue.others_wait("a")
    queue.add("b")
    assert queue.others_wait("b")
    queue.done("a")
    queue.add("a")
    assert queue.get(0) == "b" and queue.get(0) == "a" and queue.others_wait("a")


def test_a_worker_blocked_in_get_takes_a_when_idle_key_once_the_queue_is_quiet():
    queue = WorkQueue("t", quiet_s=0.2)
    queue.add("a", when_idle=True)
    queue.add("b")
    assert queue.get(0) == "b"
    queue.done("b")
    started = time.monotonic()
    assert queue.get(2.0) == "a"  # woken in time by the quiet period's end, with nothing else added
    assert time.monotonic() - started >= 0.15


def test_a_key_held_by_a_worker_and_added_when_idle_then_plainly_comes_back_in_the_plain_lane():
    queue = WorkQueue("t")
    queue.add("a")
    assert queue.get(0) == "a"
    queue.add("a", when_idle=True)  # parked
    queue.add("b", when_idle=True)
    queue.add("a")
    queue.done("a")
    assert [queue.get(0), queue.get(0)] == ["a", "b"]


def test_a_worker_kept_for_the_first_lane_takes_only_its_keys():
    queue = WorkQueue("t")
    queue.add("a")
    queue.add_after("b", 0.01)
    assert queue.get(0.05, first_only=True) is None  # neither "a" nor "b", due meanwhile
    queue.add("c", first=True)
    assert queue.get(0, first_only=True) == "c"
    assert [queue.get(0), queue.get(0)] == ["a", "b"]


def _blocked_getter(queue: WorkQueue, first_only: bool) -> tuple[threading.Thread, list[str | None]]:
    taken: list[str | None] = []
    thread = threading.Thread(target=lambda: taken.append(queue.get(2.0, first_only=first_only)))
    thread.start()
    time.sleep(0.05)  # blocked in get
    return thread, taken


@pytest.mark.parametrize("how", ["added", "moved up", "parked"])
def test_a_first_lane_key_wakes_a_blocked_worker_kept_for_it(how):
    queue = WorkQueue("t")
    if how == "moved up":
        queue.add("a")
    if how == "parked":
        queue.add("a")
        assert queue.get(0) == "a"
    first_worker, taken = _blocked_getter(queue, first_only=True)
    queue.add("a", first=True)
    if how == "parked":
        queue.done("a")
    first_worker.join(timeout=1.0)  # well before its own 2 s timeout
    assert not first_worker.is_alive() and taken == ["a"]


def test_a_plain_key_wakes_a_worker_that_may_take_it_while_a_first_lane_worker_also_waits():
    # One notify for a plain key must not be spent on a worker kept for the first lane.
    queue = WorkQueue("t")
    first_worker, first_taken = _blocked_getter(queue, first_only=True)
    worker, taken = _blocked_getter(queue, first_only=False)
    queue.add("a")
    worker.join(timeout=1.0)
    assert not worker.is_alive() and taken == ["a"]
    queue.shutdown()
    first_worker.join(timeout=1.0)
    assert first_taken == [None]
