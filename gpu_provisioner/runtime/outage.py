"""One log line when the API server becomes unreachable and one when it is back, however many reconciles
fail in between: a restart of the API server is an outage to report, not a crash per claim."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class Outage:
    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = self._clock()
        log.warning(f"{self.what} unreachable; retrying", error=str(error)[:300])

    def ended(self) -> None:
        if self._since is None:
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            log.info(f"{self.what} reachable again", outage_s=round(self._clock() - since, 1))
