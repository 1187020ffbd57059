"""Every Prometheus metric the controller exports (default registry). Names and labels are documented
in the README's metrics table; keep the two in step."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

_STAGE_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800)

BUILD_INFO = Info("gpu_provisioner_build", "Version of the running controller")

CLAIMS = Gauge("gpu_provisioner_claims", "Claims by kind and phase", ["kind", "phase"])
FOREIGN_CLAIMS = Gauge(
    "gpu_provisioner_foreign_claims", "Claims not made by Kaito (such as Karpenter's), left alone", ["kind"]
)
LAUNCHES = Counter("gpu_provisioner_launches_total", "Agent pool launches by result", ["kind", "result"])
TERMINATIONS = Counter("gpu_provisioner_terminations_total", "Claim terminations by result", ["kind", "result"])
STAGE_SECONDS = Histogram(
    "gpu_provisioner_claim_stage_seconds",
    "Seconds from claim creation until it reached a stage (launched, registered, initialized, ready)",
    ["kind", "stage"], buckets=_STAGE_BUCKETS,
)
ORPHANS_DELETED = Counter("gpu_provisioner_orphan_pools_deleted_total", "Agent pools deleted by the orphan sweep")

ARM_REQUESTS = Counter(
    "gpu_provisioner_arm_requests_total", "HTTP requests to ARM by operation and status code", ["operation", "code"]
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

LEADER = Gauge("gpu_provisioner_leader", "1 while this replica is the leader")

NODE_REPAIRS = Counter(
    "gpu_provisioner_node_repairs_total",
    "Ready claims deleted because their Node stayed unhealthy (NodeNotReady, GPUUnavailable)", ["kind", "reason"],
)
NODE_REPAIRS_BLOCKED = Counter(
    "gpu_provisioner_node_repairs_blocked_total",
    "Repairs held back by a safety rule (TooManyUnhealthy, APIServerDown, ARMDown, AgentPoolBusy)", ["reason"],
)
