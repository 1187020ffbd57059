"""Kaito's own workspace controller (v0.3.1 on Machines, v0.12.0 on NodeClaims) against `gpu-provisioner run`
and the AKS simulator. No kubelet runs, so inference pods never start: the Workspace's ResourceReady
condition is what Kaito says about the nodes it asked for."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.integration.harness import wait_for
from tests.interop.conftest import Stack
from tests.interop.kaito import KaitoRelease, shows_capacity_failure

pytestmark = [pytest.mark.integration, pytest.mark.interop]

# How long the claims are counted when nothing is expected to change (scenario quota-exhausted).
CENSUS_WINDOW_S = 60.0


def _report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n  {line}")


def test_phi3_workspace_reaches_resource_ready(
    era: KaitoRelease, stack: Callable[..., Stack], capsys: pytest.CaptureFixture[str]
) -> None:
    s = stack()
    started = time.monotonic()
    s.apply_workspace()
    s.wait_resource_ready()
    elapsed = time.monotonic() - started
    _report(capsys, f"Kaito {era.version}: Workspace applied -> ResourceReady=True in {elapsed:.1f}s")

    claim = s.only_claim()
    name = claim["metadata"]["name"]
    ready = next(c for c in claim["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert set(s.sim.pools()) == {name}
    node = s.node(claim["status"]["nodeName"])
    assert node is not None and node.metadata.labels["apps"] == s.workspace


def test_deleting_the_workspace_removes_claim_node_and_pool(stack: Callable[..., Stack]) -> None:
    s = stack()
    claim = s.serving()
    node_name = claim["status"]["nodeName"]

    s.workspaces.delete(s.workspace)
    wait_for("the Workspace to be gone", lambda: s.workspaces.get(s.workspace) is None)
    wait_for("the claim to be gone", lambda: not s.claims())
    wait_for(f"Node {node_name} to be gone", lambda: s.node(node_name) is None)
    wait_for("the agent pool to be gone", lambda: not s.sim.pools())


def test_quota_exhausted_shows_the_reason_with_one_claim(
    era: KaitoRelease, stack: Callable[..., Stack]
) -> None:
    s = stack("quota-exhausted")
    shown: dict[str, object] | None = None
    with s.census().running() as census:
        started = time.monotonic()
        s.apply_workspace()
        # Count for the whole window even once the reason shows: a duplicate may come later.
        while time.monotonic() - started < CENSUS_WINDOW_S:
            shown = shown or shows_capacity_failure(s.workspaces.conditions(s.workspace))
            time.sleep(0.5)
    failures = []
    if census.max_count != 1 or len(census.names) != 1:
        failures.append(f"not exactly one claim: {census.summary()}")
    if shown is None:
        failures.append(f"the Workspace never showed the quota failure in {CENSUS_WINDOW_S:.0f}s; its conditions: "
                        f"{s.workspaces.conditions(s.workspace)}; the claims: {[c.get('status') for c in s.claims()]}")
    assert not failures, f"Kaito {era.version}: " + "\n".join(failures) + f"\nKaito log: {s.kaito.log}"


def test_kaito_restarted_while_provisioning_makes_no_second_claim(
    era: KaitoRelease, stack: Callable[..., Stack]
) -> None:
    # A pool that takes 20 s to create: Kaito restarts while it is in flight.
    s = stack(create_delay_s=20.0)
    with s.census().running() as census:
        s.apply_workspace()
        wait_for("the agent pool to be in creation", lambda: s.sim.pools())
        s.kaito.restart()
        s.wait_resource_ready()
        # A restarted Kaito that missed the claim makes its second one at once; give it a few seconds more.
        time.sleep(5)
    assert census.max_count == 1 and len(census.names) == 1, f"Kaito {era.version}: {census.summary()}"
    assert len(s.sim.pools()) == 1, f"pools: {sorted(s.sim.pools())}"


def test_deleted_node_is_healed(stack: Callable[..., Stack]) -> None:
    s = stack()
    old = s.serving()
    old_name, old_node = old["metadata"]["name"], old["status"]["nodeName"]

    s.core.delete_node(old_node)

    def healed() -> str | None:
        claims = s.claims()
        if len(claims) != 1 or claims[0]["metadata"]["name"] == old_name:
            return None
        conditions = (claims[0].get("status") or {}).get("conditions") or []
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return None
        return claims[0]["metadata"]["name"]

    new_name = wait_for(f"a new claim replacing {old_name} to be Ready", healed, timeout_s=120)
    s.wait_resource_ready()
    new_node = s.only_claim()["status"]["nodeName"]
    assert new_node != old_node and s.node(new_node) is not None
    wait_for(f"Node {old_node} to be gone", lambda: s.node(old_node) is None)
    wait_for("only the new pool to remain", lambda: set(s.sim.pools()) == {new_name})
