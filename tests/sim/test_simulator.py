"""The AKS simulator, driven only by the real Azure SDK and azure-identity over HTTPS."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import kubernetes
import pytest
from azure.core.exceptions import HttpResponseError
from azure.identity import DefaultAzureCredential
from azure.mgmt.containerservice import ContainerServiceClient

from gpu_provisioner.sim import AksSimulator, Scenario, timeline
from tests.integration.harness import interrupt, wait_for

GPU_POOL = {"properties": {"count": 1, "vmSize": "Standard_NC6s_v3", "osType": "Linux", "mode": "User",
                           "nodeLabels": {"kaito.sh/workspace": "ws"}, "nodeTaints": ["sku=gpu:NoSchedule"]}}


FAST = {"create_delay_s": 0.3, "delete_delay_s": 0.3, "node_join_delay_s": 0.1, "node_ready_delay_s": 0.3,
        "gpu_publish_delay_s": 0.3}


@pytest.fixture
def simulator(start_sim) -> Callable[..., AksSimulator]:
    return lambda nodes=True, **scenario: start_sim(materialise_nodes=nodes, **{**FAST, **scenario})


def sdk(sim: AksSimulator, monkeypatch: pytest.MonkeyPatch) -> ContainerServiceClient:
    """The SDK client as production builds it: DefaultAzureCredential from the environment, TLS verified."""
    for name, value in sim.azure_environment().items():
        monkeypatch.setenv(name, value)
    credential = DefaultAzureCredential(disable_instance_discovery=True)
    return ContainerServiceClient(credential, sim.subscription_id, base_url=sim.endpoint, polling_interval=0.1)


def create(client: ContainerServiceClient, sim: AksSimulator, name: str, body: dict = GPU_POOL):
    return client.agent_pools.begin_create_or_update(sim.resource_group, sim.cluster_name, name, body)


def arm_error(call: Callable[[], object]) -> HttpResponseError:
    with pytest.raises(HttpResponseError) as raised:
        call()
    return raised.value


def test_pool_lifecycle_and_its_node(simulator, monkeypatch, kube_api, unique_name):
    sim = simulator()
    client = sdk(sim, monkeypatch)
    poller = create(client, sim, unique_name)
    assert poller.status() == "InProgress"
    pool = poller.result()
    assert pool.provisioning_state == "Succeeded" and pool.vm_size == "Standard_NC6s_v3"
    assert [p.name for p in client.agent_pools.list(sim.resource_group, sim.cluster_name)] == [unique_name]
    cluster = client.managed_clusters.get(sim.resource_group, sim.cluster_name)
    assert cluster.power_state.code == "Running" and cluster.node_resource_group == sim.node_resource_group

    core = kubernetes.client.CoreV1Api(kube_api)
    node = wait_for("the pool's node", lambda: next(
        (n for n in core.list_node().items if n.metadata.labels.get("agentpool") == unique_name), None))
    assert node.metadata.name.startswith(f"aks-{unique_name}-") and node.metadata.name.endswith("-vmss000000")
    assert node.spec.provider_id == (
        f"azure:///subscriptions/{sim.subscription_id}/resourceGroups/{sim.node_resource_group.lower()}/providers/"
        f"Microsoft.Compute/virtualMachineScaleSets/{node.metadata.name.removesuffix('000000')}/virtualMachines/0"
    )
    labels = node.metadata.labels
    assert labels["kubernetes.azure.com/agentpool"] == unique_name and labels["kaito.sh/workspace"] == "ws"
    assert labels["node.kubernetes.io/instance-type"] == "Standard_NC6s_v3"
    assert labels["topology.kubernetes.io/region"] == "eastus"
    # As on AKS, a new Node carries the not-ready taint until it is Ready.
    assert {(t.key, t.effect) for t in node.spec.taints} == {("sku", "NoSchedule"),
                                                           ("node.kubernetes.io/not-ready", "NoSchedule")}
    assert "nvidia.com/gpu" not in (node.status.allocatable or {})

    def gpus() -> str | None:
        status = core.read_node(node.metadata.name).status
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
        return (status.allocatable or {}).get("nvidia.com/gpu") if ready else None

    assert wait_for("GPUs on a Ready node", gpus) == "1"
    taints = core.read_node(node.metadata.name).spec.taints
    assert [(t.key, t.value, t.effect) for t in taints] == [("sku", "gpu", "NoSchedule")]

    client.agent_pools.begin_delete(sim.resource_group, sim.cluster_name, unique_name).result()
    gone = arm_error(lambda: client.agent_pools.get(sim.resource_group, sim.cluster_name, unique_name))
    assert gone.status_code == 404
    wait_for("the node to leave", lambda: node.metadata.name not in {n.metadata.name for n in core.list_node().items})
    assert sim.count_requests("agentpools.create", 201) == 1 and sim.count_requests("agentpools.delete", 202) == 1


@pytest.mark.parametrize(
    ("name", "change", "target"),
    [
        ("Bad_Name", {}, "agentPoolProfile.name"),
        ("toolongpoolname", {}, "agentPoolProfile.name"),
        ("1abc", {}, "agentPoolProfile.name"),
        ("ok", {"count": 1001}, "agentPoolProfile.count"),
        ("ok", {"vmSize": "Standard_Imaginary_v9"}, "agentPoolProfile.vmSize"),
        ("ok", {"osDiskSizeGB": 10}, "agentPoolProfile.osDiskSizeGB"),
        ("ok", {"nodeLabels": {"kubernetes.azure.com/mode": "system"}}, "agentPoolProfile.nodeLabels"),
        ("ok", {"nodeTaints": ["sku=gpu:Sometimes"]}, "agentPoolProfile.nodeTaints"),
    ],
)
def test_invalid_requests_are_refused_like_aks(simulator, monkeypatch, name, change, target):
    sim = simulator(nodes=False)
    body = {"properties": {**GPU_POOL["properties"], **change}}
    error = arm_error(lambda: create(sdk(sim, monkeypatch), sim, name, body))
    assert error.status_code == 400 and error.error.code == "InvalidParameter" and error.error.target == target
    assert sim.pools() == {}


def test_quota_and_offer_failures_are_synchronous(simulator, monkeypatch):
    sim = simulator(nodes=False, vcpu_quota={"standardNCSv3Family": 6}, unavailable_skus=["Standard_NC24ads_A100_v4"])
    client = sdk(sim, monkeypatch)
    create(client, sim, "first").result()  # 6 vCPUs: exactly the quota
    quota = arm_error(lambda: create(client, sim, "second"))
    assert quota.status_code == 400 and quota.error.code == "ErrCode_InsufficientVCPUQuota"
    assert quota.error.message == "Insufficient vcpu quota requested 6, remaining 0 for family standardNCSv3Family " \
        "for region eastus."
    a100 = {"properties": {**GPU_POOL["properties"], "vmSize": "Standard_NC24ads_A100_v4"}}
    offer = arm_error(lambda: create(client, sim, "third", a100))
    assert offer.status_code == 400 and offer.error.code == "BadRequest"
    assert "VM size of AgentPoolProfile:third is not allowed in your subscription" in offer.error.message
    assert set(sim.pools()) == {"first"}


def test_allocation_failure_ends_the_operation_failed(simulator, monkeypatch):
    sim = simulator(nodes=False, allocation_failure_skus=["Standard_NC6s_v3"])
    poller = create(sdk(sim, monkeypatch), sim, "alloc")
    error = arm_error(poller.result)
    assert error.error.code == "AllocationFailed"
    pool = sim.pools()["alloc"]["properties"]
    assert pool["provisioningState"] == "Failed" and pool["status"]["provisioningError"]["code"] == "AllocationFailed"


def test_clusters_keep_their_pools_apart(monkeypatch):
    with AksSimulator(Scenario(**FAST), clusters=("kaito-cluster", "research")) as sim:
        client = sdk(sim, monkeypatch)
        client.agent_pools.begin_create_or_update(sim.resource_group, "research", "gpu", GPU_POOL).result()
        assert [p.name for p in client.agent_pools.list(sim.resource_group, "research")] == ["gpu"]
        assert list(client.agent_pools.list(sim.resource_group, "kaito-cluster")) == []
        missing = arm_error(lambda: client.managed_clusters.get(sim.resource_group, "elsewhere"))
        assert missing.status_code == 404 and missing.error.code == "ResourceNotFound"


def test_second_operation_on_a_busy_pool_conflicts(simulator, monkeypatch):
    sim = simulator(nodes=False, create_delay_s=5)
    client = sdk(sim, monkeypatch)
    create(client, sim, "busy")
    busy = arm_error(lambda: client.agent_pools.begin_delete(sim.resource_group, sim.cluster_name, "busy"))
    assert busy.status_code == 409 and busy.error.code == "OperationNotAllowed"


@pytest.mark.parametrize(("power", "provisioning"), [("Stopped", "Succeeded"), ("Starting", "Starting")])
def test_stopped_or_starting_cluster_refuses_pool_writes(simulator, monkeypatch, power, provisioning):
    sim = simulator(nodes=False, cluster_power=power)
    client = sdk(sim, monkeypatch)
    cluster = client.managed_clusters.get(sim.resource_group, sim.cluster_name)
    assert cluster.provisioning_state == provisioning
    assert cluster.power_state.code == ("Stopped" if power == "Stopped" else "Running")
    refused = arm_error(lambda: create(client, sim, "pool"))
    assert refused.status_code == 409 and f"{power} state" in refused.error.message
    sim.set_cluster_power(sim.cluster_name, "Running")
    create(client, sim, "pool").result()


def test_throttling_sends_retry_after_and_the_sdk_recovers(simulator, monkeypatch):
    sim = simulator(nodes=False, throttle_rate=0.5, retry_after_s=1, seed=7)
    client = sdk(sim, monkeypatch)
    for _ in range(3):
        list(client.agent_pools.list(sim.resource_group, sim.cluster_name))
    throttled = [r for r in sim.requests if r.status == 429]
    assert throttled, "the scenario should have throttled at least once"
    assert sim.count_requests("agentpools.list", 200) == 3


def test_server_errors_and_dropped_connections_are_retried_by_the_sdk(simulator, monkeypatch):
    sim = simulator(nodes=False, server_error_rate=0.3, drop_rate=0.2, seed=3)
    client = sdk(sim, monkeypatch)
    for _ in range(4):
        client.managed_clusters.get(sim.resource_group, sim.cluster_name)
    statuses = {r.status for r in sim.requests if r.operation == "managedclusters.get"}
    assert {0, 503} <= statuses and sim.count_requests("managedclusters.get", 200) == 4


def test_an_action_the_identity_lacks_gets_403_authorization_failed(simulator, monkeypatch):
    write = "Microsoft.ContainerService/managedClusters/agentPools/write"
    sim = simulator(nodes=False, denied_actions=[write])
    client = sdk(sim, monkeypatch)
    assert list(client.agent_pools.list(sim.resource_group, sim.cluster_name)) == []  # reading is allowed
    denied = arm_error(lambda: create(client, sim, "pool"))
    assert denied.status_code == 403 and denied.error.code == "AuthorizationFailed"
    assert write in denied.error.message and sim.pools() == {}


def test_requests_without_a_token_are_refused(simulator):
    sim = simulator(nodes=False)
    context = ssl.create_default_context(cafile=str(sim.ca_bundle))
    url = (f"{sim.endpoint}/subscriptions/{sim.subscription_id}/resourceGroups/{sim.resource_group}/providers/"
           f"Microsoft.ContainerService/managedClusters/{sim.cluster_name}/agentPools?api-version=2026-08-01")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, context=context, timeout=5)
    assert refused.value.code == 401
    assert json.loads(refused.value.read())["error"]["code"] == "AuthenticationFailed"
    with pytest.raises(urllib.error.URLError):  # and its certificate is not trusted by default
        urllib.request.urlopen(url, timeout=5)


@pytest.mark.parametrize(("flag", "expect_ready", "expect_gpu"), [("node_never_ready", False, False),
                                                                  ("no_gpu", True, False)])
def test_nodes_that_never_turn_ready_or_never_show_gpus(
    simulator, monkeypatch, kube_api, unique_name, flag, expect_ready, expect_gpu
):
    sim = simulator(**{flag: True})
    create(sdk(sim, monkeypatch), sim, unique_name).result()
    core = kubernetes.client.CoreV1Api(kube_api)
    node = wait_for("the node", lambda: next(
        (n for n in core.list_node().items if n.metadata.labels.get("agentpool") == unique_name), None))
    time.sleep(1.5)  # well past the ready and GPU delays
    status = core.read_node(node.metadata.name).status
    # The node registered with its status (a never-ready one keeps that first Ready False).
    assert {c.type: c.status for c in status.conditions}["Ready"] == ("True" if expect_ready else "False")
    assert ("nvidia.com/gpu" in (status.allocatable or {})) is expect_gpu


def test_same_seed_same_faults(simulator, monkeypatch):
    runs = []
    for _ in range(2):
        sim = simulator(nodes=False, throttle_rate=0.2, server_error_rate=0.1, retry_after_s=1, seed=42)
        client = sdk(sim, monkeypatch)
        for _ in range(5):
            client.managed_clusters.get(sim.resource_group, sim.cluster_name)
        runs.append([r.status for r in sim.requests if r.operation == "managedclusters.get"])
    assert runs[0] == runs[1] and set(runs[0]) != {200}


def test_simulate_aks_command_serves_until_interrupted(tmp_path, monkeypatch, control_plane, kube_api, unique_name):
    env_file = tmp_path / "aks.env"
    process = subprocess.Popen(
        [sys.executable, "-m", "gpu_provisioner", "simulate-aks", "--scenario", "default", "--env-file", str(env_file),
         "--kubeconfig", str(control_plane.kubeconfig)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for("the env file", env_file.exists, timeout_s=30)
        environment = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        client = ContainerServiceClient(DefaultAzureCredential(disable_instance_discovery=True),
                                        environment["ARM_SUBSCRIPTION_ID"], base_url=environment["ARM_ENDPOINT"])
        cluster = client.managed_clusters.get(environment["ARM_RESOURCE_GROUP"], environment["AZURE_CLUSTER_NAME"])
        client.agent_pools.begin_create_or_update(environment["ARM_RESOURCE_GROUP"], environment["AZURE_CLUSTER_NAME"],
                                                  unique_name, GPU_POOL).result()
        core = kubernetes.client.CoreV1Api(kube_api)
        node = wait_for("the pool's Node in the cluster given by --kubeconfig", lambda: next(
            (n for n in core.list_node().items if n.metadata.labels.get("agentpool") == unique_name), None))
    finally:
        output = interrupt(process, timeout_s=30)
    core.delete_node(node.metadata.name)
    assert cluster.provisioning_state == "Succeeded"
    assert process.returncode == 0, output
    assert environment["ARM_ENDPOINT"] in output
    assert not os.path.exists(environment["REQUESTS_CA_BUNDLE"])  # its files are gone


def test_creations_count_the_pools_puts_made_whether_answered_or_not(simulator, monkeypatch):
    sim = simulator(nodes=False, lost_create_answers=1)
    client = sdk(sim, monkeypatch)
    # The SDK sends the PUT again after the dropped connection: it meets the pool the first one is creating.
    assert arm_error(lambda: create(client, sim, "lost")).status_code == 409
    assert [r.status for r in sim.requests if r.method == "PUT"] == [0, 409]
    create(client, sim, "kept").result()
    client.agent_pools.begin_delete(sim.resource_group, sim.cluster_name, "kept").result()
    create(client, sim, "kept").result()
    assert sim.creations() == {"lost": 1, "kept": 2}


def test_the_simulator_records_each_steps_due_and_actual_time(simulator, monkeypatch, kube_api, unique_name):
    sim = simulator()
    client = sdk(sim, monkeypatch)
    names = [f"{unique_name[:10]}{n}" for n in range(4)]
    for poller in [create(client, sim, name) for name in names]:
        poller.result()
    wait_for("every node GPU-ready", lambda: all(timeline.GPUS_PUBLISHED in sim.timeline()[n] for n in names))
    core = kubernetes.client.CoreV1Api(kube_api)
    for name in names:
        steps = sim.timeline()[name]
        # Due times follow the scenario's delays: the node's from when the pool's operation ended.
        assert steps[timeline.PUT].lag_s == 0
        assert steps[timeline.CREATED].due - steps[timeline.PUT].at == pytest.approx(FAST["create_delay_s"], abs=0.01)
        node_due = steps[timeline.CREATED].at
        for step, delay in [(timeline.NODE_JOINED, "node_join_delay_s"), (timeline.NODE_READY, "node_ready_delay_s"),
                            (timeline.GPUS_PUBLISHED, "gpu_publish_delay_s")]:
            node_due += FAST[delay]
            assert steps[step].due == pytest.approx(node_due, abs=0.05)
        # Carried out on time (a loaded machine may lag, but not by seconds) and never early.
        assert all(0 <= step.lag_s < 1.5 for step in steps.values()), steps
        # The simulator's own part of it is never more than all of it (the rest is its writes' answers).
        assert all(0 <= step.own_lag_s <= step.lag_s + 1e-6 for step in steps.values()), steps
        node = next(n for n in core.list_node(label_selector=f"agentpool={name}").items)
        assert node.status.allocatable["nvidia.com/gpu"] == "1"
    for name in names:
        client.agent_pools.begin_delete(sim.resource_group, sim.cluster_name, name).result()
    wait_for("every node gone", lambda: all(timeline.NODE_DELETED in sim.timeline()[n] for n in names))
    for name in names:
        steps = sim.timeline()[name]
        delete_delay = steps[timeline.DELETED].due - steps[timeline.DELETE].at
        assert delete_delay == pytest.approx(FAST["delete_delay_s"], abs=0.01)
        assert steps[timeline.NODE_DELETED].at >= steps[timeline.DELETED].at
        assert not core.list_node(label_selector=f"agentpool={name}").items
