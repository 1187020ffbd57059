"""The Event recorder against the real API server: repeats are counted, and what it remembers is bounded."""

from __future__ import annotations

import socket
import uuid

import kubernetes
from structlog.testing import capture_logs

from gpu_provisioner.runtime.events import EVENT_NAMESPACE, EventRecorder


def test_remembers_a_bounded_number_of_events_and_counts_a_forgotten_repeat_on(kube_api, unique_name):
    recorder = EventRecorder(kube_api, remembered=3)
    claim = {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
             "metadata": {"name": unique_name, "uid": str(uuid.uuid4())}}
    for step in range(5):
        recorder.normal(claim, "Step", f"step {step}")
    recorder.normal(claim, "Step", "step 4")
    assert recorder.flush(30)
    assert len(recorder._counts) == 3
    recorder.normal(claim, "Step", "step 0")  # forgotten here, still on the server: counted on, not refused
    assert recorder.flush(30)
    assert len(recorder._counts) == 3
    events = kubernetes.client.CoreV1Api(kube_api).list_namespaced_event(
        EVENT_NAMESPACE, field_selector=f"involvedObject.name={unique_name}").items
    counts = {e.message: e.count for e in events}
    assert counts == {"step 0": 2, "step 1": 1, "step 2": 1, "step 3": 1, "step 4": 2}


def test_recording_does_not_wait_for_a_stalled_api_server_and_drops_past_its_backlog(unique_name):
    """A worker that records an Event goes on at once, even when the API server takes the connection and never
    answers; past the bounded backlog an Event is dropped and said, not queued without end."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(16)  # accepts connections (the kernel does), never answers
        config = kubernetes.client.Configuration()
        config.host = f"http://127.0.0.1:{stalled.getsockname()[1]}"
        recorder = EventRecorder(kubernetes.client.ApiClient(config), backlog=2)
        claim = {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
                 "metadata": {"name": unique_name, "uid": str(uuid.uuid4())}}
        with capture_logs() as logs:
            for step in range(5):
                recorder.warning(claim, "Step", f"step {step}")  # the first is sent (and stalls), two wait
            assert not recorder.flush(0.5)
        dropped = [entry for entry in logs if entry["event"].startswith("event dropped")]
        assert 2 <= len(dropped) <= 3, logs  # 5 - 1 in flight (if the sender took it yet) - 2 queued
