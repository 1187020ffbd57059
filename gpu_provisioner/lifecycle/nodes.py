"""The Node cache the phases read: every Node is watched, few are kept whole.

A shared AKS cluster has thousands of Nodes that are not Kaito's. Two watches split them on the label every
pool made by gpu-provisioner puts on its nodes: those are watched whole and kept without what no phase reads
(managed fields, the image list); all others are watched as metadata only (the API server sends a third of the
bytes, and nothing of their status churn but a new resourceVersion) and kept as stubs: name and agent-pool
label, enough to be found. A stub found for a claim (a Node that joined before an upgrade, from a version that
did not label its nodes) is read whole from the API server at each look-up; such nodes are few and old.
Look-ups by providerID and by agent-pool name go through indexes, never a scan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import kubernetes
from kubernetes.client import ApiException

from gpu_provisioner.api.claims import Claim
from gpu_provisioner.cloud.pool_request import MACHINE_TYPE_LABEL
from gpu_provisioner.runtime import rest
from gpu_provisioner.runtime.informer import NODES, Informer, Object, without_managed_fields

AGENTPOOL_LABELS = ("kubernetes.azure.com/agentpool", "agentpool")
BY_PROVIDER_ID = "providerID"
BY_POOL = "pool"
# Kept nowhere: a GPU node's image list alone is tens of kilobytes.
_UNREAD_STATUS = ("images", "volumesInUse", "volumesAttached", "daemonEndpoints", "config")


def pool_of_node(node: Object) -> str:
    labels = node["metadata"].get("labels") or {}
    return next((labels[k] for k in AGENTPOOL_LABELS if labels.get(k)), "")


def _provider_id(node: Object) -> str:
    return (node.get("spec") or {}).get("providerID", "")


def kept_in_full(node: Object) -> Object:
    status = {k: v for k, v in (node.get("status") or {}).items() if k not in _UNREAD_STATUS}
    return {**without_managed_fields(node), "status": status}


def stub(node: Object) -> Object:
    """A Node's metadata cut to what finds it and tells its changes: name, uid, resourceVersion, agent-pool label."""
    metadata, labels = node["metadata"], node["metadata"].get("labels") or {}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": metadata["name"], "uid": metadata.get("uid"),
                     "resourceVersion": metadata.get("resourceVersion"),
                     "labels": {k: labels[k] for k in AGENTPOOL_LABELS if k in labels}},
    }


class NodeCache:
    """The two Node informers, their indexes, and `nodes_for` (lifecycle.base.NodeLookup)."""

    def __init__(self, api_client: kubernetes.client.ApiClient, on_event: Callable[[str, Object], None]) -> None:
        self._api = api_client
        # Every agent pool gpu-provisioner makes labels its nodes with MACHINE_TYPE_LABEL (this one always; the Go
        # one since October 2023).
        self.ours = Informer(
            api_client, NODES, on_event, transform=kept_in_full, label_selector=MACHINE_TYPE_LABEL,
            indexers={BY_PROVIDER_ID: lambda n: [_provider_id(n)] if _provider_id(n) else [],
                      BY_POOL: lambda n: [pool_of_node(n)] if pool_of_node(n) else []},
        )
        self.others = Informer(
            api_client, NODES, on_event, transform=stub, label_selector=f"!{MACHINE_TYPE_LABEL}", metadata_only=True,
            indexers={BY_POOL: lambda n: [pool_of_node(n)] if pool_of_node(n) else []},
        )
        self.informers = (self.ours, self.others)

    def nodes_for(self, claim: Claim) -> list[dict[str, Any]]:
        """The Nodes of the claim's agent pool: by providerID once registration recorded it, else by pool name."""
        nodes = self.ours.by_index(BY_PROVIDER_ID, claim.provider_id) if claim.provider_id else []
        return nodes or self.nodes_of_pools([claim.name])

    def nodes_of_pools(self, pools: Iterable[str]) -> list[dict[str, Any]]:
        """The Nodes of these agent pools (node repair's count of the managed fleet)."""
        pools = list(pools)
        found = [node for pool in pools for node in self.ours.by_index(BY_POOL, pool)]
        legacy = [node for pool in pools for node in self.others.by_index(BY_POOL, pool)]
        return [*found, *(whole for node in legacy if (whole := self._read_whole(node)) is not None)]

    def _read_whole(self, node: Object) -> Object | None:
        """The Node as the API server has it now (None if it is gone)."""
        try:
            return kept_in_full(rest.call(self._api, "GET", f"{NODES.path}/{node['metadata']['name']}"))
        except ApiException as error:
            if error.status == 404:
                return None
            raise
