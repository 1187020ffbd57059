"""Calls a worker must not wait for, run on threads of their own, at most one per key at a time.

ARM takes a second or more to answer a write: a worker that waited for each PUT or DELETE would make every other
claim wait too, and a burst of launches would go at the pace of the workers. A pass starts the call and ends; when
the call ends, its key is queued again (`wake`), and the key's next pass takes the outcome (`take`).

The threads are daemons, started as calls come up to `threads`: a call to a service that no longer answers must not
keep the process from ending (a ThreadPoolExecutor joins its threads at exit). With `threads=0` every call runs at
once on the caller's thread, so its outcome is there to take in the same pass.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Call:
    """One call for one key: `context` is what its caller needs to read the outcome, `future` the outcome."""

    call: Callable[[], Any]
    context: Any
    future: Future[Any] = field(default_factory=Future)

    @property
    def ended(self) -> bool:
        return self.future.done()

    def run(self) -> None:
        try:
            self.future.set_result(self.call())
        except BaseException as error:  # any outcome at all, or the key would wait for it forever
            self.future.set_exception(error)


class BackgroundCalls:
    def __init__(self, threads: int, wake: Callable[[str], None], name: str = "background") -> None:
        self._limit, self._wake, self._name = threads, wake, name
        self._lock = threading.Condition()
        self._calls: dict[str, Call] = {}  # key -> its call, until its outcome is taken
        self._todo: deque[str] = deque()
        self._threads = 0
        self._idle = 0

    def start(self, key: str, call: Callable[[], Any], context: Any = None) -> None:
        """Run `call` for `key`; the key must have no call whose outcome was not taken."""
        entry = Call(call, context)
        with self._lock:
            if key in self._calls:
                raise RuntimeError(f"{key} has a call whose outcome was not taken")
            self._calls[key] = entry
            if self._limit == 0:
                inline = True
            else:
                inline = False
                self._todo.append(key)
                # More calls waiting than idle threads to take them (an idle thread counts as such until it wakes).
                if len(self._todo) > self._idle and self._threads < self._limit:
                    self._threads += 1
                    threading.Thread(target=self._serve, name=f"{self._name}-{self._threads}", daemon=True).start()
                self._lock.notify()
        if inline:
            entry.run()

    def get(self, key: str) -> Call | None:
        """The call of `key` whose outcome was not taken, ended or not."""
        with self._lock:
            return self._calls.get(key)

    def pending(self) -> int:
        """How many calls have not ended, running or waiting for a thread."""
        with self._lock:
            return sum(not entry.ended for entry in self._calls.values())

    def take(self, key: str) -> Call | None:
        """The ended call of `key`, which is then forgotten; None if it has none or it still runs."""
        with self._lock:
            entry = self._calls.get(key)
            if entry is None or not entry.ended:
                return None
            return self._calls.pop(key)

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
                while not self._todo:
                    self._lock.wait()
                self._idle -= 1
                key = self._todo.popleft()
                entry = self._calls[key]
            entry.run()
            self._wake(key)
