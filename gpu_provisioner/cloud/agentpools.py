"""The narrow door to AKS: create, delete, get and list agent pools, and read the cluster's state.

Long-running operations are started and left running (`polling=False`): the caller records that a
pool is Creating or Deleting and learns the outcome from the next LIST, so no worker ever waits on
Azure's operations (and the lifecycle sends the writes themselves off its workers). Retries of
transient failures are short and bounded here; anything longer goes back to the work queue with the
delay ARM asked for.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import requests
from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    map_error,
)
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.core.rest import HttpRequest
from azure.identity import DefaultAzureCredential
from azure.mgmt.containerservice import ContainerServiceClient
from azure.mgmt.core.exceptions import ARMErrorFormat
from tenacity import retry, retry_if_exception, stop_after_attempt

from gpu_provisioner import metrics
from gpu_provisioner.api.claims import KAITO_OWNER_LABELS, NODECLAIM, Claim, claim_key, parse_time
from gpu_provisioner.cloud.errors import NotFoundError, PoolBusyError, ThrottledError, TransientError, classify
from gpu_provisioner.cloud.pool_request import (
    CLAIM_TAG,
    CLAIM_UID_TAG,
    CREATED_TAG,
    CREATION_LABEL,
    CREATION_LABEL_FORMAT,
    MACHINE_TYPE_LABEL,
    MANAGED_TAG,
    MANAGED_VALUE,
)
from gpu_provisioner.settings import Settings
from gpu_provisioner.version import user_agent

T = TypeVar("T")
# A worker sleeps at most this long for one retry; a longer Retry-After goes back to the queue.
MAX_INLINE_RETRY_WAIT_S = 2.0
INLINE_ATTEMPTS = 3
# Provisioning states of a pool whose create or update is still running.
# Named, not left to the SDK's default, because the pool LIST is sent as a plain request (see `_list_pages`).
AKS_API_VERSION = "2026-08-01"
# The exceptions the SDK's own operations raise for these statuses, so a raw request fails as they do.
SDK_ERROR_MAP = {401: ClientAuthenticationError, 404: ResourceNotFoundError, 409: ResourceExistsError}
IN_PROGRESS = frozenset({"Creating", "Updating", "Scaling", "Upgrading", "Starting"})


@dataclass(frozen=True)
class PoolState:
    name: str
    provisioning_state: str
    vm_size: str
    tags: dict[str, str] = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""
    node_labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_arm(cls, body: Mapping[str, Any]) -> PoolState:
        properties = body.get("properties") or {}
        error = (properties.get("status") or {}).get("provisioningError") or {}
        return cls(
            name=body.get("name", ""),
            provisioning_state=properties.get("provisioningState", ""),
            vm_size=properties.get("vmSize", ""),
            tags=dict(properties.get("tags") or {}),
            error_code=error.get("code", ""),
            error_message=error.get("message", ""),
            node_labels=dict(properties.get("nodeLabels") or {}),
        )

    @property
    def operation_running(self) -> bool:
        """A create, update or delete is under way (AKS refuses another write to the pool meanwhile)."""
        return self.provisioning_state in IN_PROGRESS or self.provisioning_state == "Deleting"

    @property
    def managed(self) -> bool:
        return self.tags.get(MANAGED_TAG) == MANAGED_VALUE

    @property
    def claim_key(self) -> str:
        return self.tags.get(CLAIM_TAG, "")

    @property
    def claim_uid(self) -> str:
        return self.tags.get(CLAIM_UID_TAG, "")

    @property
    def created_at(self) -> datetime | None:
        return parse_time(self.tags.get(CREATED_TAG))

    @property
    def made_by_go_provisioner(self) -> bool:
        """Marked as the Go gpu-provisioner (v0.2-v0.4) marks the pools it makes, which it does not tag: by its machine
        type label and the Kaito object's label (copied from the claim) among the node labels."""
        labels = self.node_labels
        return not self.managed and MACHINE_TYPE_LABEL in labels and any(key in labels for key in KAITO_OWNER_LABELS)

    @property
    def go_provisioner_created_at(self) -> datetime | None:
        """When the claim was created that the Go gpu-provisioner made this pool for (its v0.3 on: Machines' have no
        such time), from the node labels."""
        try:
            created = datetime.strptime(self.node_labels.get(CREATION_LABEL, ""), CREATION_LABEL_FORMAT)
        except ValueError:
            return None
        return created.replace(tzinfo=UTC)

    @property
    def made_for(self) -> tuple[str, datetime] | None:
        """The key of the claim this pool was made for, and when: by our tags, or by the node labels with which the Go
        gpu-provisioner's own garbage collection told its pools of NodeClaims; None for any other pool."""
        if self.managed:
            return (self.claim_key, self.created_at) if self.created_at is not None else None
        created = self.go_provisioner_created_at
        if not self.made_by_go_provisioner or NODECLAIM.pool_label[0] not in self.node_labels or created is None:
            return None
        return claim_key(NODECLAIM, self.name), created

    def made_by_go_provisioner_for(self, claim: Claim) -> bool:
        """Whether the Go gpu-provisioner made this pool for `claim` before this controller replaced it: deleting the
        claim must then delete the pool, or its GPU VM runs on. Its pools carry the node labels it copied from the
        claim, from v0.3 (NodeClaims) on with the claim's creation time. A v0.2 pool (Machines) has no such time: the
        claim's providerID, written at its launch, names the pool's scale set instead. A pool of another claim of the
        same name, or of another workspace, is not this claim's."""
        labels = self.node_labels
        if not self.made_by_go_provisioner or self.name != claim.name:
            return False
        owners = {key: value for key, value in claim.labels.items() if key.startswith(KAITO_OWNER_LABELS)}
        if not owners or any(labels.get(key) != value for key, value in owners.items()):
            return False
        if CREATION_LABEL in labels:
            return (created := self.go_provisioner_created_at) is not None and created == claim.created
        return f"/virtualmachinescalesets/aks-{self.name}-" in claim.provider_id.lower()


