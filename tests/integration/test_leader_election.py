"""Two replicas: only the Lease holder reconciles; when it dies, the standby takes over in time, measured
on its own clock (a holder whose clock is behind keeps its Lease as long as it renews it)."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

import kubernetes

from gpu_provisioner.api.claims import NODECLAIM, READY
from gpu_provisioner.devenv.controlplane import free_port
from gpu_provisioner.runtime.leader import LEASE_NAME
from tests.integration.harness import http_get, kaito_claim, lease_holder, metric_samples, wait_for

LEASE_S = 3


def test_standby_takes_over_when_the_leader_is_killed(claims, kube_api, start_sim, controller_process, tmp_path,
                                                      unique_name):
    sim = start_sim()
    namespace = "default"
    coordination = kubernetes.client.CoordinationV1Api(kube_api)
    env = {"LEADER_ELECT": "true", "LEASE_DURATION_SECONDS": str(LEASE_S), "POD_NAMESPACE": namespace}
    metrics_ports = {name: free_port() for name in ("replica-a", "replica-b")}
    replicas = {name: controller_process(sim, POD_NAME=name, METRICS_PORT=str(port), **env)
                for name, port in metrics_ports.items()}

    def leader_gauge(name: str) -> float | None:
        values = metric_samples(http_get(f"http://127.0.0.1:{metrics_ports[name]}/metrics")[1])
        return values.get(("gpu_provisioner_leader", ()))

    leader = wait_for("a leader", lambda: lease_holder(kube_api, namespace), timeout_s=30)
    standby = next(name for name in replicas if name != leader)
    wait_for("the leader's gauge", lambda: leader_gauge(leader) == 1)
    # The standby may still be starting its metrics server (None), but it must never report 1.
    wait_for("the standby's gauge", lambda: leader_gauge(standby) is not None)
    assert leader_gauge(standby) == 0
    first = f"{unique_name[:9]}a"
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, first))
    claims.wait_condition(NODECLAIM, first, READY, "True")

    replicas[leader].send_signal(signal.SIGKILL)
    replicas[leader].wait()
    killed_at = time.monotonic()
    assert wait_for("the standby to hold the lease", lambda: lease_holder(kube_api, namespace) == standby,
                    timeout_s=LEASE_S * 4)
    second = f"{unique_name[:9]}b"
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, second))
    claims.wait_condition(NODECLAIM, second, READY, "True", timeout_s=60)
    took_over_s = time.monotonic() - killed_at
    assert took_over_s < 60
    assert sim.count_requests("agentpools.create") == 2  # one pool each, nobody raced
    coordination.delete_namespaced_lease(LEASE_NAME, namespace)


def test_standby_leaves_a_skewed_holder_alone_while_it_renews(claims, kube_api, start_sim, controller_process,
                                                             unique_name):
    sim = start_sim()
    namespace = f"gp-{unique_name}"  # its own Lease, whatever other tests left in theirs
    kubernetes.client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": namespace}})
    coordination = kubernetes.client.CoordinationV1Api(kube_api)

    def skewed_spec() -> dict[str, object]:
        # A holder whose clock is 20 s behind: every renewTime it writes looks expired to a naive reader.
        behind = (datetime.now(UTC) - timedelta(seconds=20)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"holderIdentity": "skewed-holder", "leaseDurationSeconds": LEASE_S, "acquireTime": behind,
                "renewTime": behind, "leaseTransitions": 0}

    coordination.create_namespaced_lease(namespace, {"metadata": {"name": LEASE_NAME}, "spec": skewed_spec()})
    metrics_port = free_port()
    controller_process(sim, POD_NAME="standby", METRICS_PORT=str(metrics_port), LEADER_ELECT="true",
                       LEASE_DURATION_SECONDS=str(LEASE_S), POD_NAMESPACE=namespace)

    def leader_gauge() -> float | None:
        values = metric_samples(http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1])
        return values.get(("gpu_provisioner_leader", ()))

    wait_for("the standby's metrics", lambda: leader_gauge() is not None)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    renew_until = time.monotonic() + LEASE_S * 4
    while time.monotonic() < renew_until:
        lease = coordination.read_namespaced_lease(LEASE_NAME, namespace)
        assert lease.spec.holder_identity == "skewed-holder"
        coordination.replace_namespaced_lease(LEASE_NAME, namespace, {
            "metadata": {"name": LEASE_NAME, "resourceVersion": lease.metadata.resource_version},
            "spec": skewed_spec()})
        time.sleep(0.5)
    assert leader_gauge() == 0
    assert sim.count_requests("agentpools.create") == 0  # the standby did not reconcile

    stopped_at = time.monotonic()  # the holder stops renewing
    wait_for("the standby to hold the lease", lambda: coordination.read_namespaced_lease(
        LEASE_NAME, namespace).spec.holder_identity == "standby", timeout_s=LEASE_S * 4)
    assert time.monotonic() - stopped_at >= LEASE_S - 0.5  # a full lease duration on the standby's clock
    claims.wait_condition(NODECLAIM, unique_name, READY, "True", timeout_s=60)
    assert sim.count_requests("agentpools.create") == 1


def test_a_replica_takes_over_at_once_when_the_go_gpu_provisioner_lets_go_of_its_lease(
    claims, kube_api, start_sim, controller_process, unique_name
):
    # Replacing the Go gpu-provisioner by this chart: its leader (controller-runtime's elector) holds the Lease its
    # chart names until its pod stops, and then releases it as client-go does.
    go_lease = "gpu-provisioner-leader-election"
    sim = start_sim()
    namespace = f"gp-{unique_name}"
    kubernetes.client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": namespace}})
    coordination = kubernetes.client.CoordinationV1Api(kube_api)
    go_lease_s = 15
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    coordination.create_namespaced_lease(namespace, {"metadata": {"name": go_lease}, "spec": {
        "holderIdentity": "gpu-provisioner-6f7d8c9b5d-k2x7q_0b6c1c8e-5b1e-4d1a-9f0e-2f4b7c3d9e11",
        "leaseDurationSeconds": go_lease_s, "acquireTime": now, "renewTime": now, "leaseTransitions": 3}})
    controller_process(sim, POD_NAME="replacement", LEADER_ELECT="true", LEASE_DURATION_SECONDS=str(LEASE_S),
                       POD_NAMESPACE=namespace)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    time.sleep(LEASE_S)  # longer than its own lease duration: the holder's, written in the Lease, counts
    assert sim.count_requests("agentpools.create") == 0

    lease = coordination.read_namespaced_lease(go_lease, namespace)
    released = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    coordination.replace_namespaced_lease(go_lease, namespace, {
        "metadata": {"name": go_lease, "resourceVersion": lease.metadata.resource_version},
        "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": released, "renewTime": released,
                 "leaseTransitions": 3}})
    released_at = time.monotonic()
    wait_for("the replacement to hold the Lease", lambda: coordination.read_namespaced_lease(
        go_lease, namespace).spec.holder_identity == "replacement", timeout_s=go_lease_s)
    assert time.monotonic() - released_at < go_lease_s / 2  # not the old holder's lease duration waited out
    claims.wait_condition(NODECLAIM, unique_name, READY, "True", timeout_s=60)
    assert sim.count_requests("agentpools.create") == 1
