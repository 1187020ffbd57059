"""The simulated AKS resource provider: managed clusters, agent pools, long-running operations.

State advances with time (no thread needed): every call first settles the operations whose delay
has passed. Errors are raised as ArmError with the HTTP status, code and message AKS would send.
"""

from __future__ import annotations

import heapq
import itertools
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gpu_provisioner.cloud.skus import CATALOGUE, lookup
from gpu_provisioner.sim import timeline
from gpu_provisioner.sim.scenario import Scenario

POOL_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
TAINT = re.compile(
    r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?=[A-Za-z0-9_.-]*:(NoSchedule|PreferNoSchedule|NoExecute)$"
)
RESERVED_LABEL_DOMAINS = ("kubernetes.azure.com", "kubernetes.io", "k8s.io")
ORCHESTRATOR_VERSION = "1.33.5"
ZONES = ("1", "2", "3")
# What the Usages API says for a quota the scenario leaves unlimited.
UNLIMITED_VCPUS = 1_000_000
NODE_IMAGE_VERSION = "AKSUbuntu-2204gen2containerd-202611.10.0"


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str, target: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.target = status, code, message, target

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.target:
            error["target"] = self.target
        return {"error": error}


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Operation:
    id: str
    kind: str  # "create" | "delete"
    cluster: str
    pool: str
    due: float
    started: str = field(default_factory=_now_iso)
    status: str = "InProgress"
    error: dict[str, Any] | None = None
    ended: str | None = None
    result: dict[str, Any] | None = None


@dataclass
class Pool:
    cluster: str
    name: str
    properties: dict[str, Any]
    operation: Operation | None = None


