"""A kubelet (and GPU device plugin) stand-in: the Node of each simulated agent pool joins the real
API server, turns Ready and publishes its GPUs, after the scenario's delays; it leaves with its pool."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import kubernetes
import structlog
import urllib3
from kubernetes.client import ApiException

from gpu_provisioner.cloud.skus import VmSize, lookup
from gpu_provisioner.sim.scenario import Scenario

log = structlog.get_logger(__name__)
_TICK_S = 0.1
_CONDITION_TYPES = ("MemoryPressure", "DiskPressure", "PIDPressure")
NOT_READY_TAINT = "node.kubernetes.io/not-ready"


def vmss_name(seed: int, cluster: str, pool: str) -> str:
    digits = int(hashlib.sha256(f"{seed}/{cluster}/{pool}".encode()).hexdigest(), 16) % 10**8
    return f"aks-{pool}-{digits:08d}-vmss"


def _taint(spec: str) -> dict[str, str]:
    key_value, effect = spec.rsplit(":", 1)
    key, _, value = key_value.partition("=")
    return {"key": key, "value": value, "effect": effect}


def _unless_gone(action: Callable[[], None]) -> None:
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
                 settle: Callable[[], None]) -> None:
        self._core = kubernetes.client.CoreV1Api(api_client)
        self.scenario = scenario
        self.subscription_id = subscription_id
        self._settle = settle  # lets pending operations finish on time even without ARM traffic
        self._actions: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aks-sim-nodes", daemon=True)
        self._nodes: dict[tuple[str, str], str] = {}  # (cluster, pool) -> node name

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # hooks from the resource provider ---------------------------------------------------------

    def pool_created(self, cluster: str, node_resource_group: str, location: str, pool: dict[str, Any]) -> None:
        properties = pool["properties"]
        size = lookup(properties["vmSize"])
        if size is None:
            return
        vmss = vmss_name(self.scenario.seed, cluster, pool["name"])
        node_name = f"{vmss}000000"
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

    def pool_deleted(self, cluster: str, pool: str) -> None:
        with self._lock:
            node_name = self._nodes.pop((cluster, pool), None)
        if node_name is not None:
            self._after(0, lambda: self._delete(node_name))

    # failures of a node in service, as the kubelet and the node lifecycle controller report them ---------

    def lose_gpus(self, node_name: str) -> None:
        """The device plugin reports every GPU unhealthy (an Xid error, a driver crash): allocatable drops to
        0, capacity stays."""
        size = lookup(self._core.read_node(node_name).metadata.labels["node.kubernetes.io/instance-type"])
        if size is not None and size.is_gpu:
            self._patch_status(node_name, {"allocatable": {size.gpu_resource: "0"}})

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
        self._core.patch_node_status(name, {"status": status}, _content_type="application/merge-patch+json")

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
        self._core.create_node(node)
        with self._lock:
            self._nodes[(cluster, pool)] = node["metadata"]["name"]
        size = lookup(node["metadata"]["labels"]["node.kubernetes.io/instance-type"])
        assert size is not None
        self._set_status(node["metadata"]["name"], size, ready=False, gpus=False)

    def _set_status(self, name: str, size: VmSize, ready: bool, gpus: bool) -> None:
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
        try:
            if ready:
                self._lift_not_ready_taint(name)
            self._patch_status(name, {
                "capacity": resources, "allocatable": resources, "conditions": conditions,
                "nodeInfo": {"kubeletVersion": "v1.33.5", "osImage": "Ubuntu 22.04.5 LTS", "architecture": "amd64",
                             "operatingSystem": "linux", "containerRuntimeVersion": "containerd://1.7.27",
                             "kernelVersion": "5.15.0-1089-azure", "kubeProxyVersion": "", "machineID": "",
                             "systemUUID": "", "bootID": ""},
            })
        except ApiException as error:
            if error.status != 404:  # deleted meanwhile: a kubelet would be gone too
                raise

    def _lift_not_ready_taint(self, name: str) -> None:
        # The API server taints every new Node not-ready; kube-controller-manager's node lifecycle
        # controller (absent here) lifts it once the kubelet reports Ready.
        node = self._core.read_node(name)
        taints = node.spec.taints or []
        kept = [{"key": t.key, "value": t.value, "effect": t.effect} for t in taints if t.key != NOT_READY_TAINT]
        if len(kept) != len(taints):
            self._core.patch_node(name, {"metadata": {"resourceVersion": node.metadata.resource_version},
                                         "spec": {"taints": kept}}, _content_type="application/merge-patch+json")

    def _delete(self, name: str) -> None:
        _unless_gone(lambda: self._core.delete_node(name))

    # timing -----------------------------------------------------------------------------------

    def _after(self, delay_s: float, action: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._actions, (time.monotonic() + delay_s, next(self._sequence), action))

    def _run(self) -> None:
        while not self._stop.wait(_TICK_S):
            try:
                self._settle()
            except Exception:
                log.exception("simulator settle failed")
            while True:
                with self._lock:
                    if not self._actions or self._actions[0][0] > time.monotonic():
                        break
                    entry = heapq.heappop(self._actions)
                try:
                    entry[2]()
                except (urllib3.exceptions.HTTPError, ConnectionError):
                    # The API server is down (restarting): a kubelet keeps trying, and its steps keep their order.
                    with self._lock:
                        heapq.heappush(self._actions, entry)
                    break
                except Exception:
                    log.exception("node materialiser action failed")
