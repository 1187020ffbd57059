"""Waiting for the operator's Ctrl-C or the kubelet's SIGTERM, shared by every long-running command."""

from __future__ import annotations

import signal
import threading


def wait_for_interrupt() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