class Aks:
    """Managed clusters and their agent pools in one subscription and resource group."""

    def __init__(self, scenario: Scenario, subscription_id: str, resource_group: str, location: str,
                 clusters: tuple[str, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self.scenario = scenario
        self.subscription_id, self.resource_group, self.location = subscription_id, resource_group, location
        self.clusters = {name: scenario.cluster_power for name in clusters}
        self.pools: dict[tuple[str, str], Pool] = {}
        self.operations: dict[str, Operation] = {}
        # Operations in progress by due time (an entry whose pool has since moved on is skipped): settling looks at
        # what is due, not at every pool, so a thousand pools cost no more per request than one.
        self._due: list[tuple[float, int, Operation]] = []
        self._sequence = itertools.count()
        # Pools each PUT created, per (cluster, name): whether its answer reached the client or not.
        self.creations: Counter[tuple[str, str]] = Counter()
        self.timeline = timeline.Timeline()
        self.lock = threading.RLock()
        self._clock = clock
        # Called (cluster, pool body) when a pool has been created, and (cluster, name) once deleted.
        self.on_pool_created: Callable[[str, dict[str, Any]], None] = lambda cluster, pool: None
        self.on_pool_deleted: Callable[[str, str], None] = lambda cluster, name: None
        # Called when an operation starts, so that whoever settles operations on time wakes for it.
        self.on_operation_started: Callable[[], None] = lambda: None

    def node_resource_group(self, cluster: str) -> str:
        return f"MC_{self.resource_group}_{cluster}_{self.location}"

    # reads ------------------------------------------------------------------------------------

    def cluster(self, cluster: str) -> dict[str, Any]:
        power = self._cluster_power(cluster)
        provisioning = {"Starting": "Starting", "Stopping": "Stopping"}.get(power, "Succeeded")
        return {
            "id": self._cluster_id(cluster), "name": cluster, "type": "Microsoft.ContainerService/ManagedClusters",
            "location": self.location,
            "properties": {
                "provisioningState": provisioning,
                "powerState": {"code": "Stopped" if power == "Stopped" else "Running"},
                "kubernetesVersion": ORCHESTRATOR_VERSION, "nodeResourceGroup": self.node_resource_group(cluster),
            },
        }

    def get_pool(self, cluster: str, name: str) -> dict[str, Any]:
        with self.lock:
            self.settle()
            self._cluster_power(cluster)
            pool = self.pools.get((cluster, name.lower()))
            if pool is None:
                # Real AKS's code and wording (the Go gpu-provisioner, written against it, matches "Agent Pool not
                # found"): see sim/FIDELITY.md.
                raise ArmError(404, "NotFound", f"Agent Pool not found: {name} in managed cluster {cluster}.")
            return self._pool_body(pool)

    def list_pools(self, cluster: str) -> dict[str, Any]:
        with self.lock:
            self.settle()
            self._cluster_power(cluster)
            return {"value": [self._pool_body(p) for (c, _), p in sorted(self.pools.items()) if c == cluster]}

    def resource_skus(self) -> list[dict[str, Any]]:
        """The region's virtual-machine SKUs as the Resource SKUs API lists them, restrictions from the scenario."""
        unavailable = {s.lower() for s in self.scenario.unavailable_skus}
        zone_restricted = {name.lower(): zones for name, zones in self.scenario.zone_restricted_skus.items()}
        skus = []
        for size in CATALOGUE.values():
            restrictions = []
            if size.name.lower() in unavailable:
                restrictions.append({"type": "Location", "values": [self.location],
                                     "restrictionInfo": {"locations": [self.location]},
                                     "reasonCode": "NotAvailableForSubscription"})
            if zones := zone_restricted.get(size.name.lower()):
                restrictions.append({"type": "Zone", "values": [self.location],
                                     "restrictionInfo": {"locations": [self.location], "zones": list(zones)},
                                     "reasonCode": "NotAvailableForSubscription"})
            capabilities = {"vCPUs": size.vcpus, "MemoryGB": size.memory_gib, "GPUs": size.gpu_count}
            skus.append({
                "resourceType": "virtualMachines", "name": size.name, "tier": "Standard",
                "size": size.name.removeprefix("Standard_"), "family": size.family, "locations": [self.location],
                "locationInfo": [{"location": self.location, "zones": list(ZONES), "zoneDetails": []}],
                "capabilities": [{"name": k, "value": str(v)} for k, v in capabilities.items() if v or k != "GPUs"],
                "restrictions": restrictions,
            })
        return skus

    def usages(self) -> list[dict[str, Any]]:
        """vCPU usage and limit per family and in all (the Usages API), from the numbers the PUTs are judged by."""
        with self.lock:
            self.settle()
            families = sorted({size.family for size in CATALOGUE.values()})
            usages = [(family, f"{family} vCPUs", self._family_vcpus(family),
                       self.scenario.vcpu_quota.get(family, UNLIMITED_VCPUS)) for family in families]
            regional = self.scenario.regional_vcpu_quota
            usages.append(("cores", "Total Regional vCPUs", self._family_vcpus(None),
                           UNLIMITED_VCPUS if regional is None else regional))
        return [{"unit": "Count", "currentValue": current, "limit": limit,
                 "name": {"value": name, "localizedValue": localized}} for name, localized, current, limit in usages]

    def operation(self, operation_id: str) -> Operation:
        with self.lock:
            self.settle()
            operation = self.operations.get(operation_id)
            if operation is None:
                raise ArmError(404, "NotFound", f"Operation {operation_id} not found.")
            return operation

    # writes -----------------------------------------------------------------------------------

    def put_pool(self, cluster: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], Operation | None]:
        """201 + operation for a new pool, 200 for an unchanged one; ArmError otherwise."""
        with self.lock:
            self.settle()
            properties = dict(body.get("properties") or {})
            self._validate(cluster, name, properties)
            existing = self.pools.get((cluster, name))
            if existing is not None:
                if existing.operation is not None:
                    raise self._busy(existing)
                succeeded = existing.properties.get("provisioningState") == "Succeeded"
                if succeeded and self._same_spec(existing, properties):
                    return 200, self._pool_body(existing), None
                raise ArmError(400, "InvalidParameter",
                               f"Changing properties of agent pool {name} is not supported by this simulator.")
            self._check_cluster_accepts_writes(cluster)
            if self.scenario.subnet_full:
                raise ArmError(400, "InsufficientSubnetSize", "Pre-allocated IPs 31 exceeds IPs available 0 in Subnet "
                               "Cidr 10.224.0.0/24, Subnet Name aks-subnet. http://aka.ms/aks-insufficient-subnet-size")
            self._check_offer_and_quota(cluster, name, properties)
            properties.update(provisioningState="Creating", powerState={"code": "Running"},
                              orchestratorVersion=ORCHESTRATOR_VERSION, currentOrchestratorVersion=ORCHESTRATOR_VERSION,
                              nodeImageVersion=NODE_IMAGE_VERSION)
            pool = Pool(cluster, name, properties)
            pool.operation = self._start(pool, "create", self.scenario.create_delay_s)
            self.pools[(cluster, name)] = pool
            self.creations[(cluster, name)] += 1
            received = self._clock()
            self.timeline.record(cluster, name, timeline.PUT, received, received)
            return 201, self._pool_body(pool), pool.operation

    def delete_pool(self, cluster: str, name: str) -> Operation | None:
        """The delete operation, or None (204) when there is no such pool."""
        with self.lock:
            self.settle()
            pool = self.pools.get((cluster, name.lower()))
            if pool is None:
                self._cluster_power(cluster)
                return None
            if pool.operation is not None:
                raise self._busy(pool)
            self._check_cluster_accepts_writes(cluster)
            pool.properties["provisioningState"] = "Deleting"
            pool.operation = self._start(pool, "delete", self.scenario.delete_delay_s)
            received = self._clock()
            self.timeline.record(cluster, pool.name, timeline.DELETE, received, received)
            return pool.operation

    def seed_pool(self, cluster: str, name: str, vm_size: str, tags: dict[str, str],
                  node_labels: dict[str, str]) -> dict[str, Any]:
        """A pool already Succeeded, as if made earlier (by us before a restart, or by someone else)."""
        with self.lock:
            properties = {
                "count": 1, "vmSize": vm_size, "osType": "Linux", "osSKU": "Ubuntu", "mode": "User",
                "type": "VirtualMachineScaleSets", "tags": tags, "nodeLabels": node_labels, "nodeTaints": [],
                "provisioningState": "Succeeded", "powerState": {"code": "Running"},
                "orchestratorVersion": ORCHESTRATOR_VERSION, "nodeImageVersion": NODE_IMAGE_VERSION,
            }
            pool = Pool(cluster, name, properties)
            self.pools[(cluster, name)] = pool
            body = self._pool_body(pool)
        self.on_pool_created(cluster, body)
        return body

    def set_cluster_power(self, cluster: str, power: str) -> None:
        with self.lock:
            self._cluster_power(cluster)
            self.clusters[cluster] = power

    # time -------------------------------------------------------------------------------------

    def settle(self) -> float | None:
        """Finish every operation whose time has come; when the next one is due (None: none in progress)."""
        created: list[tuple[str, dict[str, Any]]] = []
        deleted: list[tuple[str, str]] = []
        next_due: float | None = None
        with self.lock:
            now = self._clock()
            while self._due:
                due, _, operation = self._due[0]
                key = (operation.cluster, operation.pool)
                pool = self.pools.get(key)
                if pool is None or pool.operation is not operation:
                    heapq.heappop(self._due)
                    continue
                if due > now:
                    next_due = due
                    break
                heapq.heappop(self._due)
                pool.operation = None
                operation.ended = _now_iso()
                step = timeline.DELETED if operation.kind == "delete" else timeline.CREATED
                self.timeline.record(pool.cluster, pool.name, step, operation.due, now)
                if operation.kind == "delete":
                    del self.pools[key]
                    operation.status = "Succeeded"
                    deleted.append(key)
                elif pool.properties["vmSize"].lower() in {s.lower() for s in self.scenario.allocation_failure_skus}:
                    error = {
                        "code": "AllocationFailed",
                        "message": f"Allocation failed. We do not have sufficient capacity for the requested VM size "
                                   f"{pool.properties['vmSize']} in region {self.location}. Read more about "
                                   "improving likelihood of allocation success at http://aka.ms/allocation-guidance",
                    }
                    operation.status, operation.error = "Failed", error
                    pool.properties["provisioningState"] = "Failed"
                    pool.properties["status"] = {"provisioningError": error}
                else:
                    operation.status = "Succeeded"
                    pool.properties["provisioningState"] = "Succeeded"
                    operation.result = self._pool_body(pool)
                    created.append((pool.cluster, operation.result))
        for cluster, body in created:
            self.on_pool_created(cluster, body)
        for cluster, name in deleted:
            self.on_pool_deleted(cluster, name)
        return next_due

    # internals --------------------------------------------------------------------------------

    def _cluster_id(self, cluster: str) -> str:
        # Real AKS writes this segment in lower case in the ids it returns (sim/FIDELITY.md).
        return (f"/subscriptions/{self.subscription_id}/resourcegroups/{self.resource_group}"
                f"/providers/Microsoft.ContainerService/managedClusters/{cluster}")

    def _cluster_power(self, cluster: str) -> str:
        power = self.clusters.get(cluster)
        if power is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource 'Microsoft.ContainerService/managedClusters/"
                           f"{cluster}' under resource group '{self.resource_group}' was not found.")
        return power

    def _pool_body(self, pool: Pool) -> dict[str, Any]:
        return {
            "id": f"{self._cluster_id(pool.cluster)}/agentPools/{pool.name}", "name": pool.name,
            "type": "Microsoft.ContainerService/managedClusters/agentPools",
            "properties": dict(pool.properties),
        }

    def _start(self, pool: Pool, kind: str, delay_s: float) -> Operation:
        operation = Operation(str(uuid.uuid4()), kind, pool.cluster, pool.name, self._clock() + delay_s)
        self.operations[operation.id] = operation
        heapq.heappush(self._due, (operation.due, next(self._sequence), operation))
        self.on_operation_started()
        return operation

    @staticmethod
    def _busy(pool: Pool) -> ArmError:
        operation = pool.operation
        verb = "create" if operation and operation.kind == "create" else "delete"
        return ArmError(409, "OperationNotAllowed", f"Operation is not allowed because there's an in progress {verb} "
                        f"node pool operation on agent pool {pool.name}. Please wait for it to finish.")

    @staticmethod
    def _same_spec(pool: Pool, properties: dict[str, Any]) -> bool:
        return all(pool.properties.get(k) == v for k, v in properties.items())

    def _check_cluster_accepts_writes(self, cluster: str) -> None:
        power = self._cluster_power(cluster)
        if power != "Running":
            raise ArmError(409, "OperationNotAllowed", f"Operation is not allowed because the managed cluster {cluster}"
                           f" is in {power} state. Please wait or start the cluster first.")

    def _validate(self, cluster: str, name: str, properties: dict[str, Any]) -> None:
        self._cluster_power(cluster)
        if not POOL_NAME.match(name):
            raise ArmError(400, "InvalidParameter", "The value of parameter agentPoolProfile.name is invalid. Please "
                           "see https://aka.ms/aks-naming-rules for more details.", "agentPoolProfile.name")
        count = properties.get("count", 1)
        if not isinstance(count, int) or not 0 <= count <= 1000:
            raise ArmError(400, "InvalidParameter", f"The value of parameter agentPoolProfile.count is invalid: "
                           f"{count}.", "agentPoolProfile.count")
        vm_size = properties.get("vmSize", "")
        if lookup(vm_size) is None or vm_size.lower() in {s.lower() for s in self.scenario.unsupported_skus}:
            raise ArmError(400, "InvalidParameter", f"The VM size of {vm_size or '(none)'} is not supported.",
                           "agentPoolProfile.vmSize")
        disk = properties.get("osDiskSizeGB")
        if disk is not None and not 30 <= disk <= 2048:
            raise ArmError(400, "InvalidParameter", f"The value of parameter agentPoolProfile.osDiskSizeGB is invalid: "
                           f"{disk}; it must be between 30 and 2048.", "agentPoolProfile.osDiskSizeGB")
        for key in properties.get("nodeLabels") or {}:
            domain = key.split("/", 1)[0] if "/" in key else ""
            if any(domain == d or domain.endswith("." + d) for d in RESERVED_LABEL_DOMAINS):
                raise ArmError(400, "InvalidParameter", f"Label key {key} is reserved and cannot be set on an agent "
                               "pool.", "agentPoolProfile.nodeLabels")
        for taint in properties.get("nodeTaints") or []:
            if not TAINT.match(taint):
                raise ArmError(400, "InvalidParameter", f"Taint {taint} is invalid: taints must be key=value:Effect "
                               "with Effect NoSchedule, PreferNoSchedule or NoExecute.", "agentPoolProfile.nodeTaints")

    def _check_offer_and_quota(self, cluster: str, name: str, properties: dict[str, Any]) -> None:
        size = lookup(properties["vmSize"])
        assert size is not None  # validated
        restricted_zones = next((zones for sku, zones in self.scenario.zone_restricted_skus.items()
                                 if sku.lower() == size.name.lower()), [])
        restricted_everywhere = set(ZONES) <= set(restricted_zones)
        if size.name.lower() in {s.lower() for s in self.scenario.unavailable_skus} or restricted_everywhere:
            # AKS's own wording: a generic code, the cause only in the message.
            raise ArmError(400, "BadRequest", f"The VM size of AgentPoolProfile:{name} is "
                           f"not allowed in your subscription in location '{self.location}'. For more details, "
                           "please visit https://aka.ms/aks/quotas-skus-regions")
        needed = size.vcpus * properties.get("count", 1)
        for family, limit in ((size.family, self.scenario.vcpu_quota.get(size.family)),
                              (None, self.scenario.regional_vcpu_quota)):
            if limit is None:
                continue
            used = self._family_vcpus(family)
            if used + needed > limit:
                raise ArmError(400, "ErrCode_InsufficientVCPUQuota", f"Insufficient vcpu quota requested {needed}, "
                               f"remaining {max(limit - used, 0)} for family {family or 'cores'} for region "
                               f"{self.location}.")

    def _family_vcpus(self, family: str | None) -> int:
        """vCPUs of every pool in the region (all clusters) of `family`, or of all families (None)."""
        return sum(size.vcpus * pool.properties.get("count", 1) for pool in self.pools.values()
                   if (size := lookup(pool.properties["vmSize"])) is not None and family in (None, size.family))
