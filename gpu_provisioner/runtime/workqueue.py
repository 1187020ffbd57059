"""A client-go style work queue: keys, not work; deduplicated; never one key in two workers at once.

A key added while a worker holds it is parked and handed out again when that worker calls done().
Delayed adds wait in a heap; failures back off per key, exponentially, with jitter. Keys wait in three lanes,
each emptied before the next: `first=True` for work that finishes something others wait for, the plain lane,
and `when_idle=True` for work nobody waits for. A key added again in a higher lane moves up. Workers may be kept
for the first lane (`get(first_only=True)`), so that its work never waits behind a long request of the other
lanes' work.

The when-idle lane waits while any other key does and, with `quiet_s`, until no other key has come for that
long: in a burst its keys come a few at a time, so an empty queue for a moment does not mean the burst is over.
So that a steady trickle of keys cannot hold it back for ever, a key waits there `idle_wait_max_s` at most.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections import deque
from collections.abc import Callable

from gpu_provisioner import metrics

FIRST, PLAIN, WHEN_IDLE = 0, 1, 2  # the lanes, in the order they are emptied


class WorkQueue:
    def __init__(
        self,
        name: str,
        base_delay_s: float = 0.5,
        max_delay_s: float = 300.0,
        jitter: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        quiet_s: float = 0.0,
        idle_wait_max_s: float = 10.0,
    ) -> None:
        self.name = name
        self._base, self._max, self._jitter = base_delay_s, max_delay_s, jitter
        self._clock = clock
        self._quiet_s, self._idle_wait_max_s = quiet_s, idle_wait_max_s
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        # Where workers kept for the first lane wait, so that a key of another lane wakes a worker that may take it.
        self._first_cond = threading.Condition(lock)
        # Keys ready to hand out, by lane.
        self._lanes: tuple[deque[str], ...] = (deque(), deque(), deque())
        self._dirty: dict[str, int] = {}  # queued or parked (held by a worker, added again): its lane
        self._processing: set[str] = set()
        self._last_added_at = float("-inf")  # the last add to the first or the plain lane
        self._taken_when_idle: set[str] = set()  # keys held by a worker that took them from the when-idle lane
        self._waiting: list[tuple[float, int, str]] = []  # (due, sequence, key) heap
        self._due: dict[str, float] = {}  # earliest due time per waiting key
        self._sequence = 0
        self._failures: dict[str, int] = {}
        self._added_at: dict[str, float] = {}
        self._started_at: dict[str, float] = {}
        self._shutting_down = False
        # Read at each scrape, as client-go's queue publishes them: a worker stuck on one key shows here long
        # before its work_duration is observed.
        metrics.WORKQUEUE_UNFINISHED_WORK.labels(name=name).set_function(lambda: sum(self.running_s()))
        metrics.WORKQUEUE_LONGEST_RUNNING.labels(name=name).set_function(lambda: max(self.running_s(), default=0.0))

    # adding -----------------------------------------------------------------------------------

    def add(self, key: str, *, first: bool = False, when_idle: bool = False) -> None:
        with self._cond:
            self._add_locked(key, FIRST if first else WHEN_IDLE if when_idle else PLAIN)

    def _add_locked(self, key: str, lane: int = PLAIN) -> None:
        if self._shutting_down:
            return
        if key in self._dirty:
            if lane < self._dirty[key]:
                self._move_up(key, lane)
            return
        self._dirty[key] = lane
        now = self._clock()
        if lane != WHEN_IDLE:
            self._last_added_at = now
        metrics.WORKQUEUE_ADDS.labels(name=self.name).inc()
        self._added_at.setdefault(key, now)
        if key in self._processing:
            return  # parked: queued in its lane when its worker is done
        self._queue_in(key, lane)

    def _move_up(self, key: str, lane: int) -> None:
        self._last_added_at = self._clock()
        if key not in self._processing:
            self._lanes[self._dirty[key]].remove(key)  # a scan, but at most twice for a key between two hand-outs
            self._queue_in(key, lane)
        self._dirty[key] = lane

    def _queue_in(self, key: str, lane: int) -> None:
        self._lanes[lane].append(key)
        self._publish_depth()
        self._notify(lane)

    def add_after(self, key: str, delay_s: float) -> None:
        if delay_s <= 0:
            self.add(key)
            return
        with self._cond:
            due = self._clock() + delay_s
            if self._shutting_down or self._due.get(key, float("inf")) <= due:
                return  # an earlier wake-up is already planned
            self._due[key] = due
            self._sequence += 1
            heapq.heappush(self._waiting, (due, self._sequence, key))
            self._cond.notify()

    def add_rate_limited(self, key: str) -> float:
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self._base * 2**failures, self._max)
        delay *= 1 + random.uniform(-self._jitter, self._jitter)
        metrics.WORKQUEUE_RETRIES.labels(name=self.name).inc()
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    # taking -----------------------------------------------------------------------------------

    def get(self, timeout_s: float | None = None, *, first_only: bool = False) -> str | None:
        """The next key to work on, blocking until there is one (None once shut down, or after `timeout_s`);
        `first_only`: only a key of the first lane."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        with self._cond:
            while True:
                self._promote_due()
                idle_opens_in = 0.0 if first_only else self._idle_opens_in()
                lanes = self._lanes[:1] if first_only else self._lanes if idle_opens_in <= 0 else self._lanes[:2]
                if lane := next((lane for lane in lanes if lane), None):
                    key = lane.popleft()
                    del self._dirty[key]
                    if lane is self._lanes[WHEN_IDLE]:
                        self._taken_when_idle.add(key)
                    self._processing.add(key)
                    now = self._clock()
                    metrics.WORKQUEUE_QUEUE_DURATION.labels(name=self.name).observe(now - self._added_at.pop(key, now))
                    self._started_at[key] = now
                    self._publish_depth()
                    return key
                if self._shutting_down:
                    return None
                # Delayed keys come back in the plain lane: only the other workers wait for them.
                wait = self._waiting[0][0] - self._clock() if self._waiting and not first_only else None
                if idle_opens_in > 0 and self._lanes[WHEN_IDLE]:
                    wait = idle_opens_in if wait is None else min(wait, idle_opens_in)
                if deadline is not None:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        return None
                    wait = remaining if wait is None else min(wait, remaining)
                (self._first_cond if first_only else self._cond).wait(wait)

    def done(self, key: str) -> None:
        with self._cond:
            self._processing.discard(key)
            self._taken_when_idle.discard(key)
            started = self._started_at.pop(key, None)
            if started is not None:
                metrics.WORKQUEUE_WORK_DURATION.labels(name=self.name).observe(self._clock() - started)
            if key in self._dirty:  # added again while it was being worked on
                self._queue_in(key, self._dirty[key])

    def shutdown(self) -> None:
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()
            self._first_cond.notify_all()

    def running_s(self) -> list[float]:
        """How long each key now held by a worker has been held, in seconds."""
        with self._cond:
            now = self._clock()
            return [now - started for started in self._started_at.values()]

    def others_wait(self, key: str) -> bool:
        """For the worker holding `key`: whether it should leave what nobody waits for to a pass when idle, as other
        keys wait in the first or the plain lane, or a key (this one too) came less than `quiet_s` ago, so a burst
        may be under way. Never for a key it took from the when-idle lane: that pass is the one it was left to."""
        with self._cond:
            if key in self._taken_when_idle:
                return False
            return bool(self._lanes[FIRST] or self._lanes[PLAIN]) or self._clock() - self._last_added_at < self._quiet_s

    def __len__(self) -> int:
        with self._cond:
            return sum(map(len, self._lanes))

    # internals --------------------------------------------------------------------------------

    def _idle_opens_in(self) -> float:
        """Seconds until the when-idle lane may be served (<= 0: now): once no key has come for `quiet_s`, or its
        oldest key has waited `idle_wait_max_s`."""
        now = self._clock()
        opens_in = self._last_added_at + self._quiet_s - now
        if opens_in > 0 and self._lanes[WHEN_IDLE]:
            # A key in this lane has been in no other since it was last handed out: it came when it was added.
            oldest = self._added_at[self._lanes[WHEN_IDLE][0]]
            opens_in = min(opens_in, oldest + self._idle_wait_max_s - now)
        return opens_in

    def _promote_due(self) -> None:
        now = self._clock()
        while self._waiting and self._waiting[0][0] <= now:
            due, _, key = heapq.heappop(self._waiting)
            if self._due.get(key) == due:
                del self._due[key]
                self._add_locked(key)

    def _notify(self, lane: int) -> None:
        """Wake a worker that may take a key just queued in `lane`."""
        if lane == FIRST:
            self._first_cond.notify()
        self._cond.notify()

    def _publish_depth(self) -> None:
        metrics.WORKQUEUE_DEPTH.labels(name=self.name).set(sum(map(len, self._lanes)))
