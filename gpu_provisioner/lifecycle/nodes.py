"""The Node cache the phases read: every Node is watched, few are kept.

A shared AKS cluster has thousands of Nodes that are not Kaito's. Each is kept as a stub (its name, agent-pool
label and providerID: enough to be found), and only Nodes made by gpu-provisioner are kept in full, without
what no phase reads (managed fields, the image list). A stub found for a claim (a Node that joined before an
upgrade, from a version that did not label its nodes) is read from the API server once and kept in full from
then on. Look-ups by providerID and by agent-pool name go through indexes, never a scan.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import kubernetes

from gpu_provisioner.api.claims import Claim
from gpu_provisioner.cloud.pool_request import MACHINE_TYPE_LABEL
from gpu_provisioner.runtime.informer import NODES, Informer, Object, without_managed_fields

AGENTPOOL_LABELS = ("kubernetes.azure.com/agentpool", "agentpool")
BY_PROVIDER_ID = "providerID"
BY_POOL = "pool"
# A stub carries this key (outside any Kubernetes field), so that a phase never mistakes it for a Node.
STUB = "gpu-provisioner/stub"
# Kept nowhere: a GPU node's image list alone is tens of kilobytes.
_UNREAD_STATUS = ("images", "volumesInUse", "volumesAttached", "daemonEndpoints", "config")


def pool_of_node(node: Object) -> str:
    labels = node["metadata"].get("labels") or {}
    return next((labels[k] for k in AGENTPOOL_LABELS if labels.get(k)), "")


def _provider_id(node: Object) -> str:
    return (node.get("spec") or {}).get("providerID", "")


def made_by_gpu_provisioner(node: Object) -> bool:
    """Every agent pool gpu-provisioner makes labels its nodes so (this one always; the Go one since October 2023)."""
    return MACHINE_TYPE_LABEL in (node["metadata"].get("labels") or {})


def kept_in_full(node: Object) -> Object:
    status = {k: v for k, v in (node.get("status") or {}).items() if k not in _UNREAD_STATUS}
    return {**without_managed_fields(node), "status": status}


def stub(node: Object) -> Object:
    metadata, labels = node["metadata"], node["metadata"].get("labels") or {}
    return {
        "apiVersion": node.get("apiVersion"), "kind": node.get("kind"), STUB: True,
        "metadata": {"name": metadata["name"], "uid": metadata.get("uid"),
                     "resourceVersion": metadata.get("resourceVersion"),
                     "labels": {k: labels[k] for k in AGENTPOOL_LABELS if k in labels}},
        "spec": {"providerID": _provider_id(node)},
    }


class NodeCache:
    """The Node informer, its indexes, and `nodes_for` (lifecycle.base.NodeLookup)."""

    def __init__(self, api_client: kubernetes.client.ApiClient, on_event: Callable[[str, Object], None]) -> None:
        self._on_event = on_event
        # Nodes kept in full though not labelled as ours: a claim's look-up found them.
        self._promoted: set[str] = set()
        self._lock = threading.Lock()
        self.informer = Informer(
            api_client, NODES, self._route, transform=self._compact,
            indexers={BY_PROVIDER_ID: lambda n: [_provider_id(n)] if _provider_id(n) else [],
                      BY_POOL: lambda n: [pool_of_node(n)] if pool_of_node(n) else []},
        )

    def nodes_for(self, claim: Claim) -> list[dict[str, Any]]:
        """The Nodes of the claim's agent pool: by providerID once registration recorded it, else by pool name."""
        nodes = self.informer.by_index(BY_PROVIDER_ID, claim.provider_id) if claim.provider_id else []
        if not nodes:
            nodes = self.informer.by_index(BY_POOL, claim.name)
        return self._all_in_full(nodes)

    def nodes_of_pools(self, pools: Iterable[str]) -> list[dict[str, Any]]:
        """The Nodes of these agent pools (node repair's count of the managed fleet)."""
        return self._all_in_full([node for pool in pools for node in self.informer.by_index(BY_POOL, pool)])

    def _all_in_full(self, nodes: list[Object]) -> list[dict[str, Any]]:
        return [full for node in nodes if (full := self._in_full(node)) is not None]

    def _in_full(self, node: Object) -> Object | None:
        if STUB not in node:
            return node
        name = node["metadata"]["name"]
        with self._lock:
            self._promoted.add(name)
        return self.informer.fetch(name)

    def _compact(self, node: Object) -> Object:
        if made_by_gpu_provisioner(node) or node["metadata"]["name"] in self._promoted:
            return kept_in_full(node)
        return stub(node)

    def _route(self, event_type: str, node: Object) -> None:
        if event_type == "DELETED":
            with self._lock:
                self._promoted.discard(node["metadata"]["name"])
        self._on_event(event_type, node)
