"""No pool outlives its claim, and no claim takes what is not its own: claims created and deleted at once
under CPU load, two claims of one name, and Karpenter's claims in the same cluster."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import REGISTRY

from gpu_provisioner.api.claims import MACHINE, NODECLAIM, READY
from tests.integration.harness import (
    cpu_load,
    create_and_delete,
    kaito_claim,
    karpenter_machine,
    karpenter_nodeclaim,
    wait_for,
)


def test_claims_created_and_deleted_at_once_under_cpu_load_leave_no_pool(
    claims, start_sim, controller_process, unique_name
):
    sim = start_sim(create_delay_s=0.5, delete_delay_s=0.2)
    controller_process(sim, WORKERS="8")
    names = [f"{unique_name[:9]}{i:03d}" for i in range(5 * 40)]
    with cpu_load(processes=4, seconds=90), ThreadPoolExecutor(8) as pool:
        for start in range(0, len(names), 40):
            # Waves: each starts while the controller is still busy with the last one.
            batch = names[start:start + 40]
            list(pool.map(lambda n: create_and_delete(
                claims, NODECLAIM if int(n[-1]) % 2 else MACHINE, n, delay_s=int(n[-2:]) % 10 * 0.005), batch))
            time.sleep(1)
        for name in names:
            for api in (MACHINE, NODECLAIM):
                claims.wait_gone(api, name, timeout_s=120)

    # The orphan sweep is off in these tests (hourly): whatever PUT went out is deleted by the lifecycle.
    wait_for("no agent pool left", lambda: not sim.pools() or None, timeout_s=60)
    assert sim.count_requests("agentpools.create", 201) == sim.count_requests("agentpools.delete", 202)


def test_a_machine_and_a_nodeclaim_of_one_name_never_share_a_pool(claims, start_sim, start_controller, unique_name):
    sim = start_sim(create_delay_s=1.0)
    start_controller(sim)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda api: claims.create(api, kaito_claim(api, unique_name)), (MACHINE, NODECLAIM)))

    def one_ready_and_one_refused() -> tuple[str, str] | None:
        ready = [a for a in (MACHINE, NODECLAIM) if claims.condition(a, unique_name, READY).get("status") == "True"]
        taken = [a for a in (MACHINE, NODECLAIM)
                 if claims.condition(a, unique_name, a.launched).get("reason") == "AgentPoolNameTaken"]
        return (ready[0], taken[0]) if len(ready) == 1 and len(taken) == 1 else None

    owner, other = wait_for("one claim Ready and the other refused", one_ready_and_one_refused, timeout_s=60)
    # One PUT only: a second one would have been an update of the first claim's pool.
    assert sim.count_requests("agentpools.create") == 1
    assert sim.pools()[unique_name]["properties"]["tags"]["kaito-claim"] == f"{owner.plural}/{unique_name}"
    for _ in range(10):  # through several reconciles and LISTs the owner stays Ready
        assert claims.condition(owner, unique_name, READY)["status"] == "True"
        time.sleep(0.2)

    claims.delete(owner, unique_name)
    claims.wait_gone(owner, unique_name, timeout_s=60)
    # The name is free: the other claim goes ahead at once (woken by the LIST, not by a retry minutes later).
    claims.wait_condition(other, unique_name, READY, "True", timeout_s=30)
    assert sim.pools()[unique_name]["properties"]["tags"]["kaito-claim"] == f"{other.plural}/{unique_name}"


def test_claims_kaito_did_not_make_are_never_touched(claims, start_sim, start_controller, unique_name):
    sim = start_sim()
    names = {what: f"{unique_name}{what}" for what in ("k", "m", "o", "l")}
    # Kaito v0.4.2-v0.6 wrote an empty nodeClassRef group (with AKSNodeClass): those are Kaito's.
    legacy = kaito_claim(NODECLAIM, names["l"])
    legacy["spec"]["nodeClassRef"] = {"group": "", "kind": "AKSNodeClass", "name": "default"}
    claims.create(NODECLAIM, karpenter_nodeclaim(names["k"]))
    claims.create(MACHINE, karpenter_machine(names["m"]))
    start_controller(sim)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, names["o"]))
    claims.create(NODECLAIM, legacy)

    claims.wait_condition(NODECLAIM, names["o"], READY, "True")
    claims.wait_condition(NODECLAIM, names["l"], READY, "True")
    wait_for("the foreign-claims gauge", lambda: all(
        REGISTRY.get_sample_value("gpu_provisioner_foreign_claims", {"kind": kind}) == 1
        for kind in ("NodeClaim", "Machine")), timeout_s=15)
    for api, name in ((NODECLAIM, names["k"]), (MACHINE, names["m"])):
        foreign = claims.get(api, name)
        assert not foreign["metadata"].get("finalizers") and not foreign.get("status")
        assert name not in sim.pools() and not claims.events(name)
    assert sorted(sim.pools()) == sorted([names["o"], names["l"]])
