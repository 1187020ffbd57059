"""An API-server outage is one warning and one recovery line, not a line per failed reconcile."""

from __future__ import annotations

from structlog.testing import capture_logs

from gpu_provisioner.runtime.outage import Outage


def test_an_outage_is_said_once_and_its_end_once():
    now = [100.0]
    outage = Outage("API server", clock=lambda: now[0])
    with capture_logs() as logs:
        outage.ended()  # nothing to end
        for _ in range(50):
            outage.failed(ConnectionRefusedError("connection refused"))
        now[0] = 112.5
        outage.ended()
        outage.ended()
    assert [(entry["log_level"], entry["event"]) for entry in logs] == [
        ("warning", "API server unreachable; retrying"), ("info", "API server reachable again")]
    assert logs[1]["outage_s"] == 12.5 and not outage.ongoing
