"""A controller killed in the middle of a create or a delete: the next one finishes the job, with no
second pool and nothing left behind; a restarted one changes nothing about claims that are fine."""

from __future__ import annotations

import signal
import time

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
