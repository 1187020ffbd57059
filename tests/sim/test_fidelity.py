"""The simulator's answers checked against what real AKS and ARM send, as recorded in the public Azure SDK
test recordings and Microsoft's REST API documentation (the sources and the facts taken from each are listed
in gpu_provisioner/sim/FIDELITY.md), and its Compute endpoints through the real azure-mgmt-compute SDK."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.identity import DefaultAzureCredential
from azure.mgmt.compute import ComputeManagementClient

from tests.sim.test_simulator import GPU_POOL, arm_error, sdk

API = "api-version=2025-10-01"


@pytest.fixture
def sim(start_sim):
    return start_sim(materialise_nodes=False, create_delay_s=0.5, delete_delay_s=0.5)


def test_pool_create_poll_get_delete_and_404_look_like_real_aks(sim, monkeypatch):
    client = sdk(sim, monkeypatch)
    pool_url = (f"{sim.endpoint}/subscriptions/{sim.subscription_id}/resourceGroups/{sim.resource_group}/providers/"
                f"Microsoft.ContainerService/managedClusters/{sim.cluster_name}/agentPools/fidelity?{API}")

    created = client.send_request(HttpRequest("PUT", pool_url, json=GPU_POOL))
    # A create: 201, the pool in Creating, polled through Azure-AsyncOperation only; the request id is the
    # operation's id; resource ids spell "resourcegroups" in lower case.
    assert created.status_code == 201
    assert "Location" not in created.headers
    operation_url = created.headers["Azure-AsyncOperation"]
    operation_id = urlsplit(operation_url).path.rsplit("/", 1)[1]
    assert urlsplit(operation_url).path == (f"/subscriptions/{sim.subscription_id}/providers/"
                                            f"Microsoft.ContainerService/locations/{sim.location}/operations/{operation_id}")
    assert created.headers["x-ms-request-id"] == operation_id
    body = created.json()
    assert body["properties"]["provisioningState"] == "Creating"
    assert body["type"] == "Microsoft.ContainerService/managedClusters/agentPools"
    assert f"/resourcegroups/{sim.resource_group}/" in body["id"]

    # The operation status: name, status and startTime while it runs; endTime once it has ended.
    running = client.send_request(HttpRequest("GET", operation_url)).json()
    assert set(running) == {"name", "status", "startTime"} and running["status"] == "InProgress"
    sim.aks._clock = lambda: float("inf")  # every operation's time has come
    done = client.send_request(HttpRequest("GET", operation_url)).json()
    assert set(done) == {"name", "status", "startTime", "endTime"} and done["status"] == "Succeeded"
    got = client.send_request(HttpRequest("GET", pool_url))
    assert got.status_code == 200 and got.json()["properties"]["provisioningState"] == "Succeeded"

    # A delete: 202, no body, polled through Azure-AsyncOperation and Location (operationresults).
    sim.aks._clock = lambda: 0.0
    deleted = client.send_request(HttpRequest("DELETE", pool_url))
    assert deleted.status_code == 202 and deleted.content == b""
    assert "/operations/" in deleted.headers["Azure-AsyncOperation"]
    assert "/operationresults/" in deleted.headers["Location"]
    sim.aks._clock = lambda: float("inf")

    # Gone: 404 with code NotFound and the words the Go gpu-provisioner (written against real AKS) looks for.
    gone = arm_error(lambda: client.agent_pools.get(sim.resource_group, sim.cluster_name, "fidelity"))
    assert gone.status_code == 404 and gone.error.code == "NotFound" and "Agent Pool not found" in gone.error.message


def compute_sdk(sim, monkeypatch) -> ComputeManagementClient:
    for name, value in sim.azure_environment().items():
        monkeypatch.setenv(name, value)
    return ComputeManagementClient(DefaultAzureCredential(disable_instance_discovery=True), sim.subscription_id,
                                   base_url=sim.endpoint)


def test_resource_skus_and_usages_answer_from_the_scenario_with_the_numbers_puts_are_judged_by(start_sim, monkeypatch):
    sim = start_sim(materialise_nodes=False, create_delay_s=0.2, vcpu_quota={"standardNCSv3Family": 12},
                    regional_vcpu_quota=100, unavailable_skus=["Standard_NC24ads_A100_v4"],
                    zone_restricted_skus={"Standard_NC40ads_H100_v5": ["2"],
                                          "Standard_NV36ads_A10_v5": ["1", "2", "3"]})
    compute = compute_sdk(sim, monkeypatch)
    skus = {sku.name: sku for sku in compute.resource_skus.list(filter=f"location eq '{sim.location}'")}
    assert list(compute.resource_skus.list(filter="location eq 'westeurope'")) == []
    nc6 = skus["Standard_NC6s_v3"]
    assert nc6.resource_type == "virtualMachines" and nc6.family == "standardNCSv3Family"
    assert {c.name: c.value for c in nc6.capabilities} == {"vCPUs": "6", "MemoryGB": "112", "GPUs": "1"}
    assert nc6.location_info[0].zones == ["1", "2", "3"] and nc6.restrictions == []
    a100 = skus["Standard_NC24ads_A100_v4"].restrictions
    assert [(r.type, r.reason_code, r["values"]) for r in a100] == [("Location", "NotAvailableForSubscription",
                                                                     ["eastus"])]
    h100 = skus["Standard_NC40ads_H100_v5"].restrictions
    assert [(r.type, r.restriction_info.zones) for r in h100] == [("Zone", ["2"])]
    assert "GPUs" not in {c.name for c in skus["Standard_D4s_v5"].capabilities}

    def usage() -> dict[str, tuple[int, int]]:
        return {u.name.value: (u.current_value, u.limit) for u in compute.usage.list(sim.location)}

    assert usage()["standardNCSv3Family"] == (0, 12) and usage()["cores"] == (0, 100)
    client = sdk(sim, monkeypatch)
    client.agent_pools.begin_create_or_update(sim.resource_group, sim.cluster_name, "one", GPU_POOL,
                                              polling=False).result()
    client.agent_pools.begin_create_or_update(sim.resource_group, sim.cluster_name, "two", GPU_POOL,
                                              polling=False).result()
    assert usage()["standardNCSv3Family"] == (12, 12) and usage()["cores"] == (12, 100)
    # Usage says the family is full; the PUT says so too.
    full = arm_error(lambda: client.agent_pools.begin_create_or_update(
        sim.resource_group, sim.cluster_name, "three", GPU_POOL, polling=False))
    assert full.error.code == "ErrCode_InsufficientVCPUQuota" and "remaining 0" in full.error.message
    # A Location restriction, or a Zone restriction in every zone, refuses the PUT; one zone left does not.
    for size, refused in (("Standard_NC24ads_A100_v4", True), ("Standard_NV36ads_A10_v5", True),
                          ("Standard_NC40ads_H100_v5", False)):
        body = {"properties": {**GPU_POOL["properties"], "vmSize": size}}
        put = lambda body=body: client.agent_pools.begin_create_or_update(  # noqa: E731
            sim.resource_group, sim.cluster_name, "zonal", body, polling=False).result()
        if refused:
            assert "not allowed in your subscription" in arm_error(put).error.message
        else:
            put()


def test_denied_compute_reads_are_refused_like_azure_rbac(start_sim, monkeypatch):
    sim = start_sim("no-compute-read-access", materialise_nodes=False)
    compute = compute_sdk(sim, monkeypatch)
    for read, action in ((lambda: list(compute.resource_skus.list()), "Microsoft.Compute/skus/read"),
                         (lambda: list(compute.usage.list(sim.location)), "Microsoft.Compute/locations/usages/read")):
        with pytest.raises(HttpResponseError) as denied:
            read()
        assert denied.value.status_code == 403 and denied.value.error.code == "AuthorizationFailed"
        assert action in denied.value.error.message
    assert sim.count_requests("skus.list", 403) == 1 and sim.count_requests("usages.list", 403) == 1
