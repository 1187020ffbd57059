"""Which ARM failures the AKS door retries inline: a PUT is resent only when ARM certainly did not carry it out."""

from __future__ import annotations

from dataclasses import replace

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

from gpu_provisioner.api.claims import MACHINE, NODECLAIM, Claim
from gpu_provisioner.cloud.agentpools import (
    PoolState,
    _short_transient,
    _short_transient_unsent,
    arm_client_options,
    arm_operation,
)
from gpu_provisioner.sandbox import kaito_claim
from gpu_provisioner.settings import Settings
from tests.integration.harness import go_provisioner_node_labels


class _Response:
    def __init__(self, status: int, retry_after: str | None = None) -> None:
        self.status_code = status
        self.headers = {"Retry-After": retry_after} if retry_after else {}
        self.reason = "x"

    def text(self) -> str:
        return ""


def _http(status: int, retry_after: str | None = None) -> HttpResponseError:
    return HttpResponseError(message=f"HTTP {status}", response=_Response(status, retry_after))


def test_a_put_is_resent_only_when_it_never_reached_arm_or_was_throttled():
    assert _short_transient_unsent(ServiceRequestError("connection refused"))
    assert _short_transient_unsent(_http(429, "1"))
    # The answer was lost or ARM failed midway: the pool may exist, so a LIST must tell first.
    assert not _short_transient_unsent(ServiceResponseError("connection reset"))
    assert not _short_transient_unsent(_http(500))
    assert not _short_transient_unsent(_http(429, "30"))  # too long a wait for a worker


def test_reads_and_deletes_are_retried_on_any_short_transient_failure():
    assert _short_transient(ServiceResponseError("connection reset"))
    assert _short_transient(_http(503))
    assert not _short_transient(_http(400))


def test_compute_reads_have_their_own_operation_names():
    base = "https://management.azure.com/subscriptions/s/providers/Microsoft.Compute"
    assert arm_operation("GET", f"{base}/skus?api-version=2021-07-01&$filter=x") == "skus.list"
    assert arm_operation("GET", f"{base}/locations/eastus/usages?api-version=2024-07-01") == "usages.list"
    assert arm_operation("GET", f"{base}/virtualMachines?api-version=1") == "other"


def test_the_arm_client_keeps_a_connection_for_every_request_that_may_run_at_once():
    settings = Settings.model_construct(arm_endpoint="https://management.azure.com", arm_writers=16, workers=8)
    session = arm_client_options(settings)["session"]
    # The ARM writers, the workers, the LIST and the SKU reads: more than the 10 of the SDK's own session.
    assert session.get_adapter("https://management.azure.com")._pool_maxsize == 26


def _launched_by_go(api, name: str = "ws0a1b2c3d", created: str = "2026-05-04T03:02:01Z"):
    """A claim the Go gpu-provisioner launched, and the pool it made for it."""
    manifest = kaito_claim(api, name)
    manifest["metadata"].update(uid="u-1", creationTimestamp=created)
    manifest["status"] = {"providerID": f"azure:///subscriptions/s/resourceGroups/mc_rg/providers/Microsoft.Compute/"
                                        f"virtualMachineScaleSets/aks-{name}-12345678-vmss/virtualMachines/0"}
    pool = PoolState(name, "Succeeded", "Standard_NC6s_v3", node_labels=go_provisioner_node_labels(api, manifest))
    return Claim(api, manifest), pool


def _with_labels(pool: PoolState, changes: dict[str, str | None]) -> PoolState:
    """The pool with these node labels set (None: removed)."""
    labels = {**pool.node_labels, **changes}
    return replace(pool, node_labels={k: v for k, v in labels.items() if v is not None})


@pytest.mark.parametrize("api", [MACHINE, NODECLAIM], ids=["Machine", "NodeClaim"])
def test_a_pool_the_go_provisioner_made_for_the_claim_is_the_claims(api):
    claim, pool = _launched_by_go(api)
    assert pool.made_by_go_provisioner_for(claim)
    # Another workspace's pool, or a pool without the Go gpu-provisioner's machine type: not the claim's.
    assert not _with_labels(pool, {"kaito.sh/workspace": "another"}).made_by_go_provisioner_for(claim)
    assert not _with_labels(pool, {"kaito.sh/machine-type": None}).made_by_go_provisioner_for(claim)
    assert not replace(pool, name="ws0a1b2c3").made_by_go_provisioner_for(claim)
    # This controller's own pools are told by their tags.
    assert not replace(pool, tags={"kaito-gpu-provisioner": "managed"}).made_by_go_provisioner_for(claim)


def test_a_go_provisioner_pool_made_for_an_earlier_claim_of_the_same_name_is_not_the_claims():
    claim, pool = _launched_by_go(NODECLAIM)
    earlier, _ = _launched_by_go(NODECLAIM, created="2026-05-04T03:01:59Z")
    assert not pool.made_by_go_provisioner_for(earlier)
    assert pool.made_by_go_provisioner_for(claim)


def test_a_machine_era_pool_is_the_claims_only_when_the_claims_provider_id_names_its_scale_set():
    claim, pool = _launched_by_go(MACHINE)  # v0.2 wrote no creation time on its pools
    assert "kaito.sh/creation-timestamp" not in pool.node_labels
    assert pool.made_by_go_provisioner_for(claim)
    for provider_id in ("", "azure:///subscriptions/s/resourceGroups/mc_rg/providers/Microsoft.Compute/"
                            "virtualMachineScaleSets/aks-ws0a1b2c3dx-12345678-vmss/virtualMachines/0"):
        claim.obj["status"]["providerID"] = provider_id
        assert not pool.made_by_go_provisioner_for(claim)
