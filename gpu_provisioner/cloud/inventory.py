"""What the cluster's agent pools look like, from one LIST per interval shared by every claim.

ARM throttles per subscription, and a GPU fleet in flight must not spend a GET per claim per poll.
Claims read pool state from here; the refresher lists, compares, and reports each pool whose state
changed so that only the claims concerned are reconciled. Writes of our own (a PUT or DELETE just
accepted) are recorded at once, so a claim never acts on a LIST older than its own write.

A pool a claim waits on (being deleted, or still creating under a claim being deleted) is followed: looked at
when ARM's Retry-After for its DELETE says (every few seconds without one), and again as often, rather than a
whole interval later, until its operation is over. One LIST serves every pool due by then, and LISTs are spaced
by at least a quarter of that pace, so a burst of deletions costs a few LISTs, not one a pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gpu_provisioner.cloud.agentpools import AgentPools, ClusterState, PoolState
from gpu_provisioner.cloud.errors import CloudError, TransientError

log = structlog.get_logger(__name__)
# How often a followed pool is LISTed when ARM gives no Retry-After, and the least it may ask for.
FOLLOW_S = 2.0
MIN_FOLLOW_S = 1.0
# LISTs for followed pools come at least this share of their pace apart: pools due at different moments share one.
FOLLOW_SPACING_SHARE = 0.25


@dataclass
class _Followed:
    every_s: float  # how often to look
    due: float  # when to look next (clock)


class PoolInventory:
    def __init__(
        self,
        pools: AgentPools,
        interval_s: float,
        on_change: Callable[[PoolState | None, PoolState | None], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pools = pools
        self.interval_s = interval_s
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, PoolState] = {}
        # Our own writes (None: the pool is known not to exist) and when they were recorded.
        self._recorded: dict[str, tuple[float, PoolState | None]] = {}
        self._listed_at = float("-inf")
        self._cluster: ClusterState | None = None
        self._cluster_read_at = float("-inf")
        self._cluster_read = threading.Lock()
        # Pools a claim waits on, while their operation lasts.
        self._followed: dict[str, _Followed] = {}
        # When the refresher lists next; moved earlier by request_refresh and by deletions in flight.
        self._plan = threading.Condition()
        self._next_list_at = float("-inf")
        # Why the last LIST failed (None once one succeeds), for claims waiting on a first LIST.
        self.list_error: CloudError | None = None
        # Set once the first LIST has answered, either way: until then a claim can only wait.
        self.first_answer = threading.Event()

    # reads ------------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._listed_at > float("-inf")

    def get(self, name: str) -> PoolState | None:
        with self._lock:
            return self._states.get(name)

    def all(self) -> list[PoolState]:
        with self._lock:
            return list(self._states.values())

    def listed_since(self, moment: float) -> bool:
        """Whether a LIST started after `moment`, so an absent pool in it is really gone."""
        return self._listed_at > moment

    def now(self) -> float:
        return self._clock()

    def cluster(self) -> ClusterState:
        """The managed cluster's state, read at most once per interval: workers that ask while it is being read
        wait for that answer rather than each sending a GET of its own."""
        with self._cluster_read:
            if self._cluster is None or self._clock() - self._cluster_read_at >= self.interval_s:
                self._cluster, self._cluster_read_at = self._pools.cluster(), self._clock()
            return self._cluster

    # writes of our own ------------------------------------------------------------------------

    def record(self, state: PoolState) -> None:
        with self._lock:
            self._put(state.name, state)

    def reserve(self, state: PoolState) -> PoolState | None:
        """Take the pool name for `state`'s claim before its PUT; returns the pool of another claim that
        holds the name instead. Atomic, so two claims of one name (a Machine and a NodeClaim) never both
        send a PUT: the second would update the first one's pool."""
        with self._lock:
            current = self._states.get(state.name)
            if current is not None and current.claim_key != state.claim_key:
                return current
            self._put(state.name, state)
            return None

    def release(self, state: PoolState) -> None:
        """Undo `reserve` after a PUT that AKS certainly did not carry out."""
        with self._lock:
            if self._states.get(state.name) == state:
                del self._states[state.name]
                self._recorded[state.name] = (self._clock(), None)

    def _put(self, name: str, state: PoolState) -> None:
        self._states[name] = state
        self._recorded[name] = (self._clock(), state)

    def delete(self, pool: PoolState) -> None:
        """Start deleting `pool`, record it Deleting, and follow it at the pace ARM's Retry-After asks for."""
        check_after_s = self._pools.delete(pool.name)
        with self._lock:
            self._put(pool.name, PoolState(pool.name, "Deleting", pool.vm_size, pool.tags))
        self.follow(pool.name, check_after_s or FOLLOW_S, at_once=False)

    def follow(self, name: str, every_s: float = FOLLOW_S, at_once: bool = True) -> None:
        """LIST for pool `name` every `every_s` (the first look at once, or `every_s` from now unless `at_once`)
        until its create or delete is over; LISTs keep the spacing `_plan_follow_list` says."""
        every_s = min(max(every_s, MIN_FOLLOW_S), self.interval_s)
        now = self._clock()
        with self._lock:
            if name not in self._followed:  # asked again while followed: the look already planned stands
                self._followed[name] = _Followed(every_s, now if at_once else now + every_s)
        self._plan_follow_list()

    def _plan_follow_list(self) -> None:
        """Have the next LIST come when the first followed pool is due, but not sooner after the last one than
        the spacing allows."""
        with self._lock:
            if not self._followed:
                return
            spacing = FOLLOW_SPACING_SHARE * min(f.every_s for f in self._followed.values())
            at = max(min(f.due for f in self._followed.values()), self._listed_at + spacing)
        self.request_refresh(within_s=max(at - self._clock(), 0.0))

    def request_refresh(self, within_s: float = 0.0) -> None:
        """Ask for a LIST within `within_s` rather than at the end of the interval."""
        with self._plan:
            self._next_list_at = min(self._next_list_at, self._clock() + within_s)
            self._plan.notify_all()

    # the refresher ----------------------------------------------------------------------------

    def refresh(self) -> None:
        started = self._clock()
        listed = {state.name: state for state in self._pools.list()}
        with self._lock:
            # Writes recorded after this LIST began are newer than what it returned.
            for name, (recorded_at, state) in list(self._recorded.items()):
                if recorded_at < started:
                    del self._recorded[name]
                elif state is None:
                    listed.pop(name, None)
                else:
                    listed[name] = state
            previous, self._states = self._states, listed
            self._listed_at = started
            for name, followed in list(self._followed.items()):
                if name not in listed or not listed[name].operation_running:
                    del self._followed[name]
                elif followed.due <= started:  # looked at by this LIST: next time at its pace
                    followed.due = started + followed.every_s
        with self._plan:
            self._next_list_at = self._clock() + self.interval_s
        self._plan_follow_list()
        for name in previous.keys() | listed.keys():
            before, after = previous.get(name), listed.get(name)
            if before != after:
                self._on_change(before, after)

    def run(self, stop: threading.Event) -> None:
        """Refresh every interval until `stop` is set; errors are logged and retried next interval."""
        while not stop.is_set():
            try:
                self.refresh()
                self.list_error = None
                self.first_answer.set()
            except CloudError as error:
                self.list_error = error
                log.warning("agent pool list failed", error=error.describe(), error_class=error.reason)
                self.first_answer.set()
                with self._plan:
                    self._next_list_at = self._clock() + self.interval_s
                if isinstance(error, TransientError) and error.retry_after_s:
                    # ARM asked for a pause: claims asking for an early LIST must not cut it short.
                    stop.wait(error.retry_after_s)
            with self._plan:
                while not stop.is_set() and (wait := self._next_list_at - self._clock()) > 0:
                    self._plan.wait(wait)
