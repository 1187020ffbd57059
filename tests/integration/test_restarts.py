"""A controller killed in the middle of a create or a delete: the next one finishes the job, with no
second pool and nothing left behind."""

from __future__ import annotations

import signal

from gpu_provisioner.api.claims import MACHINE, NODECLAIM, READY
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
