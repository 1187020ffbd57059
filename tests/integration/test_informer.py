"""The informer against the real API server: cache, events, relist after 410 or a dropped connection, absent
CRDs, stop."""

from __future__ import annotations

import json
import queue
import time

import kubernetes
import pytest

from gpu_provisioner.api.claims import NODECLAIM, Claim
from gpu_provisioner.cloud.pool_request import MACHINE_TYPE_LABEL
from gpu_provisioner.lifecycle.nodes import NodeCache
from gpu_provisioner.runtime import informer as informer_module
from gpu_provisioner.runtime.informer import NODES, Informer, Resource, _Gone
from gpu_provisioner.runtime.kube import Kube
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
        metadata = "metadata"  # interned by the compiler, as its identifier-like constants are
        # The cache keeps the interned string, not the copy the JSON parse made (shared_strings).
        assert any(key is metadata for key in informer.get(unique_name))
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


@pytest.mark.parametrize("metadata_only", [False, True])
def test_a_relist_reads_every_page(kube_api, unique_name, monkeypatch, metadata_only):
    """Lists are read a page at a time (whole objects in smaller pages than metadata): every page is read."""
    monkeypatch.setattr(informer_module, "LIST_PAGE_SIZE", 2)
    monkeypatch.setattr(informer_module, "METADATA_LIST_PAGE_SIZE", 2)
    core = kubernetes.client.CoreV1Api(kube_api)
    names = [f"{unique_name}-{index}" for index in range(5)]
    for name in names:
        core.create_node({"apiVersion": "v1", "kind": "Node",
                          "metadata": {"name": name, "labels": {"page": unique_name}}})
    informer = Informer(kube_api, NODES, lambda kind, obj: None, label_selector=f"page={unique_name}",
                        metadata_only=metadata_only)
    pages = []
    request = informer._request
    monkeypatch.setattr(informer, "_request", lambda query, *args: pages.append(dict(query)) or request(query, *args))
    try:
        informer._relist()
        assert sorted(informer.get(name)["metadata"]["name"] for name in names) == names
        assert len(pages) == 3 and all(page["limit"] == 2 for page in pages) and "continue" in pages[-1]
    finally:
        for name in names:
            core.delete_node(name)


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


def realistic_node(name: str, labels: dict[str, str], provider_id: str) -> dict:
    """What an AKS node carries besides what the controller reads: tens of images, addresses, node info."""
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux", **labels}},
        "spec": {"providerID": provider_id},
        "status": {
            "images": [{"names": [f"mcr.microsoft.com/image-{i}:v{i}"], "sizeBytes": 1000 * i} for i in range(25)],
            "addresses": [{"type": "InternalIP", "address": "10.224.0.4"}, {"type": "Hostname", "address": name}],
            "capacity": {"cpu": "8", "nvidia.com/gpu": "1"}, "allocatable": {"cpu": "7800m", "nvidia.com/gpu": "1"},
        },
    }


def test_node_cache_keeps_foreign_nodes_as_stubs_and_finds_a_claims_nodes_after_a_relist(kube_api, unique_name):
    """A CPU node of another pool is watched as metadata and kept as a stub; gpu-provisioner's node whole but without
    its image list; a node of the claim's pool without gpu-provisioner's label (made before an upgrade) is found and
    read whole when looked up. The indexes find them again after a relist."""
    core = kubernetes.client.CoreV1Api(kube_api)
    ours, legacy, foreign = f"{unique_name}-gpu", f"{unique_name}-old", f"{unique_name}-cpu"
    pool_label = "kubernetes.azure.com/agentpool"
    for name, labels in ((ours, {pool_label: unique_name, MACHINE_TYPE_LABEL: "gpu"}),
                         (legacy, {pool_label: f"{unique_name}o"}),
                         (foreign, {pool_label: "nodepool1"})):
        manifest = realistic_node(name, labels, f"azure:///subscriptions/s/vm/{name}")
        core.create_node(manifest)
        core.patch_node_status(name, {"status": manifest["status"]})
    nodes = NodeCache(kube_api, lambda event_type, node: None)
    for informer in nodes.informers:
        informer.start()
    try:
        assert all(informer.wait_for_sync(10) for informer in nodes.informers)
        wait_for("the nodes' status in the cache", lambda: (nodes.ours.get(ours) or {}).get("status", {}).get(
            "allocatable"))
        cached_foreign = nodes.others.get(foreign)
        assert set(cached_foreign) == {"apiVersion", "kind", "metadata"} and nodes.ours.get(foreign) is None
        assert cached_foreign["metadata"]["labels"] == {pool_label: "nodepool1"}
        assert "managedFields" not in str(cached_foreign)
        cached_ours = nodes.ours.get(ours)
        assert nodes.others.get(ours) is None and "images" not in cached_ours["status"]
        assert "managedFields" not in cached_ours["metadata"] and cached_ours["status"]["addresses"]

        def claim(name: str, provider_id: str = "") -> Claim:
            manifest = kaito_claim(NODECLAIM, name)
            manifest["metadata"]["uid"] = name
            if provider_id:
                manifest["status"] = {"providerID": provider_id}
            return Claim(NODECLAIM, manifest)

        for _ in range(2):  # before and after a relist
            assert [n["metadata"]["name"] for n in nodes.nodes_for(claim(unique_name))] == [ours]
            found = nodes.nodes_for(claim("other", provider_id=f"azure:///subscriptions/s/vm/{ours}"))
            assert [n["metadata"]["name"] for n in found] == [ours]
            found = nodes.nodes_for(claim(f"{unique_name}o"))
            assert [n["metadata"]["name"] for n in found] == [legacy] and found[0]["status"]["allocatable"]
            assert "images" not in found[0]["status"] and "status" not in nodes.others.get(legacy)
            assert nodes.nodes_for(claim("nobody")) == []
            for informer in nodes.informers:
                informer._relist()
        assert set(nodes.others.get(foreign)) == {"apiVersion", "kind", "metadata"}
    finally:
        for informer in nodes.informers:
            informer.stop()
        for name in (ours, legacy, foreign):
            core.delete_node(name)


