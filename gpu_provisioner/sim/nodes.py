"""A kubelet (and GPU device plugin) stand-in: the Node of each simulated agent pool joins the real
API server, turns Ready and publishes its GPUs, after the scenario's delays; it leaves with its pool.

Each pool's steps run in order on its own lane; lanes run side by side on a few workers, so a burst of
pools keeps the scenario's timing (each step's due and actual time go to the timeline)."""

from __future__ import annotations

import copy
import hashlib
import heapq
import itertools
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import kubernetes
import structlog
import urllib3
from kubernetes.client import ApiException

from gpu_provisioner.cloud.skus import VmSize, lookup
from gpu_provisioner.sim import timeline
from gpu_provisioner.sim.scenario import Scenario

log = structlog.get_logger(__name__)
_TICK_S = 0.1
# Each Node has a kubelet of its own: a burst of joins is written side by side, as many at once as this (each worker
# with a kept connection of its own), not in a few workers' turns. At 1,000 claims, while the API server answers
# slowly, steps waited for a worker: the simulator's own lag p95 0.71 s with 32, 0.8-2.0 s with 64 once the
# controller launched faster; with 256 that block on the lanes, 0.03-0.19 s (the lag in all, the API server's
# answers included, unchanged).
_WORKERS = 256
# The lane (cluster, pool) that the steps scheduled by this thread belong to.
_lane: ContextVar[tuple[str, str]] = ContextVar("aks_sim_node_lane", default=("", ""))
_CONDITION_TYPES = ("MemoryPressure", "DiskPressure", "PIDPressure")
NOT_READY_TAINT = "node.kubernetes.io/not-ready"


def vmss_name(seed: int, cluster: str, pool: str) -> str:
    digits = int(hashlib.sha256(f"{seed}/{cluster}/{pool}".encode()).hexdigest(), 16) % 10**8
    return f"aks-{pool}-{digits:08d}-vmss"


def _taint(spec: str) -> dict[str, str]:
    key_value, effect = spec.rsplit(":", 1)
    key, _, value = key_value.partition("=")
    return {"key": key, "value": value, "effect": effect}


