"""The Kubernetes writes the controller makes, in one place (and so in one RBAC rule list)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import kubernetes
import urllib3
from kubernetes.client import ApiException

from gpu_provisioner.api.claims import GROUP, ClaimApi
from gpu_provisioner.runtime import rest
from gpu_provisioner.runtime.outage import Outage
from gpu_provisioner.runtime.rest import MERGE_PATCH, STRATEGIC_MERGE_PATCH

Object = dict[str, Any]


class WriteObserver(Protocol):
    """The cache that watches what is written (an Informer): it sees each write begin, and gets its answer."""

    def writing(self, name: str) -> AbstractContextManager[object]: ...

    def remember_write(self, obj: Object) -> object: ...


class Unobserved:
    def writing(self, name: str) -> AbstractContextManager[object]:
        return nullcontext()

    def remember_write(self, obj: Object) -> None:
        return None


class Kube:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        claim_observer: Callable[[ClaimApi], WriteObserver] = lambda api: Unobserved(),
        outage: Outage | None = None,
        node_observer: WriteObserver | None = None,
        timeout: rest.Timeout = rest.CALL_TIMEOUT,
    ) -> None:
        self.api_client = api_client
        self.timeout = timeout
        # Each write is announced to the cache that watches the object, and its answer goes there, so the next
        # look sees it at once and its echo from the watch wakes no one.
        self._claim_observer = claim_observer
        self._node_observer = node_observer or Unobserved()
        # Said once per outage of the API server, however many calls fail meanwhile; ended only by an answer.
        self.outage = outage or Outage("API server")

    def _call(self, method: str, path: str, *, query: list[tuple[str, Any]] | None = None, body: Any = None,
              content_type: str = rest.JSON, missing_ok: bool = False) -> Object:
        try:
            answer = rest.call(self.api_client, method, path, query=query, body=body, content_type=content_type,
                               timeout=self.timeout)
        except (urllib3.exceptions.HTTPError, ConnectionError) as error:
            self.outage.failed(error)
            raise
        except ApiException as error:
            self.outage.ended()  # an answer, if not the one wanted
            if missing_ok and error.status == 404:
                return {}
            raise
        self.outage.ended()
        return answer

    def _write(self, observer: WriteObserver, name: str, path: str, patch: Object, content_type: str) -> Object:
        with observer.writing(name):
            written = self._call("PATCH", path, body=patch, content_type=content_type)
            observer.remember_write(written)
        return written

    # claims -----------------------------------------------------------------------------------

    def patch_claim(self, api: ClaimApi, name: str, patch: Object) -> Object:
        return self._write(self._claim_observer(api), name, claim_path(api, name), patch, MERGE_PATCH)

    def patch_claim_status(self, api: ClaimApi, name: str, status: Object) -> Object:
        return self._write(self._claim_observer(api), name, f"{claim_path(api, name)}/status", {"status": status},
                           MERGE_PATCH)

    def delete_claim(self, api: ClaimApi, name: str) -> None:
        self._call("DELETE", claim_path(api, name), missing_ok=True)

    # nodes ------------------------------------------------------------------------------------

    def patch_node(self, name: str, patch: Object) -> Object:
        """A strategic merge patch (see rest.STRATEGIC_MERGE_PATCH)."""
        return self._write(self._node_observer, name, f"/api/v1/nodes/{name}", patch, STRATEGIC_MERGE_PATCH)

    def delete_node(self, name: str) -> bool:
        """True if this call deleted the Node, False if it was gone already."""
        return bool(self._call("DELETE", f"/api/v1/nodes/{name}", missing_ok=True))

    # pods (drain) -----------------------------------------------------------------------------

    def pods_on_node(self, node_name: str) -> list[Object]:
        """The Node's pods as the API server's watch cache has them (resourceVersion 0): its node-name index
        answers at once, where a consistent read waits for that cache to catch up with etcd (tens of ms under
        load, on every drain). It may lag the newest write by milliseconds: no more than Karpenter's drain, which
        reads pods from its informer."""
        query = [("fieldSelector", f"spec.nodeName={node_name}"), ("resourceVersion", "0")]
        return self._call("GET", "/api/v1/pods", query=query)["items"]

    def evict(self, pod: Object) -> None:
        """Evict through the Eviction API, so PodDisruptionBudgets are honoured (429 when one blocks)."""
        metadata = {"name": pod["metadata"]["name"], "namespace": pod["metadata"]["namespace"]}
        self._call("POST", f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}/eviction",
                   body={"apiVersion": "policy/v1", "kind": "Eviction", "metadata": metadata}, missing_ok=True)


def claim_path(api: ClaimApi, name: str) -> str:
    return f"/apis/{GROUP}/{api.version}/{api.plural}/{name}"
