"""Kubernetes Events on claims, so `kubectl describe` tells what happened and why.

Cluster-scoped objects get their Events in the `default` namespace, as client-go's recorder does.
A repeat of the same reason and message on the same object bumps the count of the existing Event
instead of creating another. The counts of the most recent Events are remembered, a bounded number of them,
so that months of churn do not grow the process; an Event forgotten and repeated is counted on from 1.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import kubernetes
import structlog
import urllib3
from kubernetes.client import ApiException

from gpu_provisioner.runtime.outage import Outage

log = structlog.get_logger(__name__)
EVENT_NAMESPACE = "default"
COMPONENT = "gpu-provisioner"
_MESSAGE_LIMIT = 1024
REMEMBERED_EVENTS = 4096


class EventRecorder:
    def __init__(self, api_client: kubernetes.client.ApiClient, outage: Outage | None = None,
                 remembered: int = REMEMBERED_EVENTS) -> None:
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._outage = outage or Outage("API server")
        self._counts: OrderedDict[str, int] = OrderedDict()  # least recently recorded first
        self._remembered = remembered
        self._lock = threading.Lock()

    def normal(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self._record(obj, "Normal", reason, message)

    def warning(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self._record(obj, "Warning", reason, message)

    def _record(self, obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        metadata = obj["metadata"]
        message = message[:_MESSAGE_LIMIT]
        digest = hashlib.sha256(f"{metadata['uid']}/{event_type}/{reason}/{message}".encode()).hexdigest()[:12]
        name = f"{metadata['name']}.{digest}"
        now = datetime.now(UTC)
        with self._lock:
            count = self._counts.pop(name, 0) + 1
            self._counts[name] = count
            while len(self._counts) > self._remembered:
                self._counts.popitem(last=False)
        try:
            if count > 1:
                self._core.patch_namespaced_event(name, EVENT_NAMESPACE, {"count": count, "lastTimestamp": now})
                return
            self._core.create_namespaced_event(EVENT_NAMESPACE, kubernetes.client.CoreV1Event(
                metadata=kubernetes.client.V1ObjectMeta(name=name, namespace=EVENT_NAMESPACE),
                involved_object=kubernetes.client.V1ObjectReference(
                    api_version=obj.get("apiVersion"), kind=obj.get("kind"), name=metadata["name"], uid=metadata["uid"],
                    resource_version=metadata.get("resourceVersion"),
                ),
                type=event_type, reason=reason, message=message, count=1,
                first_timestamp=now, last_timestamp=now,
                source=kubernetes.client.V1EventSource(component=COMPONENT),
                reporting_component=COMPONENT, reporting_instance=COMPONENT,
            ))
        except (urllib3.exceptions.HTTPError, ConnectionError) as error:
            # Events are best effort: one lost while the API server is away must not fail the reconcile.
            self._outage.failed(error)
            return None
        except ApiException as error:
            if error.status == 409 and count == 1:  # made by an earlier process: count on from there
                with self._lock:
                    self._counts[name] = 1
                return self._record(obj, event_type, reason, message)
            if error.status == 404 and count > 1:  # expired (events have a TTL): start again
                with self._lock:
                    self._counts.pop(name, None)
                return self._record(obj, event_type, reason, message)
            log.warning("event not recorded", reason=reason, status=error.status, claim=metadata["name"])
        return None
