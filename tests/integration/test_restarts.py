"""A controller killed in the middle of a create or a delete: the next one finishes the job, with no
second pool and nothing left behind; a restarted one changes nothing about claims that are fine."""

from __future__ import annotations

import signal
import time

from prometheus_client import REGISTRY

from gpu_provisioner.api.claims import MACHINE, NODECLAIM, READY
from gpu_provisioner.runtime.informer import NODES, Informer
from tests.integration.harness import kaito_claim, wait_for


def test_killed_mid_create_continues_without_a_second_pool(claims, start_sim, controller_process, unique_name):
    sim = start_sim(create_delay_s=4)
    first = controller_process(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    wait_for("the agent pool PUT", lambda: sim.count_requests("agentpools.create") == 1, timeout_s=30)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert sim.pools()[unique_name]["properties"]["provisioningState"] == "Creating"

    controller_process(sim)
    claims.wait_condition(NODECLAIM, unique_name, READY, "True", timeout_s=60)
    assert sim.count_requests("agentpools.create") == 1
    assert list(sim.pools()) == [unique_name]


def test_killed_mid_delete_finishes_the_delete_and_releases_the_claim(
    claims, start_sim, controller_process, unique_name
):
    sim = start_sim(delete_delay_s=4)
    first = controller_process(sim)
    claims.create(MACHINE, kaito_claim(MACHINE, unique_name))
    claims.wait_condition(MACHINE, unique_name, READY, "True", timeout_s=60)
    claims.delete(MACHINE, unique_name)
    wait_for("the agent pool DELETE", lambda: sim.count_requests("agentpools.delete") == 1, timeout_s=30)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert claims.get(MACHINE, unique_name) is not None  # the finalizer holds it until the pool is gone

    controller_process(sim)
    claims.wait_gone(MACHINE, unique_name, timeout_s=60)
    assert sim.pools() == {}
    assert sim.count_requests("agentpools.delete") == 1


def test_a_restart_with_a_slow_node_list_neither_flips_nor_times_out_ready_claims(
    claims, start_sim, start_controller, unique_name, monkeypatch
):
    sim = start_sim()
    first = start_controller(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    claims.wait_condition(NODECLAIM, unique_name, READY, "True")
    first.stop()

    # A big cluster: listing the Nodes takes longer than listing the claims.
    list_all = Informer._relist

    def slow_node_list(informer):
        if informer.resource is NODES:
            time.sleep(3)
        return list_all(informer)

    monkeypatch.setattr(Informer, "_relist", slow_node_list)
    start_controller(sim, registration_timeout_s=1)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        ready = claims.condition(NODECLAIM, unique_name, READY)
        assert ready.get("status") == "True", ready
        time.sleep(0.2)
    assert "RegistrationTimeout" not in claims.event_reasons(unique_name)


def test_an_api_server_restart_is_one_warning_and_no_crash_and_work_goes_on(
    control_plane, claims, start_sim, controller_process, unique_name, tmp_path
):
    sim = start_sim(create_delay_s=2)
    controller_process(sim, POOL_REFRESH_INTERVAL_SECONDS="0.3")
    names = [f"{unique_name}{index}" for index in range(3)]
    for name in names:
        claims.create(NODECLAIM, kaito_claim(NODECLAIM, name))
    wait_for("the agent pool PUTs", lambda: sim.count_requests("agentpools.create") == 3, timeout_s=30)
    # Down while the pools are created: their claims are reconciled (and fail) meanwhile.
    control_plane.restart_apiserver(down_s=4)

    for name in names:
        claims.wait_condition(NODECLAIM, name, READY, "True", timeout_s=60)
    claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, f"{unique_name}x"))
    log = (tmp_path / "controller-0.log").read_text()
    assert "reconcile crashed" not in log and "Traceback" not in log
    assert log.count("API server unreachable") == 1 and log.count("API server reachable again") == 1
    assert sim.count_requests("agentpools.create") == 4


def test_a_restart_with_ready_claims_writes_nothing(claims, kube_api, start_sim, start_controller, unique_name):
    """Neither ARM nor the API server sees a write from a controller that restarts over Ready claims: no PUT or
    DELETE, no claim, Node or Event changed."""
    sim = start_sim()
    first = start_controller(sim)
    names = {MACHINE: f"{unique_name}m", NODECLAIM: f"{unique_name}n"}
    for api, name in names.items():
        claims.create(api, kaito_claim(api, name))
    for api, name in names.items():
        claims.wait_condition(api, name, READY, "True")
    # Settled: what waits for a quiet queue (the zone label) is written too.
    wait_for("the first controller's queue to settle",
             lambda: (len(first.queue) == 0 and not first.queue.running_s()) or None)
    first.stop()

    def snapshot() -> dict:
        state = {}
        for api, name in names.items():
            claim = claims.get(api, name)
            node = claims.node(claim["status"]["nodeName"])
            state[name] = (claim["metadata"]["resourceVersion"], node.metadata.resource_version,
                           sorted((e.metadata.name, e.count) for e in claims.events(name)))
        return state

    before = snapshot()
    writes = sum(sim.count_requests(op) for op in ("agentpools.create", "agentpools.delete"))

    def reconciles() -> float:
        return sum(REGISTRY.get_sample_value("gpu_provisioner_reconcile_seconds_count", {"kind": api.kind}) or 0
                   for api in names)

    reconciled = reconciles()
    second = start_controller(sim)
    wait_for("the restarted controller to reconcile both claims", lambda: reconciles() >= reconciled + 2 or None)
    wait_for("its queue to settle", lambda: (second.synced() and len(second.queue) == 0) or None)
    time.sleep(1)  # a write, if any, follows its reconcile at once
    assert snapshot() == before
    assert sum(sim.count_requests(op) for op in ("agentpools.create", "agentpools.delete")) == writes
