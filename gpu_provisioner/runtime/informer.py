"""List + watch of one cluster-scoped resource into a local cache of plain dicts.

Watches resume from the last resourceVersion (kept fresh by bookmarks). A 410 Gone or any error
leads to a relist with capped, jittered backoff; the relist replaces the cache and emits synthetic
events for what changed during the gap, so a handler never misses a deletion. A resource that is not
served (its CRD absent) is re-checked periodically, so installing the CRD later just works.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kubernetes
import structlog

log = structlog.get_logger(__name__)
ABSENT_RECHECK_S = 30.0
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        prefix = f"/apis/{self.group}" if self.group else "/api"
        return f"{prefix}/{self.version}/{self.plural}"


NODES = Resource("", "v1", "nodes", "Node")


class _Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


class _NotServed(Exception):
    """The API server does not serve this resource (404)."""


class Informer:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        resource: Resource,
        on_event: Callable[[str, dict[str, Any]], None],
        *,
        watch_timeout_s: int = 300,
        absent_recheck_s: float = ABSENT_RECHECK_S,
    ) -> None:
        self._api = api_client
        self.resource = resource
        self._on_event = on_event
        self._watch_timeout_s = watch_timeout_s
        self._absent_recheck_s = absent_recheck_s
        self._cache: dict[str, dict[str, Any]] = {}
        # Our own writes, until the watch delivers them or something newer (client-go's integer
        # resourceVersion mutation cache): without this, the next reconcile would act on the state
        # from before its own last write.
        self._written: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._available = True
        self._response: Any = None
        self._thread: threading.Thread | None = None
        self._log = log.bind(resource=resource.plural)

    # public -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.resource.plural}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            response.shutdown()  # unblocks the watch read in the informer thread
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait_for_sync(self, timeout_s: float) -> bool:
        return self._synced.wait(timeout_s)

    @property
    def has_synced(self) -> bool:
        return self._synced.is_set()

    @property
    def available(self) -> bool:
        return self._available

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            cached, written = self._cache.get(name), self._written.get(name)
            # Only the watch says an object exists: a write's answer read after its DELETED event must not
            # bring a deleted claim back (it would be launched again, and its pool would leak).
            if cached is not None and written is not None and _version(written) > _version(cached):
                return written
            return cached

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._cache.values())

    def remember_write(self, obj: dict[str, Any]) -> None:
        """Serve `obj` (the server's answer to our write) until the watch brings that version."""
        name = obj["metadata"]["name"]
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached["metadata"].get("uid") == obj["metadata"].get("uid"):
                self._written[name] = _with_kind(obj, self.resource)

    # loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                resource_version = self._relist()
                self._available = True
                failures = 0
                while not self._stop.is_set():
                    resource_version = self._watch(resource_version)
            except _NotServed:
                if self._available:
                    self._log.info("resource not served (CRD not installed?); checking again periodically",
                                   every_s=self._absent_recheck_s)
                self._available = False
                self._stop.wait(self._absent_recheck_s)
            except _Gone:
                self._log.info("watch expired; relisting")
            except Exception as error:
                if self._stop.is_set():
                    return
                failures += 1
                delay = min(MAX_BACKOFF_S, 0.5 * 2**failures) * random.uniform(0.8, 1.2)
                self._log.warning("list/watch failed; relisting", error=str(error)[:300], retry_in_s=round(delay, 2))
                self._stop.wait(delay)

    def _request(self, query: list[tuple[str, Any]], read_timeout_s: float) -> Any:
        params = self._api.param_serialize(
            "GET", self.resource.path, query_params=query, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(*params, _request_timeout=(10, read_timeout_s))
        if 200 <= response.status < 300:
            return response
        body = response.read()  # drained, so the pooled connection stays usable
        if response.status == 404:
            raise _NotServed()
        if response.status == 410:
            raise _Gone()
        raise RuntimeError(f"GET {self.resource.path}: HTTP {response.status} {body[:300]!r}")

    def _relist(self) -> str:
        body = json.loads(self._request([], 60).read())
        fresh = {item["metadata"]["name"]: _with_kind(item, self.resource) for item in body.get("items") or []}
        with self._lock:
            previous, self._cache = self._cache, fresh
            self._written.clear()
        for name, obj in fresh.items():
            before = previous.get(name)
            if before is None:
                self._emit("ADDED", obj)
            elif before["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._emit("MODIFIED", obj)
        for name, obj in previous.items():
            if name not in fresh:
                self._emit("DELETED", obj)
        self._synced.set()
        return body["metadata"]["resourceVersion"]

    def _watch(self, resource_version: str) -> str:
        """Follow one watch request to its end; returns the resourceVersion to resume from."""
        query = [("watch", "true"), ("resourceVersion", resource_version), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", self._watch_timeout_s)]
        response = self._request(query, self._watch_timeout_s + 30)
        self._response = response.response
        try:
            for line in self._response:
                if self._stop.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                if kind == "BOOKMARK":
                    continue
                self._apply(kind, _with_kind(obj, self.resource))
        finally:
            self._response = None
            # A watch may end mid-stream: close its connection rather than pool it half-read.
            response.response.close()
        return resource_version

    def _apply(self, event_type: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            written = self._written.get(name)
            if event_type == "DELETED" or (written is not None and _version(obj) >= _version(written)):
                self._written.pop(name, None)
            if event_type == "DELETED":
                self._cache.pop(name, None)
            else:
                self._cache[name] = obj
        self._emit(event_type, obj)

    def _emit(self, event_type: str, obj: dict[str, Any]) -> None:
        try:
            self._on_event(event_type, obj)
        except Exception:
            self._log.exception("event handler failed", event=event_type, name=obj["metadata"].get("name"))


def _version(obj: dict[str, Any]) -> int:
    """resourceVersion as the integer etcd makes it; -1 (never newer) if it is not one."""
    try:
        return int(obj["metadata"].get("resourceVersion", ""))
    except ValueError:
        return -1


def _with_kind(obj: dict[str, Any], resource: Resource) -> dict[str, Any]:
    # List items come without apiVersion/kind; Events and owner references need them.
    obj.setdefault("apiVersion", resource.api_version)
    obj.setdefault("kind", resource.kind)
    return obj
