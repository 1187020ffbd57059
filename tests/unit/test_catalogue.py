"""The live catalogue and the pre-flight: caching, fallback, restrictions and quota with pools in flight."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from gpu_provisioner.api.claims import INSTANCE_TYPE_LABEL, NODECLAIM
from gpu_provisioner.cloud.catalogue import SizeCatalogue
from gpu_provisioner.cloud.errors import AccessDeniedError
from gpu_provisioner.cloud.skus import GPU_RESOURCE, lookup
from gpu_provisioner.lifecycle.initialization import awaited
from gpu_provisioner.lifecycle.repair import unavailable_gpus
from tests.unit.test_phases import kaito

NC6 = lookup("Standard_NC6s_v3")


class FakeCompute:
    def __init__(self) -> None:
        self.quota = {"standardNCSv3Family": (0, 12), "cores": (0, 100)}
        self.restrictions: list[dict[str, Any]] = []
        self.denied = False
        self.reads = {"skus": 0, "usages": 0}

    def vm_sizes(self, location: str) -> list[dict[str, Any]]:
        self.reads["skus"] += 1
        if self.denied:
            raise AccessDeniedError("no Microsoft.Compute/skus/read", "AuthorizationFailed", 403)
        return [{"resourceType": "virtualMachines", "name": "Standard_NC6s_v3", "family": "standardNCSv3Family",
                 "locations": [location], "locationInfo": [{"location": location, "zones": ["1", "2"]}],
                 "capabilities": [{"name": "vCPUs", "value": "6"}, {"name": "GPUs", "value": "1"},
                                  {"name": "MemoryGB", "value": "112"}],
                 "restrictions": self.restrictions},
                {"resourceType": "virtualMachines", "name": "Standard_ND999_v9", "family": "standardNDv9Family",
                 "locations": [location], "capabilities": [{"name": "vCPUs", "value": "999"}]}]

    def usages(self, location: str) -> list[dict[str, Any]]:
        self.reads["usages"] += 1
        return [{"name": {"value": name}, "currentValue": current, "limit": limit}
                for name, (current, limit) in self.quota.items()]


def catalogue(compute: FakeCompute, now: list[float]) -> SizeCatalogue:
    return SizeCatalogue(compute, "eastus", sku_interval_s=100, quota_interval_s=10, clock=lambda: now[0])


def test_quota_counts_the_pools_in_flight_and_reads_usage_once_per_interval():
    compute, now = FakeCompute(), [0.0]
    sizes = catalogue(compute, now)
    assert sizes.reserve(NC6, "a") is None and sizes.reserve(NC6, "b") is None  # 12 of 12 vCPUs, both in flight
    refusal = sizes.reserve(NC6, "c")
    assert refusal is not None and refusal.reason == "QuotaExceeded"
    assert "standardNCSv3Family" in refusal.message and "limit 12" in refusal.message
    assert "usage 0" in refusal.message and "in flight from gpu-provisioner 12" in refusal.message
    assert "need 6" in refusal.message
    sizes.release("b")  # a PUT that was refused: its vCPUs are free again
    assert sizes.reserve(NC6, "c") is None
    assert compute.reads["usages"] == 1
    # The next interval's usage read counts the pools itself: what was in flight before it is dropped.
    now[0] = 11
    compute.quota["standardNCSv3Family"] = (6, 12)
    assert sizes.reserve(NC6, "d") is None and sizes.reserve(NC6, "e") is not None
    assert compute.reads["usages"] == 2


def test_a_refused_put_frees_its_own_vcpus_not_those_of_a_put_still_in_flight():
    compute, now = FakeCompute(), [0.0]
    sizes = catalogue(compute, now)
    assert sizes.reserve(NC6, "a") is None
    now[0] = 11  # a usage read that does not count a's pool yet drops its reservation; b's is counted in flight
    assert sizes.reserve(NC6, "b") is None
    sizes.release("a")  # a's PUT was refused after that read began
    assert sizes.reserve(NC6, "c") is None  # 6 in flight (b) + 6 of 12
    assert sizes.reserve(NC6, "d") is not None


def test_the_regional_total_limits_every_family():
    compute, now = FakeCompute(), [0.0]
    compute.quota["cores"] = (96, 100)
    refusal = catalogue(compute, now).reserve(NC6, "ws1")
    assert refusal is not None and "regional vCPU quota" in refusal.message


def test_restrictions_refuse_a_size_and_one_zone_left_does_not():
    compute, now = FakeCompute(), [0.0]
    compute.restrictions = [{"type": "Zone", "values": ["eastus"], "restrictionInfo": {"zones": ["1"]},
                             "reasonCode": "NotAvailableForSubscription"}]
    assert catalogue(compute, now).reserve(NC6, "ws1") is None
    compute.restrictions[0]["restrictionInfo"]["zones"] = ["1", "2"]
    refusal = catalogue(compute, now).reserve(NC6, "ws1")
    assert refusal is not None and refusal.reason == "SKUNotAvailable" and "every zone" in refusal.message
    compute.restrictions = [{"type": "Location", "values": ["eastus"], "reasonCode": "NotAvailableForSubscription"}]
    refusal = catalogue(compute, now).reserve(NC6, "ws1")
    assert refusal is not None and "NotAvailableForSubscription" in refusal.message
    not_offered = catalogue(compute, now).reserve(lookup("Standard_NC24ads_A100_v4"), "ws1")
    assert not_offered is not None and "not offered in eastus" in not_offered.message


def test_live_sizes_are_used_and_a_refused_read_falls_back_to_the_table_and_says_so():
    compute, now = FakeCompute(), [0.0]
    sizes = catalogue(compute, now)
    live = sizes.size("standard_nd999_v9")
    assert live is not None and live.vcpus == 999 and live.family == "standardNDv9Family"
    assert sizes.size("Standard_NC6s_v3").gpu_model == "V100"  # what the API does not say comes from the table
    assert REGISTRY.get_sample_value("gpu_provisioner_azure_catalogue_live",
                                     {"region": "eastus", "api": "resource_skus"}) == 1

    compute.denied, now[0] = True, 101
    assert sizes.size("Standard_ND999_v9") is None  # the built-in table does not know it
    assert sizes.size("Standard_NC24ads_A100_v4") == lookup("Standard_NC24ads_A100_v4")
    assert sizes.reserve(lookup("Standard_NC24ads_A100_v4"), "ws1") is None  # no restriction check without the list
    assert REGISTRY.get_sample_value("gpu_provisioner_azure_catalogue_live",
                                     {"region": "eastus", "api": "resource_skus"}) == 0
    assert compute.reads["skus"] == 2


def test_without_compute_access_the_table_is_used_and_nothing_is_refused():
    sizes = SizeCatalogue()
    assert sizes.size("Standard_NC6s_v3") == NC6 and sizes.reserve(NC6, "ws1") is None


def test_warm_up_reads_both_once_so_the_start_up_log_says_what_is_in_use():
    compute, now = FakeCompute(), [0.0]
    sizes = catalogue(compute, now)
    sizes.warm_up()
    assert compute.reads == {"skus": 1, "usages": 1}
    assert sizes.reserve(NC6, "ws1") is None and compute.reads == {"skus": 1, "usages": 1}  # within the intervals


def test_a_gpu_size_only_the_live_catalogue_knows_is_initialized_only_with_its_gpus_and_repaired_without_them():
    """Initialization and node repair ask the live catalogue what a size's GPUs are, not only the built-in table."""
    compute = FakeCompute()
    compute.vm_sizes = lambda location: [{
        "resourceType": "virtualMachines", "name": "Standard_ND999_v9", "family": "standardNDv9Family",
        "locations": [location], "capabilities": [{"name": "vCPUs", "value": "96"}, {"name": "GPUs", "value": "8"}],
    }]
    sizes = catalogue(compute, [0.0])
    assert lookup("Standard_ND999_v9") is None
    claim = kaito(NODECLAIM)
    node = {"metadata": {"name": "n1", "labels": {INSTANCE_TYPE_LABEL: "Standard_ND999_v9"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"cpu": "95"}}}
    assert awaited(claim, node, sizes.size).reason == "ResourceNotRegistered"
    assert unavailable_gpus(node, sizes.size) == f"no allocatable {GPU_RESOURCE}"
    node["status"]["allocatable"][GPU_RESOURCE] = "7"  # initialization waits for all of them; repair counts them
    assert "want 8, node has 7" in awaited(claim, node, sizes.size).message
    assert unavailable_gpus(node, sizes.size) == f"7 of 8 {GPU_RESOURCE} allocatable"
    node["status"]["allocatable"][GPU_RESOURCE] = "8"
    assert awaited(claim, node, sizes.size) is None and unavailable_gpus(node, sizes.size) == ""
