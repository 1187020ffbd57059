"""When each scenario step of each simulated pool was due and when the simulator carried it out, so that a
benchmark can tell the simulator's own lag from the controller's time. Times are time.monotonic()."""

from __future__ import annotations

import threading
from dataclasses import dataclass

# The steps of a pool's life, in order.
PUT = "put"  # the PUT that created the pool reached the simulator (due: when it arrived)
CREATED = "created"  # its create operation ended (AllocationFailed too)
NODE_JOINED = "node-joined"  # its Node was created in the API server
NODE_READY = "node-ready"  # the Node turned Ready
GPUS_PUBLISHED = "gpus-published"  # the Node's GPUs are allocatable: the node is GPU-ready
DELETE = "delete"  # the DELETE reached the simulator
DELETED = "deleted"  # its delete operation succeeded
NODE_DELETED = "node-deleted"  # its Node was deleted from the API server


@dataclass(frozen=True)
class Step:
    due: float  # when the scenario's delays put it
    at: float  # when the simulator had carried it out
    # Of the lag, the simulator's own: the step was due, and its pool's step before it done, but it had not started
    # (no worker free, the scheduler late). The rest is the API server answering its writes, this one's and those
    # before it in the pool.
    own_lag_s: float = 0.0

    @property
    def lag_s(self) -> float:
        return self.at - self.due


class Timeline:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, str], dict[str, Step]] = {}

    def record(self, cluster: str, pool: str, step: str, due: float, at: float, own_lag_s: float | None = None) -> None:
        """`own_lag_s`: the simulator's own part of the lag (None: all of it, for steps that make no write)."""
        with self._lock:
            if step == PUT:  # a pool made again under the same name starts a new life
                self._pools[(cluster, pool)] = {}
            own = at - due if own_lag_s is None else own_lag_s
            self._pools.setdefault((cluster, pool), {})[step] = Step(due, at, own)

    def pools(self, cluster: str) -> dict[str, dict[str, Step]]:
        """Each pool of `cluster` ever made (its last life): its steps so far."""
        with self._lock:
            return {name: dict(steps) for (c, name), steps in self._pools.items() if c == cluster}
