"""The informer against the real API server: cache, events, relist after 410 or a dropped connection, absent
CRDs, stop."""

from __future__ import annotations

import queue
import time

import kubernetes
import pytest

from gpu_provisioner.api.claims import NODECLAIM
from gpu_provisioner.runtime.informer import NODES, Informer, Resource, _Gone
from tests.integration.harness import Claims, kaito_claim, wait_for

NODECLAIMS = Resource("karpenter.sh", "v1", "nodeclaims", "NodeClaim")


def recorder() -> tuple[queue.Queue[tuple[str, str]], object]:
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    return events, lambda kind, obj: events.put((kind, obj["metadata"]["name"]))


def next_for(events: queue.Queue[tuple[str, str]], name: str, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kind, seen = events.get(timeout=deadline - time.monotonic())
        if seen == name:
            return kind
    raise AssertionError(f"no event for {name}")


def test_node_cache_follows_add_modify_delete(kube_api, unique_name):
    events, handler = recorder()
    informer = Informer(kube_api, NODES, handler, watch_timeout_s=5)
    informer.start()
    try:
        assert informer.wait_for_sync(10)
        core = kubernetes.client.CoreV1Api(kube_api)
        core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": unique_name}})
        assert next_for(events, unique_name) == "ADDED"
        core.patch_node(unique_name, {"metadata": {"labels": {"step": "2"}}})
        assert next_for(events, unique_name) == "MODIFIED"
        assert informer.get(unique_name)["metadata"]["labels"]["step"] == "2"
        assert informer.get(unique_name)["kind"] == "Node"
        core.delete_node(unique_name)
        assert next_for(events, unique_name) == "DELETED"
        assert informer.get(unique_name) is None
    finally:
        started = time.monotonic()
        informer.stop()
        assert time.monotonic() - started < 2


def test_claim_cache_lists_existing_objects_first(kube_api, claims: Claims, unique_name):
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    events, handler = recorder()
    informer = Informer(kube_api, NODECLAIMS, handler)
    informer.start()
    try:
        assert informer.wait_for_sync(10)
        assert informer.get(unique_name)["spec"]["nodeClassRef"]["kind"] == "KaitoNodeClass"
        assert next_for(events, unique_name) == "ADDED"
    finally:
        informer.stop()


def test_relist_after_410_reports_what_was_deleted_during_the_gap(kube_api, unique_name):
    events, handler = recorder()
    informer = Informer(kube_api, NODES, handler)
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": unique_name}})
    informer._relist()
    assert next_for(events, unique_name) == "ADDED"
    core.delete_node(unique_name)  # while no watch runs
    with pytest.raises(_Gone):  # resuming from a resourceVersion the server no longer has
        informer._watch("1")
    informer._relist()
    assert next_for(events, unique_name) == "DELETED"
    assert informer.get(unique_name) is None


def test_a_dropped_watch_connection_loses_no_event(kube_api, unique_name):
    events, handler = recorder()
    informer = Informer(kube_api, NODES, handler)
    core = kubernetes.client.CoreV1Api(kube_api)
    first, second = f"{unique_name}a", f"{unique_name}b"
    informer.start()
    try:
        assert informer.wait_for_sync(10)
        core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": first}})
        assert next_for(events, first) == "ADDED"
        informer._response.shutdown()  # the connection drops (a proxy, an API server restart)
        core.delete_node(first)
        core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": second}})
        seen: set[tuple[str, str]] = set()

        def both_told() -> bool:
            while not events.empty():
                seen.add(events.get())
            return {("DELETED", first), ("ADDED", second)} <= seen

        wait_for("the deletion and the addition made while disconnected", both_told, timeout_s=15)
        assert informer.get(first) is None and informer.get(second) is not None
    finally:
        informer.stop()
        core.delete_node(second)


def test_resource_without_crd_becomes_available_when_the_crd_appears(kube_api, unique_name):
    group = f"{unique_name}.gpu-provisioner.dev"
    informer = Informer(kube_api, Resource(group, "v1", "widgets", "Widget"), lambda *_: None, absent_recheck_s=0.5)
    informer.start()
    extensions = kubernetes.client.ApiextensionsV1Api(kube_api)
    try:
        wait_for("the informer to notice the resource is absent", lambda: not informer.available, timeout_s=10)
        assert not informer.has_synced
        extensions.create_custom_resource_definition({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"widgets.{group}"},
            "spec": {"group": group, "scope": "Cluster",
                     "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                     "versions": [{"name": "v1", "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": {"type": "object"}}}]},
        })
        wait_for("the informer to sync once the CRD is served", lambda: informer.has_synced and informer.available,
                 timeout_s=30)
    finally:
        informer.stop()
        extensions.delete_custom_resource_definition(f"widgets.{group}")
