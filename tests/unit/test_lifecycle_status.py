"""A phase that fails must not lose what the phases before it achieved."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpu_provisioner.api.claims import MACHINE, NODECLAIM, TERMINATION_FINALIZER, Claim
from gpu_provisioner.lifecycle.base import DONE, WAITING, utc_now
from gpu_provisioner.lifecycle.controller import ClaimLifecycle


class RecordingKube:
    def __init__(self) -> None:
        self.statuses: list[dict] = []

    def patch_claim_status(self, api, name, status):
        self.statuses.append(status)


def test_status_from_earlier_phases_is_written_when_a_later_phase_raises():
    kube = RecordingKube()
    deps = SimpleNamespace(
        kube=kube, settings=SimpleNamespace(launch_timeout_s=300, registration_timeout_s=900), clock=utc_now,
        claims_waiting=lambda key: False,
        inventory=SimpleNamespace(synced=True, get=lambda name: object()),
    )
    lifecycle = ClaimLifecycle(deps)

    def launched(r):
        r.status.set("Launched", "True", "Launched")
        return DONE

    def registration_fails(r):
        raise RuntimeError("node patch conflicted")

    lifecycle.phases = (SimpleNamespace(reconcile=launched), SimpleNamespace(reconcile=registration_fails))
    claim = Claim(NODECLAIM, {"metadata": {"name": "ws1", "uid": "u", "resourceVersion": "1",
                                           "finalizers": [TERMINATION_FINALIZER]}})
    with pytest.raises(RuntimeError):
        lifecycle.reconcile(claim)
    assert len(kube.statuses) == 1
    launched_condition = next(c for c in kube.statuses[0]["conditions"] if c["type"] == "Launched")
    assert launched_condition["status"] == "True"


def _pending_launch(r):
    r.status.wait(r.claim.api.launched, "Launching", "creating agent pool ws1 (Standard_NC6s_v3)")
    return WAITING


def _lifecycle_with(launch) -> tuple[ClaimLifecycle, RecordingKube]:
    kube = RecordingKube()
    deps = SimpleNamespace(
        kube=kube, settings=SimpleNamespace(launch_timeout_s=300, registration_timeout_s=900), clock=utc_now,
        claims_waiting=lambda key: False,
        inventory=SimpleNamespace(synced=True, get=lambda name: None),
    )
    lifecycle = ClaimLifecycle(deps)
    lifecycle.phases = (SimpleNamespace(reconcile=launch), *lifecycle.phases[1:])
    lifecycle.liveness = SimpleNamespace(reconcile=lambda r: DONE)
    return lifecycle, kube


def _claim(api, status=None) -> Claim:
    return Claim(api, {"metadata": {"name": "ws1", "uid": "u", "resourceVersion": "1",
                                    "finalizers": [TERMINATION_FINALIZER]}, "status": status or {}})


def test_a_pending_machine_says_false_as_karpenter_core_v0_29_does_never_unknown():
    lifecycle, kube = _lifecycle_with(_pending_launch)
    lifecycle.reconcile(_claim(MACHINE))
    conditions = {c["type"]: c for c in kube.statuses[-1]["conditions"]}
    assert {t: c["status"] for t, c in conditions.items()} == {
        "MachineLaunched": "False", "MachineRegistered": "False", "MachineInitialized": "False", "Ready": "False"}
    later = (conditions["MachineRegistered"], conditions["MachineInitialized"])
    assert {(c["reason"], c["message"]) for c in later} == {("MachineNotLaunched", "Machine is not launched")}
    assert conditions["Ready"]["reason"] == "Launching"


def test_a_machine_left_unknown_by_an_older_version_is_brought_to_false():
    lifecycle, kube = _lifecycle_with(_pending_launch)
    unknown = [{"type": t, "status": "Unknown", "reason": "AwaitingReconciliation", "message": ""}
               for t in (*MACHINE.phases, "Ready")]
    lifecycle.reconcile(_claim(MACHINE, {"conditions": unknown}))
    assert {c["status"] for c in kube.statuses[-1]["conditions"]} == {"False"}


def test_a_pending_nodeclaim_keeps_karpenter_v1_unknown():
    lifecycle, kube = _lifecycle_with(_pending_launch)
    lifecycle.reconcile(_claim(NODECLAIM))
    conditions = {c["type"]: c for c in kube.statuses[-1]["conditions"]}
    assert {c["status"] for c in conditions.values()} == {"Unknown"}
    assert conditions["Registered"]["reason"] == "AwaitingReconciliation"
