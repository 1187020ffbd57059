"""What an operator sees with kubectl: the claim's printer columns filled as Karpenter fills them, and one
Warning Event a failure."""

from __future__ import annotations

import subprocess

import pytest

from gpu_provisioner.api.claims import MACHINE, NODECLAIM
from gpu_provisioner.lifecycle import launch
from gpu_provisioner.sim.aks import NODE_IMAGE_VERSION
from tests.integration.harness import kaito_claim, wait_for

APIS = [MACHINE, NODECLAIM]


def kubectl(control_plane, *args: str) -> str:
    result = subprocess.run([str(control_plane.tools.kubectl), "--kubeconfig", str(control_plane.kubeconfig), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def printed_columns(table: str) -> dict[str, str]:
    """`kubectl get` of one object as {column: value}; columns are cut where their headers start (a value may be
    empty)."""
    header, row = table.splitlines()
    starts = [index for index, char in enumerate(header) if char != " " and (index == 0 or header[index - 1] == " ")]
    ends = [*starts[1:], None]
    return {header[start:end].strip(): row[start:end].strip() for start, end in zip(starts, ends, strict=True)}


def test_kubectl_get_shows_capacity_type_zone_and_image(
    control_plane, claims, start_sim, start_controller, unique_name
):
    sim = start_sim()
    start_controller(sim)
    machine, nodeclaim = unique_name, unique_name[:-1] + "n"
    claims.create_ready(MACHINE, kaito_claim(MACHINE, machine))
    claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, nodeclaim))

    def zone_filled(kind: str, name: str) -> dict[str, str] | None:
        # The zone label waits for the controller's queue to be quiet (nothing waits for it): moments after Ready.
        columns = printed_columns(kubectl(control_plane, "get", kind, name, "-o", "wide"))
        return columns if columns["ZONE"] else None

    columns = wait_for("the nodeclaim's ZONE column", lambda: zone_filled("nodeclaims", nodeclaim), timeout_s=30)
    assert columns["CAPACITY"] == "on-demand" and columns["ZONE"] == "0", columns
    assert columns["IMAGEID"] == NODE_IMAGE_VERSION and columns["TYPE"] == "Standard_NC24ads_A100_v4", columns
    columns = wait_for("the machine's ZONE column", lambda: zone_filled("machines", machine), timeout_s=30)
    assert columns["CAPACITY"] == "on-demand" and columns["ZONE"] == "0", columns
    # The node's zone is the claim's (Karpenter: the claim's labels are the node's).
    node = claims.node(claims.get(MACHINE, machine)["status"]["nodeName"])
    assert node.metadata.labels["karpenter.sh/capacity-type"] == "on-demand"


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.kind)
def test_a_capacity_failure_is_one_warning_event(api, claims, start_sim, start_controller, unique_name,
                                                monkeypatch):
    monkeypatch.setattr(launch, "CAPACITY_RETRY_S", 0.5)
    sim = start_sim("quota-exhausted")
    start_controller(sim)
    # Two sizes, both out of quota: each is tried, and the failure is told once, with both causes.
    claims.create(api, kaito_claim(api, unique_name, ["Standard_NC6s_v3", "Standard_NC12s_v3"]))
    claims.wait_condition(api, unique_name, api.launched, "False", reason="QuotaExceeded")
    # Tried again (after 0.5 s, then 1 s), refused the same way each time (by the quota pre-flight: no PUT).
    wait_for("three quota reads", lambda: sim.count_requests("usages.list") >= 3, timeout_s=30)
    warnings = [(e.reason, e.message, e.count) for e in claims.events(unique_name) if e.type == "Warning"]
    assert len(warnings) == 1 and warnings[0][2] == 1, warnings
    assert "Standard_NC6s_v3" in warnings[0][1] and "Standard_NC12s_v3" in warnings[0][1]
