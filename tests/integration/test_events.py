"""The Event recorder against the real API server: repeats are counted, and what it remembers is bounded."""

from __future__ import annotations

import uuid

import kubernetes

from gpu_provisioner.runtime.events import EVENT_NAMESPACE, EventRecorder


def test_remembers_a_bounded_number_of_events_and_counts_a_forgotten_repeat_on(kube_api, unique_name):
    recorder = EventRecorder(kube_api, remembered=3)
    claim = {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
             "metadata": {"name": unique_name, "uid": str(uuid.uuid4())}}
    for step in range(5):
        recorder.normal(claim, "Step", f"step {step}")
    recorder.normal(claim, "Step", "step 4")
    assert len(recorder._counts) == 3
    recorder.normal(claim, "Step", "step 0")  # forgotten here, still on the server: counted on, not refused
    assert len(recorder._counts) == 3
    events = kubernetes.client.CoreV1Api(kube_api).list_namespaced_event(
        EVENT_NAMESPACE, field_selector=f"involvedObject.name={unique_name}").items
    counts = {e.message: e.count for e in events}
    assert counts == {"step 0": 2, "step 1": 1, "step 2": 1, "step 3": 1, "step 4": 2}
