"""The short chaos run (tests/integration/chaos.py; the long one is `make chaos ARGS=...`): leader kills during
creates and deletes, an API-server restart, an ARM fault storm with lost answers, create-then-delete bursts under
CPU load, Karpenter's claims beside Kaito's. Nothing leaks, nothing is made twice, nothing is stuck or taken."""

from __future__ import annotations

from rich.console import Console

from tests.integration.chaos import Chaos, ChaosOptions, report


def test_short_chaos_run_leaks_nothing_duplicates_nothing_and_touches_nothing_foreign(control_plane, kube_api):
    options = ChaosOptions()
    console = Console(width=120)
    figures = Chaos(control_plane, kube_api, options, console).run()
    report(figures, options, console)
    assert figures.kills > 0 and figures.apiserver_restarts > 0
    assert figures.failures() == dict.fromkeys(figures.failures(), 0), figures