@pytest.fixture
def watched_node(kube_api, unique_name):
    """An Informer of Nodes (indexed by their "step" label), this test's Node in it, and the queue of that Node's
    events as (type, its "step" label)."""
    events: queue.Queue[tuple[str, str]] = queue.Queue()

    def handler(kind: str, obj: dict) -> None:
        if obj["metadata"]["name"] == unique_name:
            events.put((kind, (obj["metadata"].get("labels") or {}).get("step", "")))

    informer = Informer(kube_api, NODES, handler, indexers={"step": lambda n: [n["metadata"].get("labels", {}).get(
        "step", "")]})
    informer.start()
    core = kubernetes.client.CoreV1Api(kube_api)
    try:
        assert informer.wait_for_sync(10)
        core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": unique_name}})
        assert events.get(timeout=10) == ("ADDED", "")
        yield informer, events
    finally:
        informer.stop()
        core.delete_node(unique_name)


def relabel(kube_api, name: str, step: str) -> dict:
    """Someone else's write (or ours, sent around Kube): the Node's "step" label set; the answer as JSON."""
    core = kubernetes.client.CoreV1Api(kube_api)
    answer = core.patch_node(name, {"metadata": {"labels": {"step": step}}}, _preload_content=False)
    return json.loads(answer.data)


def cached_step(informer: Informer, name: str) -> str:
    return informer.get(name)["metadata"].get("labels", {}).get("step", "")


def test_our_own_writes_wake_no_one_and_are_served_at_once(kube_api, unique_name, watched_node):
    """A write's answer is served by get and by_index at once; its echo from the watch emits no event, whichever
    comes first, while another writer's change does."""
    informer, events = watched_node
    kube = Kube(kube_api, node_observer=informer)
    before = ""
    for attempt in range(5):
        kube.patch_node(unique_name, {"metadata": {"labels": {"step": f"ours-{attempt}"}}})
        assert cached_step(informer, unique_name) == f"ours-{attempt}"
        served = [node for key in (before, f"ours-{attempt}") for node in informer.by_index("step", key)]
        assert served and all(node["metadata"]["labels"]["step"] == f"ours-{attempt}" for node in served)
        before = f"ours-{attempt}"
    # Someone else's, after ours: the only event that comes.
    relabel(kube_api, unique_name, "theirs")
    assert events.get(timeout=10) == ("MODIFIED", "theirs")
    assert cached_step(informer, unique_name) == "theirs"
    with pytest.raises(queue.Empty):
        events.get(timeout=1)


def test_the_echo_of_a_write_whose_answer_comes_after_it_wakes_no_one(kube_api, unique_name, watched_node):
    informer, events = watched_node
    with informer.writing(unique_name):
        answer = relabel(kube_api, unique_name, "ours")
        wait_for("the watch to bring the write", lambda: cached_step(informer, unique_name) == "ours", 10, 0.05)
        informer.remember_write(answer)
    with pytest.raises(queue.Empty):
        events.get(timeout=1)


def test_a_change_made_while_our_write_is_in_flight_is_sent_on_when_it_ends(kube_api, unique_name, watched_node):
    """Held while our write is answered, then sent as one event with the newest state; so too when our write
    fails (no answer)."""
    informer, events = watched_node
    with informer.writing(unique_name):
        relabel(kube_api, unique_name, "theirs")
        answer = relabel(kube_api, unique_name, "ours")
        wait_for("the watch to bring both", lambda: cached_step(informer, unique_name) == "ours", 10, 0.05)
        assert events.empty()
        informer.remember_write(answer)
    assert events.get(timeout=1) == ("MODIFIED", "ours")
    with informer.writing(unique_name):
        relabel(kube_api, unique_name, "theirs-again")
        wait_for("the watch to bring it", lambda: cached_step(informer, unique_name) == "theirs-again", 10, 0.05)
        assert events.empty()
    assert events.get(timeout=1) == ("MODIFIED", "theirs-again")
    with pytest.raises(queue.Empty):
        events.get(timeout=1)
