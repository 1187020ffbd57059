"""The read-only door to Azure Compute: the region's VM sizes (Resource SKUs API) and its vCPU usage and
limits per quota family (Usages API). Nothing here writes; answers are returned as ARM sends them (camelCase
dicts) for cloud/catalogue.py to read.

Two GETs do not need a client of their own: they go through the agent-pool client's ARM pipeline (same
endpoint, credential and policies). azure-mgmt-compute would add about 14 MiB and a quarter of a second of CPU
to every start for them."""

from __future__ import annotations

from typing import Any

from gpu_provisioner.cloud.agentpools import AgentPools, call_arm

# The versions azure-mgmt-compute 39 sends for these two operations.
SKUS_API_VERSION = "2021-07-01"
USAGES_API_VERSION = "2026-04-01"


class ComputeReads:
    def __init__(self, pools: AgentPools) -> None:
        self._pools = pools
        self._subscription = f"/subscriptions/{pools.settings.subscription_id}/providers/Microsoft.Compute"

    def vm_sizes(self, location: str) -> list[dict[str, Any]]:
        """The virtual-machine SKUs ARM lists for the region, restrictions included (Microsoft.Compute/skus/read)."""
        return call_arm(lambda: [
            sku for sku in self._pools.read_all(f"{self._subscription}/skus", SKUS_API_VERSION,
                                                {"$filter": f"location eq '{location}'"})
            if sku.get("resourceType") == "virtualMachines"
        ])

    def usages(self, location: str) -> list[dict[str, Any]]:
        """vCPU usage and limit per quota family, and the regional total ("cores")
        (Microsoft.Compute/locations/usages/read)."""
        return call_arm(lambda: self._pools.read_all(f"{self._subscription}/locations/{location}/usages",
                                                     USAGES_API_VERSION))
