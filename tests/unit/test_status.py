"""StatusWriter: condition shapes per API, transition times, derived Ready; the claim fields read as durations; what the
sandbox says a claim waits for."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpu_provisioner.api.claims import MACHINE, NODECLAIM, READY, Claim, StatusWriter, parse_duration
from gpu_provisioner.sandbox import ClaimProgress

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def bare(api, status=None) -> Claim:
    return Claim(api, {"metadata": {"name": "ws1", "uid": "u", "generation": 3}, "status": status or {}})


def test_nodeclaim_ready_lists_the_phases_not_true_latest_first_as_karpenter_v1_does():
    writer = StatusWriter(bare(NODECLAIM), NOW)
    writer.set("Launched", "True", "Launched")
    writer.set("Registered", "Unknown", "NodeNotFound", "waiting for the node")
    writer.set("Initialized", "Unknown", "AwaitingReconciliation", "object is awaiting reconciliation")
    writer.get("Initialized")["lastTransitionTime"] = "2026-11-26T11:00:00Z"  # set before Registered's
    conditions = {c["type"]: c for c in writer.render()["conditions"]}
    assert (conditions[READY]["status"], conditions[READY]["reason"]) == ("Unknown", "ReconcilingDependents")
    assert conditions[READY]["message"] == "Registered=Unknown, Initialized=Unknown"
    assert conditions["Launched"]["observedGeneration"] == 3
    writer.set("Registered", "False", "MultipleNodesFound", "two nodes")
    conditions = {c["type"]: c for c in writer.render()["conditions"]}
    assert (conditions[READY]["status"], conditions[READY]["reason"]) == ("False", "UnhealthyDependents")


def test_machine_ready_repeats_the_first_phase_not_true():
    writer = StatusWriter(bare(MACHINE), NOW)
    writer.set("MachineLaunched", "True", "MachineLaunched")
    writer.set("MachineRegistered", "False", "NodeNotFound", "waiting for the node")
    conditions = {c["type"]: c for c in writer.render()["conditions"]}
    assert conditions[READY]["status"] == "False"
    assert (conditions[READY]["reason"], conditions[READY]["message"]) == ("NodeNotFound", "waiting for the node")
    assert conditions["MachineInitialized"]["status"] == "False"


def test_machine_conditions_have_no_observed_generation_and_ready_when_all_true():
    writer = StatusWriter(bare(MACHINE), NOW)
    for phase in MACHINE.phases:
        writer.set(phase, "True", phase)
    rendered = writer.render()["conditions"]
    assert [c["type"] for c in rendered] == [*MACHINE.phases, READY]
    assert all("observedGeneration" not in c for c in rendered)
    assert rendered[-1]["status"] == "True"


def test_unchanged_status_is_not_rewritten_and_keeps_transition_time():
    first = StatusWriter(bare(NODECLAIM), NOW)
    first.set("Launched", "Unknown", "Launching", "creating")
    status = first.render()
    for condition in status["conditions"]:  # written long ago
        condition["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    again = StatusWriter(bare(NODECLAIM, status), NOW)
    again.set("Launched", "Unknown", "Launching", "creating")
    assert not again.changed()
    again.set("Launched", "True", "Launched")
    assert again.changed()
    assert again.get("Launched")["lastTransitionTime"] != "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("1h30m", 5400), ("2m5s", 125), ("", None),
                                               (None, None), ("1.5h", None), ("Never", None)])
def test_karpenter_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_the_sandbox_says_what_a_nodeclaim_waits_for_from_its_phases_not_its_ready():
    writer = StatusWriter(bare(NODECLAIM), NOW)
    writer.set("Launched", "True", "Launched")
    writer.wait("Registered", "NodeNotFound", "waiting for the node")
    progress = ClaimProgress("ws1", 0.0, conditions={c["type"]: c for c in writer.render()["conditions"]})
    assert progress.waiting_for(NODECLAIM) == "NodeNotFound: waiting for the node"
    assert ClaimProgress("ws2", 0.0).waiting_for(NODECLAIM) == "no status yet"
