"""ARM error codes -> the classes the lifecycle treats differently."""

from __future__ import annotations

import pytest
from azure.core.exceptions import ClientAuthenticationError

from gpu_provisioner.cloud.agentpools import ClusterState
from gpu_provisioner.cloud.errors import (
    AccessDeniedError,
    AllocationFailedError,
    ClusterUnavailableError,
    InvalidRequestError,
    NotFoundError,
    PoolBusyError,
    QuotaExceededError,
    RequestFailedError,
    SkuUnavailableError,
    ThrottledError,
    TransientError,
    classify,
    classify_code,
)


@pytest.mark.parametrize(
    ("code", "message", "status", "cls"),
    [
        ("QuotaExceeded", "Operation could not be completed as it results in exceeding approved quota", 400,
         QuotaExceededError),
        ("OperationNotAllowed", "exceeding approved standardNCSv3Family Cores quota", 400, QuotaExceededError),
        ("SkuNotAvailable", "The requested VM size is not available in location eastus", 400, SkuUnavailableError),
        ("AllocationFailed", "Allocation failed. We do not have sufficient capacity", 200, AllocationFailedError),
        ("OverconstrainedAllocationRequest", "constraints", 200, AllocationFailedError),
        ("OperationNotAllowed", "Another operation (Creating) is in progress on agent pool x", 409, PoolBusyError),
        ("TooManyRequests", "throttled", 429, ThrottledError),
        ("InternalServerError", "oops", 500, TransientError),
        ("NotFound", "gone", 404, NotFoundError),
        ("InvalidParameter", "The value of parameter agentPoolProfile.name is invalid", 400, InvalidRequestError),
        ("OperationNotAllowed", "The cluster is stopped; start it first", 409, ClusterUnavailableError),
        ("AuthorizationFailed", "The client 'x' does not have authorization to perform action "
         "'Microsoft.ContainerService/managedClusters/agentPools/write'", 403, AccessDeniedError),
        ("InvalidAuthenticationToken", "The access token is invalid.", 401, AccessDeniedError),
        ("InsufficientSubnetSize", "Pre-allocated IPs 31 exceeds IPs available 0 in Subnet Cidr 10.224.0.0/24",
         400, RequestFailedError),
        ("PreconditionFailed", "The operation could not be completed", 412, RequestFailedError),
        # AKS's real wordings, where a generic code hides the cause in the message:
        ("ErrCode_InsufficientVCPUQuota", "Insufficient vcpu quota requested 2, remaining 0 for family "
         "StandardDasv7Family for region eastus.", 400, QuotaExceededError),
        ("InvalidTemplateDeployment", "... results in exceeding approved Total Regional Cores quota ...", 400,
         QuotaExceededError),
        ("BadRequest", "The VM size of AgentPoolProfile:gpu is not allowed in your subscription in location "
         "'westus'.", 400, SkuUnavailableError),
        ("PreconditionFailed", "The requested size for resource 'x' is currently not available in location "
         "'eastus2' zones '1'", 400, SkuUnavailableError),
    ],
)
def test_arm_codes_are_classified(code, message, status, cls):
    error = classify_code(code, message, status, retry_after_s=7)
    assert type(error) is cls
    assert error.code == code and error.message == message
    if isinstance(error, ThrottledError):
        assert error.retry_after_s == 7


@pytest.mark.parametrize(
    ("provisioning", "power", "accepts"),
    [("Succeeded", "Running", True), ("Failed", "Running", True), ("Succeeded", "Stopped", False),
     ("Starting", "Running", False), ("Stopping", "Running", False), ("Updating", "Running", False)],
)
def test_pool_writes_wait_for_a_running_idle_cluster(provisioning, power, accepts):
    assert ClusterState(provisioning, power).accepts_pool_changes is accepts


def test_no_token_at_all_is_access_denied_with_what_to_grant():
    error = classify(ClientAuthenticationError("WorkloadIdentityCredential authentication failed: AADSTS70021"))
    assert isinstance(error, AccessDeniedError)
    assert "AADSTS70021" in error.describe() and "Azure Kubernetes Service Contributor Role" in error.describe()
