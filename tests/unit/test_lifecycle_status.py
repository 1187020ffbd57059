"""A phase that fails must not lose what the phases before it achieved."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpu_provisioner.api.claims import NODECLAIM, TERMINATION_FINALIZER, Claim
from gpu_provisioner.lifecycle.base import DONE
from gpu_provisioner.lifecycle.controller import ClaimLifecycle


class RecordingKube:
    def __init__(self) -> None:
        self.statuses: list[dict] = []

    def patch_claim_status(self, api, name, status):
        self.statuses.append(status)


def test_status_from_earlier_phases_is_written_when_a_later_phase_raises():
    kube = RecordingKube()
    deps = SimpleNamespace(
        kube=kube, settings=SimpleNamespace(launch_timeout_s=300, registration_timeout_s=900),
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