def _unless_gone(action: Callable[[], object]) -> None:
    """Act on a Node unless it was deleted meanwhile (with its pool): a kubelet would be gone too."""
    try:
        action()
    except ApiException as error:
        if error.status != 404:
            raise


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class NodeMaterialiser:
    def __init__(self, api_client: kubernetes.client.ApiClient, scenario: Scenario, subscription_id: str,
                 settle: Callable[[], float | None], steps: timeline.Timeline | None = None) -> None:
        configuration = copy.deepcopy(api_client.configuration)
        configuration.connection_pool_maxsize = _WORKERS
        self._api_client = kubernetes.client.ApiClient(configuration)
        self._core = kubernetes.client.CoreV1Api(self._api_client)
        self.scenario = scenario
        self.subscription_id = subscription_id
        # Lets pending operations finish on time even without ARM traffic; says when the next one is due.
        self._settle = settle
        self._timeline = steps or timeline.Timeline()
        self._actions: list[tuple[float, int, tuple[str, str], Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._scheduled = threading.Event()  # an action or operation was added: the scheduler may wake earlier
        # Per lane, its due steps in order (the first is running); a lane is here while it has any.
        self._lanes: dict[tuple[str, str], deque[tuple[float, Callable[[], None]]]] = {}
        self._runnable: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._running = threading.local()  # the lane, due time and own lag of the step a worker runs
        self._threads = [threading.Thread(target=self._run, name="aks-sim-nodes", daemon=True)] + [
            threading.Thread(target=self._work, name=f"aks-sim-kubelet-{n}", daemon=True) for n in range(_WORKERS)]
        self._nodes: dict[tuple[str, str], str] = {}  # (cluster, pool) -> node name
        self._not_ready_taint_at: dict[str, int] = {}  # node name -> index in its taints, until lifted

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._scheduled.set()
        for _ in range(_WORKERS):
            self._runnable.put(None)  # one for each worker: it takes it and ends
        for thread in self._threads:
            thread.join(timeout=5)
        self._api_client.close()

    # hooks from the resource provider ---------------------------------------------------------

    def pool_created(self, cluster: str, node_resource_group: str, location: str, pool: dict[str, Any]) -> None:
        properties = pool["properties"]
        size = lookup(properties["vmSize"])
        if size is None:
            return
        vmss = vmss_name(self.scenario.seed, cluster, pool["name"])
        node_name = f"{vmss}000000"
        _lane.set((cluster, pool["name"]))
        node = self._node(node_name, vmss, cluster, node_resource_group, location, pool["name"], size, properties)
        s = self.scenario
        self._after(s.node_join_delay_s, lambda: self._create(cluster, pool["name"], node))
        if s.node_never_ready:
            return
        ready_at = s.node_join_delay_s + s.node_ready_delay_s
        self._after(ready_at, lambda: self._set_status(node_name, size, ready=True, gpus=False))
        serving_at = ready_at
        if not s.no_gpu and size.is_gpu:
            serving_at = gpus_at = ready_at + s.gpu_publish_delay_s
            self._after(gpus_at, lambda: self._set_status(node_name, size, ready=True, gpus=True))
        # Failures of a node in service, after it came up whole.
        if s.gpus_lost_after_s is not None and size.is_gpu:
            self._after(serving_at + s.gpus_lost_after_s, lambda: _unless_gone(lambda: self.lose_gpus(node_name)))
        if s.node_lost_after_s is not None:
            self._after(serving_at + s.node_lost_after_s, lambda: _unless_gone(lambda: self.lose_node(node_name)))

    def wake(self) -> None:
        """A pool operation started: settle it when it is due."""
        self._scheduled.set()

    def pool_deleted(self, cluster: str, pool: str) -> None:
        with self._lock:
            node_name = self._nodes.pop((cluster, pool), None)
        if node_name is not None:
            _lane.set((cluster, pool))
            self._after(0, lambda: self._delete(node_name))

    # failures of a node in service, as the kubelet and the node lifecycle controller report them ---------

    def lose_gpus(self, node_name: str, remaining: int = 0) -> None:
        """The device plugin reports the GPUs but `remaining` unhealthy (an Xid error, a driver crash, a GPU fallen
        off the bus): allocatable drops to `remaining`, capacity stays."""
        size = lookup(self._core.read_node(node_name).metadata.labels["node.kubernetes.io/instance-type"])
        if size is not None and size.is_gpu:
            self._patch_status(node_name, {"allocatable": {size.gpu_resource: str(remaining)}})

    def lose_node(self, node_name: str, status: str = "Unknown", since: str | None = None) -> None:
        """The Node's Ready turns `status`: Unknown is what the node lifecycle controller writes when the kubelet
        stopped posting, False what a kubelet that runs but is unhealthy writes. `since`: its lastTransitionTime."""
        reason, message = ("NodeStatusUnknown", "Kubelet stopped posting node status.") if status == "Unknown" else (
            "KubeletNotReady", "container runtime is down")
        node = self._core.read_node(node_name)
        conditions = [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message,
                       "lastHeartbeatTime": c.last_heartbeat_time, "lastTransitionTime": c.last_transition_time}
                      for c in node.status.conditions or [] if c.type != "Ready"]
        conditions.append({"type": "Ready", "status": status, "reason": reason, "message": message,
                           "lastHeartbeatTime": since or _now(), "lastTransitionTime": since or _now()})
        self._patch_status(node_name, {"conditions": conditions})

    def restore_node(self, node_name: str) -> None:
        """The kubelet and the device plugin are healthy again: Ready, with every GPU allocatable."""
        size = lookup(self._core.read_node(node_name).metadata.labels["node.kubernetes.io/instance-type"])
        assert size is not None
        self._set_status(node_name, size, ready=True, gpus=True)

    def _patch_status(self, name: str, status: dict[str, Any]) -> None:
        _unparsed(self._core.patch_node_status, name, {"status": status}, _content_type="application/merge-patch+json")

    # node objects -----------------------------------------------------------------------------

    def _node(self, name: str, vmss: str, cluster: str, node_rg: str, location: str, pool: str, size: VmSize,
              properties: dict[str, Any]) -> dict[str, Any]:
        labels = {
            "kubernetes.azure.com/agentpool": pool, "agentpool": pool,
            "kubernetes.azure.com/cluster": node_rg, "kubernetes.azure.com/mode": "user",
            "kubernetes.azure.com/os-sku": properties.get("osSKU", "Ubuntu"),
            "kubernetes.azure.com/node-image-version": properties.get("nodeImageVersion", ""),
            "node.kubernetes.io/instance-type": size.name, "beta.kubernetes.io/instance-type": size.name,
            "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name,
            "topology.kubernetes.io/region": location, "topology.kubernetes.io/zone": "0",
            **(properties.get("nodeLabels") or {}),
        }
        if size.is_gpu:
            labels["kubernetes.azure.com/accelerator"] = "nvidia" if size.gpu_resource == "nvidia.com/gpu" else "amd"
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "providerID": f"azure:///subscriptions/{self.subscription_id}/resourceGroups/{node_rg.lower()}"
                              f"/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss}/virtualMachines/0",
                "taints": [_taint(t) for t in properties.get("nodeTaints") or []],
            },
        }

    def _create(self, cluster: str, pool: str, node: dict[str, Any]) -> None:
        size = lookup(node["metadata"]["labels"]["node.kubernetes.io/instance-type"])
        assert size is not None
        # A kubelet registers its Node with a first status (Nodes take status on create): one write.
        name = node["metadata"]["name"]
        try:
            created = json.loads(_unparsed(self._core.create_node, {**node, "status": _status(size, False, False)}))
            taints = [t["key"] for t in created["spec"].get("taints") or []]
        except ApiException as error:
            if error.status != 409:  # 409: made by a try whose answer the API server's restart lost
                raise
            taints = [NOT_READY_TAINT]  # where it is is looked up when it is lifted
        with self._lock:
            self._nodes[(cluster, pool)] = name
            if NOT_READY_TAINT in taints:
                self._not_ready_taint_at[name] = taints.index(NOT_READY_TAINT)
        self._done(timeline.NODE_JOINED)

    def _set_status(self, name: str, size: VmSize, ready: bool, gpus: bool) -> None:
        try:
            if ready:
                self._lift_not_ready_taint(name)
            self._patch_status(name, _status(size, ready, gpus))
        except ApiException as error:
            if error.status != 404:  # deleted meanwhile: a kubelet would be gone too
                raise
        if ready:
            self._done(timeline.GPUS_PUBLISHED if gpus else timeline.NODE_READY)

    def _lift_not_ready_taint(self, name: str) -> None:
        # The API server taints every new Node not-ready; kube-controller-manager's node lifecycle
        # controller (absent here) lifts it once the kubelet reports Ready.
        with self._lock:
            index = self._not_ready_taint_at.get(name)
        if index is None:
            return
        try:  # one write where the Node was made, unless its taints changed since
            _unparsed(self._core.patch_node, name, [
                {"op": "test", "path": f"/spec/taints/{index}/key", "value": NOT_READY_TAINT},
                {"op": "remove", "path": f"/spec/taints/{index}"}], _content_type="application/json-patch+json")
        except ApiException as error:
            if error.status == 404:
                raise
            node = json.loads(_unparsed(self._core.read_node, name))
            taints = node["spec"].get("taints") or []
            kept = [t for t in taints if t["key"] != NOT_READY_TAINT]
            if len(kept) != len(taints):
                change = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
                          "spec": {"taints": kept}}
                _unparsed(self._core.patch_node, name, change, _content_type="application/merge-patch+json")
        with self._lock:  # only once lifted: a try the API server's restart cut short is tried again
            self._not_ready_taint_at.pop(name, None)

    def _delete(self, name: str) -> None:
        with self._lock:
            self._not_ready_taint_at.pop(name, None)
        _unless_gone(lambda: _unparsed(self._core.delete_node, name))
        self._done(timeline.NODE_DELETED)

    # timing -----------------------------------------------------------------------------------

    def _after(self, delay_s: float, action: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._actions, (time.monotonic() + delay_s, next(self._sequence), _lane.get(), action))
        self._scheduled.set()

    def _done(self, step: str) -> None:
        """Records that the step a worker is running is done (a step run outside the lanes is not timed)."""
        lane, due = getattr(self._running, "lane", None), getattr(self._running, "due", None)
        if lane is not None and due is not None:
            self._timeline.record(*lane, step, due, time.monotonic(), self._running.own_lag_s)

    def _run(self) -> None:
        """Hands each step to its lane when due, and settles the pool operations on time."""
        while not self._stop.is_set():
            try:
                next_operation = self._settle()
            except Exception:
                log.exception("simulator settle failed")
                next_operation = None
            now = time.monotonic()
            with self._lock:
                while self._actions and self._actions[0][0] <= now:
                    due, _, lane, action = heapq.heappop(self._actions)
                    steps = self._lanes.get(lane)
                    if steps is None:
                        steps = self._lanes[lane] = deque()
                        self._runnable.put(lane)
                    steps.append((due, action))
                next_action = self._actions[0][0] if self._actions else None
                self._scheduled.clear()
            wake = min([now + _TICK_S] + [t for t in (next_operation, next_action) if t is not None])
            self._scheduled.wait(max(wake - time.monotonic(), 0))

    def _work(self) -> None:
        # Blocks until a lane is runnable: idle workers cost nothing, however many there are.
        while (lane := self._runnable.get()) is not None:
            self._drain(lane)

    def _drain(self, lane: tuple[str, str]) -> None:
        """Runs the lane's due steps in order until it has none."""
        previous_done = float("-inf")  # a step may not start before the one before it in its lane is done
        while not self._stop.is_set():
            with self._lock:
                steps = self._lanes[lane]
                if not steps:
                    del self._lanes[lane]
                    return
                due, action = steps[0]
            self._running.lane, self._running.due = lane, due
            self._running.own_lag_s = max(time.monotonic() - max(due, previous_done), 0.0)
            try:
                action()
            except (urllib3.exceptions.HTTPError, ConnectionError):
                # The API server is down (restarting): a kubelet keeps trying, and its steps keep their order.
                self._stop.wait(_TICK_S)
                continue
            except Exception as error:
                if isinstance(error, ApiException) and error.status == 429:
                    # Turned away by the API server's priority and fairness: a kubelet (client-go) waits as the
                    # answer says and tries the same write again.
                    self._stop.wait(_retry_after_s(error))
                    continue
                log.exception("node materialiser action failed")
            finally:
                self._running.lane = self._running.due = None
                previous_done = time.monotonic()
            with self._lock:
                steps.popleft()


