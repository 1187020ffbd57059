"""What the cluster's agent pools look like, from one LIST per interval shared by every claim.

ARM throttles per subscription, and a GPU fleet in flight must not spend a GET per claim per poll.
Claims read pool state from here; the refresher lists, compares, and reports each pool whose state
changed so that only the claims concerned are reconciled. Writes of our own (a PUT or DELETE just
accepted) are recorded at once, so a claim never acts on a LIST older than its own write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from gpu_provisioner.cloud.agentpools import AgentPools, ClusterState, PoolState
from gpu_provisioner.cloud.errors import CloudError, TransientError

log = structlog.get_logger(__name__)


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
        self._wake = threading.Event()
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
        """The managed cluster's state, read at most once per interval."""
        with self._lock:
            if self._cluster is not None and self._clock() - self._cluster_read_at < self.interval_s:
                return self._cluster
        state = self._pools.cluster()
        with self._lock:
            self._cluster, self._cluster_read_at = state, self._clock()
        return state

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

    def request_refresh(self) -> None:
        """Ask for the next LIST now rather than at the end of the interval."""
        self._wake.set()

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
                if isinstance(error, TransientError) and error.retry_after_s:
                    # ARM asked for a pause: claims asking for an early LIST must not cut it short.
                    stop.wait(error.retry_after_s)
            self._wake.wait(self.interval_s)
            self._wake.clear()
