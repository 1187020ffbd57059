"""Kubernetes API requests as plain JSON, through the official client's ApiClient: its configuration, credentials,
TLS, connection pool and exceptions, without its generated API classes. The controller makes a dozen kinds of
call and reads every answer as a dict; the generated classes would cost more than they give: importing CoreV1Api
alone takes about 20 MiB and half a second of CPU, and each call validates its arguments with pydantic and
builds a model tree of the answer."""

from __future__ import annotations

import json
from typing import Any

import kubernetes
from kubernetes.client import ApiException
from kubernetes.client.rest import RESTResponse

JSON = "application/json"
# JSON merge patches replace lists whole: callers send complete lists, with metadata.resourceVersion
# when the write must not race another writer's.
MERGE_PATCH = "application/merge-patch+json"
# For built-in kinds (Nodes): lists with a merge strategy (finalizers, ownerReferences) are merged, not replaced, so
# adding to one needs no resourceVersion, and `$deleteFromPrimitiveList/<list>` removes values from one.
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
Timeout = float | tuple[float, float] | None
# (connect, read) seconds for a plain call: an API server that takes the connection and never answers must not
# hold a worker (and its claim) for good. Watches pass their own.
CALL_TIMEOUT: Timeout = (10.0, 30.0)


def send(api_client: kubernetes.client.ApiClient, method: str, path: str, *, query: list[tuple[str, Any]] | None = None,
         body: Any = None, content_type: str = JSON, timeout: Timeout = None, accept: str = JSON) -> RESTResponse:
    """The response, unread (a watch is read as a stream), whatever its status."""
    headers = {"Accept": accept}
    if body is not None:
        headers["Content-Type"] = content_type
    params = api_client.param_serialize(method, path, query_params=query or [], header_params=headers, body=body,
                                        auth_settings=["BearerToken"])
    return api_client.call_api(*params, _request_timeout=timeout)


def call(api_client: kubernetes.client.ApiClient, method: str, path: str, *, query: list[tuple[str, Any]] | None = None,
         body: Any = None, content_type: str = JSON, timeout: Timeout = CALL_TIMEOUT) -> dict[str, Any]:
    """The answer as a dict; an error status raises the client's ApiException (NotFoundException for 404 ...)."""
    response = send(api_client, method, path, query=query, body=body, content_type=content_type, timeout=timeout)
    data = response.read()  # read whole, so the pooled connection is free again
    if not 200 <= response.status <= 299:
        raise ApiException.from_response(http_resp=response, body=data.decode(errors="replace"), data=None)
    return json.loads(data) if data else {}
