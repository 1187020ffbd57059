"""What the informer keeps of each object (its watch and cache run against the real API server in
tests/integration/test_informer.py)."""

from __future__ import annotations

import json

from gpu_provisioner.runtime.informer import SHARED_STRING_MAX, shared_strings


def node(name: str) -> str:
    return json.dumps({"metadata": {"name": name, "labels": {"kubernetes.azure.com/agentpool": "gpu", "zone": "1"}},
                       "status": {"conditions": [{"type": "Ready", "status": "True", "message": "m" * 100}]}})


def test_cached_objects_share_their_keys_and_short_strings_and_stay_equal():
    first, second = json.loads(node("a")), json.loads(node("b"))
    kept_first, kept_second = shared_strings(first), shared_strings(second)
    assert (kept_first, kept_second) == (first, second)
    labels_first, labels_second = kept_first["metadata"]["labels"], kept_second["metadata"]["labels"]
    key_first, key_second = next(iter(labels_first)), next(iter(labels_second))
    assert key_first is key_second  # one string, where each parse made its own
    assert labels_first[key_first] is labels_second[key_second]
    ready_first, ready_second = kept_first["status"]["conditions"][0], kept_second["status"]["conditions"][0]
    assert ready_first["status"] is ready_second["status"]
    # Long strings (messages, annotations' contents) are rarely shared: left as they are.
    assert len(ready_first["message"]) > SHARED_STRING_MAX and ready_first["message"] is not ready_second["message"]
