"""The simulator's timeline tells its own lag from the time its writes waited for the API server."""

from __future__ import annotations

import time
from collections import deque

import kubernetes
from kubernetes.client import ApiException

from gpu_provisioner.sim import timeline
from gpu_provisioner.sim.nodes import NodeMaterialiser
from gpu_provisioner.sim.scenario import Scenario


def test_a_step_held_up_by_the_slow_write_before_it_is_not_counted_as_the_simulators_own_lag():
    steps = timeline.Timeline()
    kubelet = NodeMaterialiser(kubernetes.client.ApiClient(), Scenario(), "subscription", settle=lambda: None,
                               steps=steps)
    lane = ("cluster", "pool")

    def slow_join() -> None:  # the API server takes 0.3 s to answer the Node's create
        time.sleep(0.3)
        kubelet._done(timeline.NODE_JOINED)

    now = time.monotonic()
    kubelet._lanes[lane] = deque([(now, slow_join), (now + 0.1, lambda: kubelet._done(timeline.NODE_READY))])
    kubelet._drain(lane)
    joined, ready = (steps.pools("cluster")["pool"][step] for step in (timeline.NODE_JOINED, timeline.NODE_READY))
    assert joined.lag_s >= 0.3 and joined.own_lag_s < 0.05
    # Due 0.1 s after the join, it could only start once the join's write was answered: late by 0.2 s, none of it
    # the simulator's.
    assert ready.lag_s >= 0.2 and ready.own_lag_s < 0.05
    assert not kubelet._lanes


def test_a_write_turned_away_with_429_is_tried_again_after_its_retry_after_and_the_steps_keep_their_order():
    kubelet = NodeMaterialiser(kubernetes.client.ApiClient(), Scenario(), "subscription", settle=lambda: None)
    lane, done = ("cluster", "pool"), []
    throttled = ApiException(status=429, reason="Too Many Requests")
    throttled.headers = {"Retry-After": "0.2"}

    def join() -> None:
        done.append(("join", time.monotonic()))
        if len(done) == 1:
            raise throttled

    started = time.monotonic()
    kubelet._lanes[lane] = deque([(started, join), (started, lambda: done.append(("ready", time.monotonic())))])
    kubelet._drain(lane)
    assert [step for step, _ in done] == ["join", "join", "ready"]
    assert done[1][1] - done[0][1] >= 0.2
