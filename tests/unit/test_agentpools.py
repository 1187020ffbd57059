"""Which ARM failures the AKS door retries inline: a PUT is resent only when ARM certainly did not carry it out."""

from __future__ import annotations

from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

from gpu_provisioner.cloud.agentpools import (
    _short_transient,
    _short_transient_unsent,
    arm_client_options,
    arm_operation,
)
from gpu_provisioner.settings import Settings


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