@dataclass(frozen=True)
class ClusterState:
    provisioning_state: str
    power_state: str

    @property
    def accepts_pool_changes(self) -> bool:
        # A stopped cluster refuses pool writes, and a starting/stopping/upgrading one is busy:
        # sending PUTs then only burns the subscription's write budget (kaito#2075).
        return self.power_state == "Running" and self.provisioning_state in ("Succeeded", "Failed", "Canceled")

    def describe(self) -> str:
        return f"power state {self.power_state or 'unknown'}, provisioning state {self.provisioning_state or 'unknown'}"


_ARM_PATH = re.compile(r"/managedclusters/[^/]+(/agentpools(/[^/?]+)?)?(?:\?|$)", re.IGNORECASE)
_COMPUTE_READS = {"skus": re.compile(r"/providers/microsoft\.compute/skus(?:\?|$)", re.IGNORECASE),
                  "usages": re.compile(r"/providers/microsoft\.compute/locations/[^/]+/usages(?:\?|$)", re.IGNORECASE)}


def arm_operation(method: str, url: str) -> str:
    """A low-cardinality name for an ARM request, for metrics."""
    match = _ARM_PATH.search(url)
    if match is None:
        return next((f"{name}.list" for name, path in _COMPUTE_READS.items() if path.search(url)), "other")
    if match.group(1) is None:
        return f"managedclusters.{method.lower()}"
    if match.group(2) is None:
        return "agentpools.list"
    return {"PUT": "agentpools.create", "DELETE": "agentpools.delete"}.get(method, "agentpools.get")


class ArmRequestMetricsPolicy(SansIOHTTPPolicy):
    """Counts and times every HTTP request the SDK sends to ARM, by operation (and status code)."""

    _STARTED = "gpu_provisioner_started"

    def on_request(self, request: PipelineRequest) -> None:
        request.context[self._STARTED] = time.monotonic()

    def on_response(self, request: PipelineRequest, response: PipelineResponse) -> None:
        self._record(request, str(response.http_response.status_code))

    def on_exception(self, request: PipelineRequest) -> None:
        self._record(request, "error")

    def _record(self, request: PipelineRequest, code: str) -> None:
        operation = arm_operation(request.http_request.method, request.http_request.url)
        metrics.ARM_REQUESTS.labels(operation=operation, code=code).inc()
        started = request.context.get(self._STARTED)
        if started is not None:
            metrics.ARM_REQUEST_DURATION.labels(operation=operation).observe(time.monotonic() - started)


def _short_transient(error: BaseException) -> bool:
    cloud_error = classify(error) if isinstance(error, Exception) else None
    # A busy pool stays busy for minutes: that wait belongs in the queue, not in a worker.
    return (
        isinstance(cloud_error, TransientError) and not isinstance(cloud_error, PoolBusyError)
        and (cloud_error.retry_after_s or 0) <= MAX_INLINE_RETRY_WAIT_S
    )


def _short_transient_unsent(error: BaseException) -> bool:
    """A short transient failure that proves ARM did not carry the request out: only those may be resent
    when resending is not harmless (a PUT whose answer was lost may have created the pool)."""
    unsent = isinstance(error, ServiceRequestError) or isinstance(classify(error), ThrottledError)
    return unsent and _short_transient(error)


def _wait(retry_state: Any) -> float:
    error = classify(retry_state.outcome.exception())
    requested = error.retry_after_s if isinstance(error, TransientError) else None
    return requested if requested is not None else 0.2 * 2 ** (retry_state.attempt_number - 1)


