"""List + watch of one cluster-scoped resource into a local cache of plain dicts.

Watches resume from the last resourceVersion (kept fresh by bookmarks). A 410 Gone or any error
leads to a relist with capped, jittered backoff; the relist replaces the cache and emits synthetic
events for what changed during the gap, so a handler never misses a deletion. Relists are paginated, so a
large cluster's list is never one response held whole. A resource that is not served (its CRD absent) is
re-checked periodically, so installing the CRD later just works.

As client-go's informers: a label selector narrows what is watched, metadata-only mode has the API server send
only each object's metadata (PartialObjectMetadata), an optional transform keeps only what the controller reads
of each object, and indexers answer look-ups by a derived key without scanning the cache. Cached objects share
the strings that repeat across them (see `shared_strings`).
"""

from __future__ import annotations

import json
import random
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import kubernetes
import structlog

from gpu_provisioner.runtime import rest

log = structlog.get_logger(__name__)
ABSENT_RECHECK_S = 30.0
# What the API server sends instead of whole objects when only their metadata is wanted (client-go's metadata
# informers ask the same way); JSON as the fallback for a server that cannot.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json"
METADATA_WATCH = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"
MAX_BACKOFF_S = 30.0
# Objects a relist page asks for: the page's text and its parse are held at once, so pages of whole objects (claims,
# GPU Nodes: several kilobytes each) are kept small; metadata-only objects are a fraction of that.
LIST_PAGE_SIZE = 100
METADATA_LIST_PAGE_SIZE = 500
# Strings this long or shorter are interned in cached objects: names, label keys and values, times, reasons.
SHARED_STRING_MAX = 64

Object = dict[str, Any]
# Index name -> function giving the keys an object is found under.
Indexers = dict[str, Callable[[Object], list[str]]]


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


def without_managed_fields(obj: Object) -> Object:
    """The object without the server-side apply bookkeeping, which no controller here reads and which is often a
    third of an object's size."""
    metadata = obj["metadata"]
    if "managedFields" not in metadata:
        return obj
    return {**obj, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}


def shared_strings(value: Any) -> Any:
    """`value` rebuilt with its keys and short strings interned. A JSON parse makes every object its own copies of
    the field names, label keys and values and condition reasons that all cached objects repeat: without them a
    cached GPU Node takes 3 KB instead of 10."""
    if isinstance(value, dict):
        return {sys.intern(key): shared_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shared_strings(item) for item in value]
    if isinstance(value, str) and len(value) <= SHARED_STRING_MAX:
        return sys.intern(value)
    return value


@dataclass
class _WritesInFlight:
    """Our writes to one object that have not been answered yet, and the watch events held meanwhile."""

    writers: int = 0
    held: list[Object] = field(default_factory=list)


class _Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


class _NotServed(Exception):
    """The API server does not serve this resource (404)."""


