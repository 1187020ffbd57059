"""ARM failures sorted into the classes the lifecycle treats differently.

Each class carries the ARM code and message, and a condition reason a person can act on.
"""

from __future__ import annotations

import re

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

# The phrase Kaito fails fast on when it reads a claim's Launched condition.
INSUFFICIENT_CAPACITY_PHRASE = "all requested instance types were unavailable during launch"


class CloudError(Exception):
    reason = "CloudError"
    # What a person can do about it, when that is not in ARM's message.
    hint = ""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def describe(self) -> str:
        described = f"{self.code}: {self.message}" if self.code else self.message
        return f"{described} ({self.hint})" if self.hint else described


class TransientError(CloudError):
    """Worth retrying as is, after `retry_after_s` when ARM named a delay."""

    reason = "CloudTransientError"

    def __init__(self, message: str, code: str = "", status: int = 0, retry_after_s: float | None = None):
        super().__init__(message, code, status)
        self.retry_after_s = retry_after_s


class ThrottledError(TransientError):
    reason = "Throttled"


class CapacityError(CloudError):
    """This VM size cannot be had now (quota, regional offer, allocation); another size might."""

    reason = "InsufficientCapacity"


class QuotaExceededError(CapacityError):
    reason = "QuotaExceeded"


class SkuUnavailableError(CapacityError):
    reason = "SKUNotAvailable"


class AllocationFailedError(CapacityError):
    reason = "AllocationFailed"


class InvalidRequestError(CloudError):
    """ARM refused the request's content: retrying the same request cannot help."""

    reason = "InvalidAgentPoolRequest"


class RequestFailedError(CloudError):
    """ARM refused for a reason that may pass without the claim changing (a full subnet, a limit, a
    precondition): said, and tried again later."""

    reason = "AgentPoolRequestFailed"


class AccessDeniedError(CloudError):
    """The controller's identity may not do this: a role assignment fixes it, not the claim; retried."""

    reason = "AccessDenied"
    hint = ("give gpu-provisioner's identity a role on the cluster with managedClusters/read and "
            "agentPools/read, write and delete, such as Azure Kubernetes Service Contributor Role")


class ClusterUnavailableError(CloudError):
    """The managed cluster is stopped, starting, stopping or busy with an operation of its own."""

    reason = "ClusterNotReady"


class PoolBusyError(TransientError):
    """Another operation is running on the pool: wait for it instead of stacking a second one."""

    reason = "AgentPoolBusy"


class NotFoundError(CloudError):
    reason = "NotFound"


_QUOTA_CODES = {"quotaexceeded", "insufficientvcpuquota", "errcode_insufficientvcpuquota",
                "operationnotallowed_quota", "subscriptionquotareached"}
_SKU_CODES = {"skunotavailable", "vmsizenotavailable", "errcode_skunotavailable"}
_ALLOCATION_CODES = {"allocationfailed", "overconstrainedallocationrequest", "zonalallocationfailed",
                     "overconstrainedzonalallocationrequest"}
_CLUSTER_CODES = {"clusternotrunning", "clusterstopped", "managedclusternotrunning", "clusterstarting",
                  "clusterstopping", "etagmismatch_cluster"}
_BUSY_CODES = {"operationnotallowed", "anotheroperationinprogress", "conflict"}
_THROTTLE_CODES = {"toomanyrequests", "subscriptionrequeststhrottled", "throttled"}
# Codes that fault the request's content; any other 4xx may pass by itself.
_INVALID_REQUEST_CODES = {"invalidparameter", "badrequest", "invalidrequestcontent", "invalidrequestformat",
                          "propertychangenotallowed", "linkedinvalidpropertypath", "invalidresourcename",
                          "missingapiversionparameter", "invalidapiversionparameter"}
_ACCESS_CODES = {"authorizationfailed", "linkedauthorizationfailed", "authenticationfailed",
                 "invalidauthenticationtoken", "invalidauthenticationtokentenant"}
# AKS often answers with a generic code (BadRequest, InvalidTemplateDeployment, PreconditionFailed) and
# says what happened only in the message, sometimes quoting the inner code.
_QUOTA_MESSAGE = re.compile(r"exceeding approved .*quota|insufficient vcpu quota|QuotaExceeded", re.IGNORECASE)
_SKU_MESSAGE = re.compile(
    r"VM size of .* is not allowed in your subscription|is currently not available in location|SkuNotAvailable",
    re.IGNORECASE,
)
_ALLOCATION_MESSAGE = re.compile(r"AllocationFailed|OverconstrainedAllocationRequest|ZonalAllocationFailed")
_CLUSTER_MESSAGE = re.compile(r"cluster.*\b(stopped|stopping|starting|not running)\b", re.IGNORECASE)


def classify_code(code: str, message: str, status: int = 0, retry_after_s: float | None = None) -> CloudError:
    """The class of an ARM error from its code (case-insensitive), message and HTTP status."""
    folded = code.casefold()
    if status == 429 or folded in _THROTTLE_CODES:
        return ThrottledError(message, code, status, retry_after_s)
    if status in (401, 403) or folded in _ACCESS_CODES:
        return AccessDeniedError(message, code, status)
    if folded in _QUOTA_CODES or _QUOTA_MESSAGE.search(message):
        return QuotaExceededError(message, code, status)
    if folded in _SKU_CODES or _SKU_MESSAGE.search(message):
        return SkuUnavailableError(message, code, status)
    if folded in _ALLOCATION_CODES or _ALLOCATION_MESSAGE.search(message):
        return AllocationFailedError(message, code, status)
    if folded in _CLUSTER_CODES or _CLUSTER_MESSAGE.search(message):
        return ClusterUnavailableError(message, code, status)
    if folded in _BUSY_CODES or status == 409:
        return PoolBusyError(message, code, status, retry_after_s)
    if status == 404 or folded in {"notfound", "resourcenotfound"}:
        return NotFoundError(message, code, status)
    if status >= 500 or status == 0:
        return TransientError(message, code, status, retry_after_s)
    if folded in _INVALID_REQUEST_CODES:
        return InvalidRequestError(message, code, status)
    return RequestFailedError(message, code, status)


def classify(error: Exception) -> CloudError:
    """Turn an azure-core exception into one of the classes above."""
    if isinstance(error, CloudError):
        return error
    if isinstance(error, ServiceRequestError | ServiceResponseError):
        return TransientError(f"connection to ARM failed: {error}", "ConnectionError")
    if isinstance(error, ClientAuthenticationError) and error.status_code is None:
        # No token at all (workload identity not federated, wrong client id or secret): said by azure-identity.
        return AccessDeniedError(f"getting an Azure token failed: {error.message or error}", "AuthenticationFailed")
    if isinstance(error, ResourceNotFoundError):
        return NotFoundError(str(error.message or error), _error_code(error), 404)
    if isinstance(error, HttpResponseError):
        status = error.status_code or 0
        retry_after = _retry_after(error)
        return classify_code(_error_code(error), _error_message(error), status, retry_after)
    return TransientError(f"{type(error).__name__}: {error}")


def _error_code(error: HttpResponseError) -> str:
    odata = getattr(error, "error", None)
    return (getattr(odata, "code", None) or "") if odata else ""


def _error_message(error: HttpResponseError) -> str:
    odata = getattr(error, "error", None)
    message = getattr(odata, "message", None) if odata else None
    return message or str(error.message or error)


def _retry_after(error: HttpResponseError) -> float | None:
    response = error.response
    if response is None:
        return None
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