def call_arm(request: Callable[[], T], retry_when: Callable[[BaseException], bool] = _short_transient) -> T:
    """Run one ARM request with short inline retries; raise a classified CloudError."""
    retrying = retry(
        retry=retry_if_exception(retry_when),
        wait=_wait,
        stop=stop_after_attempt(INLINE_ATTEMPTS),
        reraise=True,
    )
    try:
        return retrying(request)()
    except Exception as error:
        raise classify(error) from error


def arm_client_options(settings: Settings) -> dict[str, Any]:
    """What every ARM client of the controller is built with."""
    # As many kept connections as requests may run at once: the ARM writers, the workers (a cluster GET, a failed
    # pool's DELETE), the LIST and the SKU reads. The transport's own session keeps 10, and every request beyond
    # them would open a TLS connection and throw it away.
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=settings.arm_writers + settings.workers + 2)
    for scheme in ("https://", "http://"):
        session.mount(scheme, adapter)
    return {
        "session": session,
        "base_url": settings.arm_endpoint,
        # One retry layer, ours: it knows when a wait belongs in the queue rather than in a worker.
        "retry_total": 0,
        "per_retry_policies": [ArmRequestMetricsPolicy()],
        "user_agent": user_agent(),  # in front of the SDK's own
    }


def default_credential(settings: Settings) -> TokenCredential:
    return DefaultAzureCredential(disable_instance_discovery=settings.disable_instance_discovery)


class AgentPools:
    """create / delete / get / list for the agent pools of one managed cluster."""

    def __init__(self, settings: Settings, credential: TokenCredential | None = None) -> None:
        self.settings = settings
        self._client = ContainerServiceClient(
            credential or default_credential(settings), settings.subscription_id, api_version=AKS_API_VERSION,
            **arm_client_options(settings),
        )
        self._group = settings.resource_group
        self._cluster = settings.cluster_name

    def close(self) -> None:
        self._client.close()

    def create(self, name: str, body: dict[str, Any]) -> PoolState:
        """Start creating (or updating) a pool; returns its state as ARM accepted it (Creating)."""
        poller = call_arm(lambda: self._client.agent_pools.begin_create_or_update(
            self._group, self._cluster, name, body, polling=False
        ), retry_when=_short_transient_unsent)
        return PoolState.from_arm(poller.result().as_dict())

    def delete(self, name: str) -> float | None:
        """Start deleting a pool; an absent pool is already deleted. Returns when ARM said to look again (its
        Retry-After, in seconds), if it said."""
        try:
            poller = call_arm(lambda: self._client.agent_pools.begin_delete(
                self._group, self._cluster, name, polling=False,
                cls=lambda response, *_: response.http_response.headers.get("Retry-After"),
            ))
        except NotFoundError:
            return None
        retry_after = poller.result()
        try:
            return float(retry_after) if retry_after is not None else None
        except ValueError:  # an HTTP date: ARM sends seconds, so this is not worth parsing
            return None

    def get(self, name: str) -> PoolState | None:
        try:
            pool = call_arm(lambda: self._client.agent_pools.get(self._group, self._cluster, name))
        except NotFoundError:
            return None
        return PoolState.from_arm(pool.as_dict())

    def list(self) -> list[PoolState]:
        # As ARM's JSON: the operation's model deserialization would cost about 120 ms of CPU per 1,000 pools,
        # on every LIST, for the five fields PoolState keeps.
        path = (f"/subscriptions/{self.settings.subscription_id}/resourceGroups/{self._group}/providers/"
                f"Microsoft.ContainerService/managedClusters/{self._cluster}/agentPools")
        return call_arm(lambda: [PoolState.from_arm(pool) for pool in self.read_all(path, AKS_API_VERSION)])

    def read_all(self, path: str, api_version: str, query: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Every item of an ARM list (all its pages), as ARM's JSON, read through this client's pipeline (its
        credential, policies and request metrics); an error status raises as the SDK's operations do."""
        request = HttpRequest("GET", path, params={"api-version": api_version, **(query or {})})
        items: list[dict[str, Any]] = []
        while True:
            # Streamed, then read here: otherwise the pipeline's ContentDecodePolicy parses the JSON too, for nothing
            # (a LIST of 1,000 pools is 2 MB, parsed twice).
            response = self._client.send_request(request, stream=True)
            response.read()
            if response.status_code != 200:
                map_error(response.status_code, response, SDK_ERROR_MAP)
                raise HttpResponseError(response=response, error_format=ARMErrorFormat)
            page = response.json()
            items.extend(page.get("value") or [])
            if not page.get("nextLink"):
                return items
            request = HttpRequest("GET", page["nextLink"])

    def cluster(self) -> ClusterState:
        cluster = call_arm(lambda: self._client.managed_clusters.get(self._group, self._cluster)).as_dict()
        properties = cluster.get("properties") or {}
        return ClusterState(
            provisioning_state=properties.get("provisioningState", ""),
            power_state=(properties.get("powerState") or {}).get("code", ""),
        )
