"""Waiting for the operator's Ctrl-C or the kubelet's SIGTERM, shared by every long-running command."""

from __future__ import annotations

import signal
import socket


def do_nothing(*_: object) -> None:
    """A signal handler that only lets the signal interrupt a blocking call and wake the wakeup fd."""


def wait_for_interrupt(signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Block until one of `signals` comes (by default SIGINT or SIGTERM).

    The handlers do nothing; the signal itself wakes this wait, through the interpreter's wakeup fd. A handler
    that took a lock (such as Event.set) deadlocked against itself when a second signal came while the first
    one's handler held that lock: a controller whose parent died (PR_SET_PDEATHSIG) then never ended."""
    woken, waker = socket.socketpair()
    waker.setblocking(False)
    previous_fd = signal.set_wakeup_fd(waker.fileno())
    try:
        for sig in signals:
            signal.signal(sig, do_nothing)
        woken.recv(1)
    finally:
        signal.set_wakeup_fd(previous_fd)
        woken.close()
        waker.close()
