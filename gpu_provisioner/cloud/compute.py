"""The read-only door to Azure Compute: the region's VM sizes (Resource SKUs API) and its vCPU usage and
limits per quota family (Usages API). Nothing here writes; answers are returned as ARM sends them (camelCase
dicts: the SDK's models are mappings of the wire format) for cloud/catalogue.py to read."""

from __future__ import annotations

from typing import Any

from azure.core.credentials import TokenCredential
from azure.mgmt.compute import ComputeManagementClient

from gpu_provisioner.cloud.agentpools import arm_client_options, call_arm, default_credential
from gpu_provisioner.settings import Settings


class ComputeReads:
    def __init__(self, settings: Settings, credential: TokenCredential | None = None) -> None:
        self._client = ComputeManagementClient(
            credential or default_credential(settings), settings.subscription_id, **arm_client_options(settings)
        )

    def close(self) -> None:
        self._client.close()

    def vm_sizes(self, location: str) -> list[dict[str, Any]]:
        """The virtual-machine SKUs ARM lists for the region, restrictions included (Microsoft.Compute/skus/read)."""
        return call_arm(lambda: [
            sku.as_dict() for sku in self._client.resource_skus.list(filter=f"location eq '{location}'")
            if sku.resource_type == "virtualMachines"
        ])

    def usages(self, location: str) -> list[dict[str, Any]]:
        """vCPU usage and limit per quota family, and the regional total ("cores")
        (Microsoft.Compute/locations/usages/read)."""
        return call_arm(lambda: [usage.as_dict() for usage in self._client.usage.list(location)])
