"""Every Prometheus metric the controller exports (default registry). Names and labels are documented
in the README's metrics table; keep the two in step."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, disable_created_metrics

# A `_created` series beside every counter and histogram is about a third more series and no dashboard reads it.
disable_created_metrics()

# Fine enough that p95 of 8-11 s reads within a second of the truth, and that 3-10 min GPU launches spread over
# eleven buckets; modelled on Karpenter's duration buckets, carried on to 30 min.
STAGE_BUCKETS = (
    0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17.5, 20, 25, 30, 40, 50, 60, 75, 90,
    105, 120, 150, 180, 210, 240, 270, 300, 330, 360, 420, 480, 540, 600, 720, 840, 960, 1080, 1200, 1500, 1800,
)
# One ARM request (the SDK's polling is never waited on): tens of milliseconds to tens of seconds.
_ARM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

BUILD_INFO = Info("gpu_provisioner_build", "Version of the running controller")

CLAIMS = Gauge("gpu_provisioner_claims", "Claims by kind and phase", ["kind", "phase"])
FOREIGN_CLAIMS = Gauge(
    "gpu_provisioner_foreign_claims", "Claims not made by Kaito (such as Karpenter's), left alone", ["kind"]
)
LAUNCHES = Counter(
    "gpu_provisioner_launches_total", "Agent pool create attempts (PUTs) by their outcome", ["kind", "result"]
)
TERMINATIONS = Counter("gpu_provisioner_terminations_total", "Claim terminations by result", ["kind", "result"])
STAGE_SECONDS = Histogram(
    "gpu_provisioner_claim_stage_seconds",
    "Seconds from claim creation until it reached a stage (launched, registered, initialized, ready)",
    ["kind", "stage"], buckets=STAGE_BUCKETS,
)
ORPHANS_DELETED = Counter("gpu_provisioner_orphan_pools_deleted_total", "Agent pools deleted by the orphan sweep")

ARM_REQUESTS = Counter(
    "gpu_provisioner_arm_requests_total", "HTTP requests to ARM by operation and status code", ["operation", "code"]
)
ARM_REQUEST_DURATION = Histogram(
    "gpu_provisioner_arm_request_duration_seconds", "Seconds one HTTP request to ARM took, by operation",
    ["operation"], buckets=_ARM_BUCKETS,
)

ARM_WRITES_PENDING = Gauge(
    "gpu_provisioner_arm_writes_pending",
    "Agent-pool PUTs and DELETEs not yet answered by ARM, sent or waiting for an ARM writer",
)
RECONCILE_DURATION = Histogram("gpu_provisioner_reconcile_seconds", "Time spent in one reconcile", ["kind"])
RECONCILE_ERRORS = Counter("gpu_provisioner_reconcile_errors_total", "Reconciles that failed", ["kind", "reason"])

WORKQUEUE_DEPTH = Gauge("gpu_provisioner_workqueue_depth", "Keys ready to be worked on", ["name"])
WORKQUEUE_ADDS = Counter("gpu_provisioner_workqueue_adds_total", "Keys added", ["name"])
WORKQUEUE_RETRIES = Counter("gpu_provisioner_workqueue_retries_total", "Rate-limited re-adds", ["name"])
WORKQUEUE_QUEUE_DURATION = Histogram(
    "gpu_provisioner_workqueue_queue_duration_seconds", "Seconds a key waited before a worker took it", ["name"]
)
WORKQUEUE_WORK_DURATION = Histogram(
    "gpu_provisioner_workqueue_work_duration_seconds", "Seconds a worker held a key", ["name"]
)
WORKQUEUE_UNFINISHED_WORK = Gauge(
    "gpu_provisioner_workqueue_unfinished_work_seconds",
    "Seconds of work in progress not yet observed by work_duration; a steady rise means stuck workers", ["name"],
)
WORKQUEUE_LONGEST_RUNNING = Gauge(
    "gpu_provisioner_workqueue_longest_running_processor_seconds",
    "Seconds the longest-running worker of the queue has held its key", ["name"],
)

LEADER = Gauge("gpu_provisioner_leader", "1 while this replica reconciles: it holds the Lease, or election is off")

# Karpenter's own names and labels (sigs.k8s.io/karpenter v1.0 pkg/metrics), so that dashboards and alerts made for
# Karpenter or the Go gpu-provisioner read this controller too. A Machine counts as a nodeclaim; its nodepool is
# its karpenter.sh/provisioner-name.
KARPENTER_NODECLAIMS_CREATED = Counter(
    "karpenter_nodeclaims_created_total", "Claims taken on (finalizer added), by reason, nodepool and capacity type",
    ["reason", "nodepool", "capacity_type"],
)
KARPENTER_NODECLAIMS_TERMINATED = Counter(
    "karpenter_nodeclaims_terminated_total", "Claims whose termination finished (pool gone, finalizer removed)",
    ["nodepool", "capacity_type"],
)
KARPENTER_NODECLAIMS_DISRUPTED = Counter(
    "karpenter_nodeclaims_disrupted_total", "Claims the controller deleted, by reason",
    ["reason", "nodepool", "capacity_type"],
)
KARPENTER_NODES_CREATED = Counter("karpenter_nodes_created_total", "Nodes registered to a claim", ["nodepool"])
KARPENTER_NODES_TERMINATED = Counter(
    "karpenter_nodes_terminated_total", "Nodes of a claim drained and deleted", ["nodepool"]
)

CATALOGUE_LIVE = Gauge(
    "gpu_provisioner_azure_catalogue_live",
    "1 while Azure answers the read (api: resource_skus, usages) for the region; 0 while the built-in VM size "
    "table is used instead (resource_skus) or the quota check is left to AKS (usages)",
    ["region", "api"],
)
PREFLIGHT_REFUSALS = Counter(
    "gpu_provisioner_preflight_refusals_total",
    "Agent pool PUTs not sent because the pre-flight found the size restricted or its vCPU quota used up",
    ["reason"],
)

NODE_REPAIRS = Counter(
    "gpu_provisioner_node_repairs_total",
    "Ready claims deleted because their Node stayed unhealthy (NodeNotReady, GPUUnavailable)", ["kind", "reason"],
)
NODE_REPAIRS_BLOCKED = Counter(
    "gpu_provisioner_node_repairs_blocked_total",
    "Repairs held back by a safety rule (TooManyUnhealthy, APIServerDown, ARMDown, AgentPoolBusy)", ["reason"],
)