class Informer:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        resource: Resource,
        on_event: Callable[[str, Object], None],
        *,
        transform: Callable[[Object], Object] | None = None,
        indexers: Indexers | None = None,
        label_selector: str = "",
        metadata_only: bool = False,
        watch_timeout_s: int = 300,
        absent_recheck_s: float = ABSENT_RECHECK_S,
    ) -> None:
        self._api = api_client
        self.resource = resource
        self._selection = [("labelSelector", label_selector)] if label_selector else []
        self._metadata_only = metadata_only
        self._on_event = on_event
        self._transform = transform or (lambda obj: obj)
        self._indexers = indexers or {}
        self._watch_timeout_s = watch_timeout_s
        self._absent_recheck_s = absent_recheck_s
        self._cache: dict[str, Object] = {}
        # index name -> key -> names of the cached objects found under it
        self._indices: dict[str, dict[str, set[str]]] = {index: {} for index in self._indexers}
        # Our own writes, until the watch delivers them or something newer (client-go's integer
        # resourceVersion mutation cache): without this, the next reconcile would act on the state
        # from before its own last write.
        self._written: dict[str, Object] = {}
        # The versions our writes' answers carried, until the watch brings each back (its echo wakes no one),
        # and the objects with a write in flight, whose events wait for its answer.
        self._our_versions: dict[str, set[int]] = {}
        self._in_flight: dict[str, _WritesInFlight] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._available = True
        self._response: Any = None
        self._thread: threading.Thread | None = None
        self._name = " ".join(filter(None, (resource.plural, "(metadata)" * metadata_only, label_selector)))
        self._log = log.bind(resource=self._name)

    # public -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self._name}", daemon=True)
        self._thread.start()

    def stop(self, wait_s: float = 5.0) -> None:
        """Stop watching; wait up to `wait_s` for the informer's thread to end."""
        self._stop.set()
        response = self._response
        if response is not None:
            response.shutdown()  # unblocks the watch read in the informer thread
        if self._thread is not None:
            self._thread.join(timeout=wait_s)

    def wait_for_sync(self, timeout_s: float) -> bool:
        return self._synced.wait(timeout_s)

    @property
    def has_synced(self) -> bool:
        return self._synced.is_set()

    @property
    def available(self) -> bool:
        return self._available

    def get(self, name: str) -> Object | None:
        with self._lock:
            return self._newest(name) if name in self._cache else None

    def list(self) -> list[Object]:
        with self._lock:
            return list(self._cache.values())

    def by_index(self, index: str, key: str) -> list[Object]:
        """The cached objects an indexer files under `key`."""
        with self._lock:
            return [self._newest(name) for name in sorted(self._indices[index].get(key, ()))]

    @contextmanager
    def writing(self, name: str) -> Iterator[None]:
        """Around our write to `name`, its answer given to `remember_write` inside: the watch often brings a write
        before its answer is read, so its events wait until then. Our write's echo is dropped (the reconcile that
        made it goes on from its answer); if anything else came meanwhile, one event with the newest state is sent
        when the write ends, as it is when the write fails (its answer may be lost while it landed)."""
        with self._lock:
            flight = self._in_flight.setdefault(name, _WritesInFlight())
            flight.writers += 1
        try:
            yield
        finally:
            with self._lock:
                flight.writers -= 1
                newest = self._cache.get(name) if flight.held and not flight.writers else None
                if not flight.writers:
                    del self._in_flight[name]
            if newest is not None:
                self._emit("MODIFIED", newest)

    def remember_write(self, obj: Object) -> None:
        """Serve `obj` (the server's answer to our write) until the watch brings that version, and let that
        version's event wake no one."""
        name, version = obj["metadata"]["name"], _version(obj)
        with self._lock:
            flight = self._in_flight.get(name)
            echo = next((held for held in flight.held if _version(held) == version), None) if flight else None
            if echo is not None:
                flight.held.remove(echo)
                return
            cached = self._cache.get(name)
            if (cached is None or cached["metadata"].get("uid") != obj["metadata"].get("uid")
                    or _version(cached) >= version):
                return
            self._our_versions.setdefault(name, set()).add(version)
            self._written[name] = self._kept(obj)

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

    def _request(self, query: list[tuple[str, Any]], read_timeout_s: float, accept: str) -> Any:
        path = self.resource.path
        response = rest.send(self._api, "GET", path, query=[*self._selection, *query], timeout=(10, read_timeout_s),
                             accept=accept if self._metadata_only else rest.JSON)
        if 200 <= response.status < 300:
            return response
        body = response.read()  # drained, so the pooled connection stays usable
        if response.status == 404:
            raise _NotServed()
        if response.status == 410:
            raise _Gone()
        raise RuntimeError(f"GET {path}: HTTP {response.status} {body[:300]!r}")

    def _relist(self) -> str:
        fresh: dict[str, Object] = {}
        page_size = METADATA_LIST_PAGE_SIZE if self._metadata_only else LIST_PAGE_SIZE
        query: list[tuple[str, Any]] = [("limit", page_size)]
        while True:
            page = json.loads(self._request(query, 60, METADATA_LIST).read())
            for item in page.get("items") or []:
                fresh[item["metadata"]["name"]] = self._kept(item)
            token = page["metadata"].get("continue")
            if not token:
                break
            query = [("limit", page_size), ("continue", token)]
        with self._lock:
            previous, self._cache = self._cache, {}
            for index in self._indices.values():
                index.clear()
            for name, obj in fresh.items():
                self._store(name, obj)
            self._written.clear()
            self._our_versions.clear()
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
        return page["metadata"]["resourceVersion"]

    def _watch(self, resource_version: str) -> str:
        """Follow one watch request to its end; returns the resourceVersion to resume from."""
        query = [("watch", "true"), ("resourceVersion", resource_version), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", self._watch_timeout_s)]
        response = self._request(query, self._watch_timeout_s + 30, METADATA_WATCH)
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
                self._apply(kind, self._kept(obj))
        finally:
            self._response = None
            # A watch may end mid-stream: close its connection rather than pool it half-read.
            response.response.close()
        return resource_version

    def _apply(self, event_type: str, obj: Object) -> None:
        name, version = obj["metadata"]["name"], _version(obj)
        with self._lock:
            written = self._written.get(name)
            if event_type == "DELETED" or (written is not None and version >= _version(written)):
                self._written.pop(name, None)
            # Our own write coming back wakes no one: the reconcile that made it went on from its answer. A change
            # anyone else made has a version of its own, so it is never taken for one. Versions only grow, so
            # older ones of ours are not coming any more.
            ours = self._our_versions.get(name, set())
            echo = event_type == "MODIFIED" and version in ours
            ours.difference_update([v for v in ours if v <= version])
            if not ours:
                self._our_versions.pop(name, None)
            flight = self._in_flight.get(name)
            held = event_type == "MODIFIED" and not echo and flight is not None
            if held:
                flight.held.append(obj)
            elif flight is not None:
                flight.held.clear()  # a deletion (or re-creation) says it all
            if event_type == "DELETED":
                self._forget(name)
            else:
                self._store(name, obj)
        if not echo and not held:
            self._emit(event_type, obj)

    def _kept(self, obj: Object) -> Object:
        """What the cache keeps of an object as the API server sent it."""
        return shared_strings(self._transform(_with_kind(obj, self.resource)))

    def _newest(self, name: str) -> Object:
        """The cached object, or our write's answer if that is newer (the lock held). Only the watch says an object
        exists: a write's answer read after its DELETED event must not bring a deleted claim back (it would be
        launched again, and its pool would leak)."""
        cached, written = self._cache[name], self._written.get(name)
        return written if written is not None and _version(written) > _version(cached) else cached

    def _store(self, name: str, obj: Object) -> None:
        """Cache `obj` and file it in every index (the lock held)."""
        self._forget(name)
        self._cache[name] = obj
        for index, keys_of in self._indexers.items():
            for key in keys_of(obj):
                self._indices[index].setdefault(key, set()).add(name)

    def _forget(self, name: str) -> None:
        old = self._cache.pop(name, None)
        if old is None:
            return
        for index, keys_of in self._indexers.items():
            for key in keys_of(old):
                names = self._indices[index].get(key)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self._indices[index][key]

    def _emit(self, event_type: str, obj: Object) -> None:
        try:
            self._on_event(event_type, obj)
        except Exception:
            self._log.exception("event handler failed", event=event_type, name=obj["metadata"].get("name"))


def _version(obj: Object) -> int:
    """resourceVersion as the integer etcd makes it; -1 (never newer) if it is not one."""
    try:
        return int(obj["metadata"].get("resourceVersion", ""))
    except ValueError:
        return -1


def _with_kind(obj: Object, resource: Resource) -> Object:
    # List items come without apiVersion/kind; Events and owner references need them.
    obj.setdefault("apiVersion", resource.api_version)
    obj.setdefault("kind", resource.kind)
    return obj
