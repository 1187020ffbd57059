"""The Kubernetes writes the controller makes, in one place (and so in one RBAC rule list)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client import ApiException

from gpu_provisioner.api.claims import GROUP, ClaimApi
from gpu_provisioner.runtime.outage import Outage

T = TypeVar("T")

# JSON merge patches replace lists whole: callers send complete lists, with metadata.resourceVersion
# when the write must not race another writer's.
MERGE_PATCH = "application/merge-patch+json"


class Kube:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        on_claim_written: Callable[[ClaimApi, dict[str, Any]], None] = lambda api, obj: None,
        outage: Outage | None = None,
    ) -> None:
        self.api_client = api_client
        self._on_claim_written = on_claim_written
        # Said once per outage of the API server, however many calls fail meanwhile; ended only by an answer.
        self.outage = outage or Outage("API server")
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)

    # claims -----------------------------------------------------------------------------------

    def _call(self, request: Callable[[], T]) -> T:
        try:
            answer = request()
        except (urllib3.exceptions.HTTPError, ConnectionError) as error:
            self.outage.failed(error)
            raise
        except ApiException:
            self.outage.ended()  # an answer, if not the one wanted
            raise
        self.outage.ended()
        return answer

    def patch_claim(self, api: ClaimApi, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        written = self._call(lambda: self._custom.patch_cluster_custom_object(
            GROUP, api.version, api.plural, name, patch, _content_type=MERGE_PATCH
        ))
        self._on_claim_written(api, written)
        return written

    def patch_claim_status(self, api: ClaimApi, name: str, status: dict[str, Any]) -> dict[str, Any]:
        written = self._call(lambda: self._custom.patch_cluster_custom_object_status(
            GROUP, api.version, api.plural, name, {"status": status}, _content_type=MERGE_PATCH
        ))
        self._on_claim_written(api, written)
        return written

    def delete_claim(self, api: ClaimApi, name: str) -> None:
        self._call(lambda: _ignore_not_found(
            lambda: self._custom.delete_cluster_custom_object(GROUP, api.version, api.plural, name)))

    # nodes ------------------------------------------------------------------------------------

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        node = self._call(lambda: self._core.patch_node(name, patch, _content_type=MERGE_PATCH))
        return self.api_client.sanitize_for_serialization(node)

    def delete_node(self, name: str) -> None:
        self._call(lambda: _ignore_not_found(lambda: self._core.delete_node(name)))

    # pods (drain) -----------------------------------------------------------------------------

    def pods_on_node(self, node_name: str) -> list[kubernetes.client.V1Pod]:
        return self._call(
            lambda: self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node_name}").items)

    def evict(self, pod: kubernetes.client.V1Pod) -> None:
        """Evict through the Eviction API, so PodDisruptionBudgets are honoured (429 when one blocks)."""
        body = kubernetes.client.V1Eviction(
            metadata=kubernetes.client.V1ObjectMeta(name=pod.metadata.name, namespace=pod.metadata.namespace)
        )
        self._call(lambda: _ignore_not_found(
            lambda: self._core.create_namespaced_pod_eviction(pod.metadata.name, pod.metadata.namespace, body)
        ))


def _ignore_not_found(call: Any) -> None:
    try:
        call()
    except ApiException as error:
        if error.status != 404:
            raise
