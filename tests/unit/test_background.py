"""Calls run off the workers: one per key, the key woken when its call ends, the outcome taken once."""

from __future__ import annotations

import threading
import time

import pytest

from gpu_provisioner.runtime.background import BackgroundCalls


def test_with_no_threads_a_call_runs_at_once_and_its_outcome_is_there_to_take():
    woken: list[str] = []
    calls = BackgroundCalls(0, woken.append)
    calls.start("k", lambda: 42, "context")
    taken = calls.take("k")
    assert taken is not None and taken.future.result() == 42 and taken.context == "context"
    assert woken == [] and calls.get("k") is None


def test_a_call_on_a_thread_is_taken_only_once_it_ended_and_its_end_wakes_the_key():
    woken = threading.Event()
    calls = BackgroundCalls(2, lambda key: woken.set() if key == "k" else None)
    answer = threading.Event()
    calls.start("k", lambda: answer.wait(10) and "accepted")
    assert calls.get("k") is not None and not calls.get("k").ended
    assert calls.take("k") is None and calls.pending() == 1  # still running: nothing to take
    with pytest.raises(RuntimeError):
        calls.start("k", lambda: None)  # one call a key
    answer.set()
    assert woken.wait(10)
    taken = calls.take("k")
    assert taken is not None and taken.future.result() == "accepted"
    assert calls.take("k") is None


def test_a_failed_call_hands_its_error_to_whoever_takes_it():
    woken = threading.Event()
    calls = BackgroundCalls(1, lambda key: woken.set())

    def refused() -> None:
        raise ValueError("refused")

    calls.start("k", refused)
    assert woken.wait(10)
    with pytest.raises(ValueError, match="refused"):
        calls.take("k").future.result()


def test_no_more_calls_run_at_once_than_threads_and_every_call_ends():
    lock, running = threading.Lock(), [0]
    release = threading.Event()
    ended: list[str] = []
    all_ended = threading.Event()

    def call() -> None:
        with lock:
            running[0] += 1
        release.wait(10)

    def wake(key: str) -> None:
        ended.append(key)
        if len(ended) == 6:
            all_ended.set()

    calls = BackgroundCalls(2, wake, name="bounded")
    for index in range(6):
        calls.start(f"k{index}", call)
    deadline = time.monotonic() + 10
    while running[0] < 2:  # none can end before the release
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len([thread for thread in threading.enumerate() if thread.name.startswith("bounded-")]) == 2
    assert running[0] == 2 and calls.pending() == 6  # four wait for a thread
    release.set()
    assert all_ended.wait(10)
    assert sorted(ended) == [f"k{index}" for index in range(6)] and running[0] == 6 and calls.pending() == 0


def test_calls_started_together_get_threads_of_their_own_while_one_thread_idles():
    lock, running = threading.Lock(), [0]
    release = threading.Event()
    calls = BackgroundCalls(4, lambda key: None, name="warm")
    calls.start("warm-up", lambda: None)
    deadline = time.monotonic() + 10
    while calls.take("warm-up") is None:  # one thread now waits for work
        assert time.monotonic() < deadline
        time.sleep(0.01)

    def call() -> None:
        with lock:
            running[0] += 1
        release.wait(10)

    calls.start("a", call)
    calls.start("b", call)  # before the idle thread took "a"
    while running[0] < 2:
        assert time.monotonic() < deadline, "the two calls did not run at once"
        time.sleep(0.01)
    release.set()
