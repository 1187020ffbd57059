"""Kubernetes Events on claims, so `kubectl describe` tells what happened and why.

Cluster-scoped objects get their Events in the `default` namespace, as client-go's recorder does.
A repeat of the same reason and message on the same object bumps the count of the existing Event
instead of creating another. The counts of the most recent Events are remembered, a bounded number of them,
so that months of churn do not grow the process; an Event forgotten and repeated is counted on from 1.

As client-go's recorder, recording never waits for the API server: Events go out from a thread of their own,
in order, stamped when they were recorded, so a burst of claims does not hold a worker per Event. When the
API server falls far behind, Events past a bounded backlog are dropped (and logged), never the claims' work.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes
import structlog
import urllib3
from kubernetes.client import ApiException

from gpu_provisioner.runtime import rest
from gpu_provisioner.runtime.outage import Outage
from gpu_provisioner.runtime.rest import MERGE_PATCH

log = structlog.get_logger(__name__)
EVENT_NAMESPACE = "default"
COMPONENT = "gpu-provisioner"
_MESSAGE_LIMIT = 1024
REMEMBERED_EVENTS = 4096
BACKLOG = 4096


@dataclass(frozen=True)
class _Event:
    involved: dict[str, Any]
    event_type: str
    reason: str
    message: str
    at: datetime


class EventRecorder:
    def __init__(self, api_client: kubernetes.client.ApiClient, outage: Outage | None = None,
                 remembered: int = REMEMBERED_EVENTS, backlog: int = BACKLOG) -> None:
        self._api = api_client
        self._outage = outage or Outage("API server")
        self._counts: OrderedDict[str, int] = OrderedDict()  # least recently recorded first
        self._remembered = remembered
        self._lock = threading.Lock()
        self._backlog: queue.Queue[_Event] = queue.Queue(backlog)
        self._sender: threading.Thread | None = None

    def normal(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self._enqueue(obj, "Normal", reason, message)

    def warning(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self._enqueue(obj, "Warning", reason, message)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every Event recorded so far was sent (or given up on); False if time ran out."""
        with self._backlog.all_tasks_done:
            return self._backlog.all_tasks_done.wait_for(lambda: not self._backlog.unfinished_tasks, timeout_s)

    def _enqueue(self, obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        metadata = obj["metadata"]
        involved = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": metadata["name"],
                    "uid": metadata["uid"], "resourceVersion": metadata.get("resourceVersion")}
        with self._lock:
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_all, name="event-sender", daemon=True)
                self._sender.start()
        try:
            self._backlog.put_nowait(_Event(involved, event_type, reason, message[:_MESSAGE_LIMIT], datetime.now(UTC)))
        except queue.Full:
            log.warning("event dropped: the API server is too far behind", reason=reason, claim=metadata["name"])

    def _send_all(self) -> None:
        while True:
            event = self._backlog.get()
            try:
                self._send(event)
            except Exception:  # best effort: one Event that cannot be sent must not stop the others
                log.exception("event not recorded", reason=event.reason, claim=event.involved["name"])
            finally:
                self._backlog.task_done()

    def _send(self, event: _Event) -> None:
        involved, event_type, reason, message, now = (
            event.involved, event.event_type, event.reason, event.message, event.at)
        digest = hashlib.sha256(f"{involved['uid']}/{event_type}/{reason}/{message}".encode()).hexdigest()[:12]
        name = f"{involved['name']}.{digest}"
        with self._lock:
            count = self._counts.pop(name, 0) + 1
            self._counts[name] = count
            while len(self._counts) > self._remembered:
                self._counts.popitem(last=False)
        try:
            events = f"/api/v1/namespaces/{EVENT_NAMESPACE}/events"
            if count > 1:
                rest.call(self._api, "PATCH", f"{events}/{name}", body={"count": count, "lastTimestamp": now},
                          content_type=MERGE_PATCH)
                return
            rest.call(self._api, "POST", events, body={
                "metadata": {"name": name, "namespace": EVENT_NAMESPACE}, "involvedObject": involved,
                "type": event_type, "reason": reason, "message": message, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now, "source": {"component": COMPONENT},
                "reportingComponent": COMPONENT, "reportingInstance": COMPONENT,
            })
        except (urllib3.exceptions.HTTPError, ConnectionError) as error:
            # Events are best effort: one lost while the API server is away must not fail the reconcile.
            self._outage.failed(error)
            return None
        except ApiException as error:
            if error.status == 409 and count == 1:  # made by an earlier process: count on from there
                with self._lock:
                    self._counts[name] = 1
                return self._send(event)
            if error.status == 404 and count > 1:  # expired (events have a TTL): start again
                with self._lock:
                    self._counts.pop(name, None)
                return self._send(event)
            log.warning("event not recorded", reason=reason, status=error.status, claim=involved["name"])
        return None
