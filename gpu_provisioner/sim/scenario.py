"""What the simulated AKS does: delays, quotas, offers, faults. Set per test from Python, per run from
the CLI (a preset name) or from the environment (AKS_SIM_<FIELD>)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpu_provisioner.cloud.skus import CATALOGUE

_GPU_SIZES = [size for size in CATALOGUE.values() if size.is_gpu]

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quota-exhausted": {"vcpu_quota": {size.family: 0 for size in _GPU_SIZES}},
    "sku-unavailable": {"unavailable_skus": ["Standard_NC6s_v3", "Standard_NC12s_v3", "Standard_NC24s_v3"]},
    "allocation-failure": {"allocation_failure_skus": [size.name for size in _GPU_SIZES]},
    "throttled": {"throttle_rate": 0.3, "retry_after_s": 1},
    "node-never-ready": {"node_never_ready": True},
    "no-gpu": {"no_gpu": True},
    "cluster-stopped": {"cluster_power": "Stopped"},
    "flaky": {"server_error_rate": 0.1, "drop_rate": 0.05},
    "no-compute-read-access": {"denied_actions": [
        "Microsoft.Compute/skus/read", "Microsoft.Compute/locations/usages/read",
    ]},
    "no-write-access": {"denied_actions": [
        "Microsoft.ContainerService/managedClusters/agentPools/write",
        "Microsoft.ContainerService/managedClusters/agentPools/delete",
    ]},
    "gpu-lost": {"gpus_lost_after_s": 5.0},
    "node-lost": {"node_lost_after_s": 5.0},
}


class Scenario(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AKS_SIM_", extra="forbid")

    seed: int = 0
    create_delay_s: float = 2.0
    delete_delay_s: float = 1.0
    node_join_delay_s: float = 0.5  # after the pool succeeded
    node_ready_delay_s: float = 0.5  # after the node joined
    gpu_publish_delay_s: float = 0.5  # after the node turned Ready
    poll_retry_after_s: int = 1  # Retry-After on long-running operation responses
    # Agent-pool PUTs and DELETEs are answered this long after they arrive (the operation starts at once): ARM and
    # the AKS resource provider take a second or more to accept a write.
    write_answer_delay_s: float = Field(0.0, ge=0)
    # Regional vCPU quota per family; a family not listed is unlimited. The Usages API and the PUTs answer
    # from the same numbers.
    vcpu_quota: dict[str, int] = Field(default_factory=dict)
    # The region's total vCPU quota ("cores" in the Usages API) that every family also counts against.
    regional_vcpu_quota: int | None = None
    # Sizes the subscription may not use in the region: a Location restriction (NotAvailableForSubscription)
    # in the Resource SKUs, and PUTs refused.
    unavailable_skus: list[str] = Field(default_factory=list)
    # Size -> zones it is restricted in (Zone restrictions in the Resource SKUs). A regional pool is still
    # created while one of the region's zones is left; restricted in every zone, its PUT is refused.
    zone_restricted_skus: dict[str, list[str]] = Field(default_factory=dict)
    # Sizes this AKS refuses as invalid (400 InvalidParameter on vmSize), not for capacity.
    unsupported_skus: list[str] = Field(default_factory=list)
    allocation_failure_skus: list[str] = Field(default_factory=list)
    throttle_rate: float = Field(0.0, ge=0, le=1)
    retry_after_s: int = 1
    server_error_rate: float = Field(0.0, ge=0, le=1)
    drop_rate: float = Field(0.0, ge=0, le=1)
    # The cluster's subnet has no room for another node: pool PUTs get AKS's InsufficientSubnetSize.
    subnet_full: bool = False
    # The next N agent-pool PUTs are carried out but their answers are lost (the connection drops).
    lost_create_answers: int = Field(0, ge=0)
    node_never_ready: bool = False
    no_gpu: bool = False
    cluster_power: str = "Running"  # Running, Stopped, Starting, Stopping
    # Azure RBAC actions the controller's identity lacks, e.g. "Microsoft.ContainerService/managedClusters/
    # agentPools/write": requests needing them get 403 AuthorizationFailed.
    denied_actions: list[str] = Field(default_factory=list)
    # A node in service fails this long after it came up whole (None: never): its GPUs vanish (allocatable 0),
    # or it is lost (Ready Unknown, as when the kubelet stops posting).
    gpus_lost_after_s: float | None = None
    node_lost_after_s: float | None = None

    @classmethod
    def named(cls, name: str, **overrides: Any) -> Scenario:
        if name not in PRESETS:
            raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