def _retry_after_s(error: ApiException) -> float:
    try:
        return min(max(float((error.headers or {}).get("Retry-After", 1)), _TICK_S), 10.0)
    except ValueError:
        return 1.0


def _unparsed(call: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
    """The answer's body as it came: the client's models cost more CPU than this kubelet's whole work."""
    return call(*args, **kwargs, _preload_content=False).data


def _status(size: VmSize, ready: bool, gpus: bool) -> dict[str, Any]:
    resources = size.capacity()
    if not gpus:
        resources.pop(size.gpu_resource, None)
    now = _now()
    conditions = [
        {"type": t, "status": "False", "reason": f"KubeletHasNo{t}", "lastHeartbeatTime": now,
         "lastTransitionTime": now} for t in _CONDITION_TYPES
    ]
    conditions.append({
        "type": "Ready", "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "KubeletNotReady", "message": "", "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    })
    return {
        "capacity": resources, "allocatable": resources, "conditions": conditions,
        "nodeInfo": {"kubeletVersion": "v1.33.5", "osImage": "Ubuntu 22.04.5 LTS", "architecture": "amd64",
                     "operatingSystem": "linux", "containerRuntimeVersion": "containerd://1.7.27",
                     "kernelVersion": "5.15.0-1089-azure", "kubeProxyVersion": "", "machineID": "",
                     "systemUUID": "", "bootID": ""},
    }
