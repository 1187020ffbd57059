"""Controller settings, read from the environment under the Go gpu-provisioner's names."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gpu_provisioner.api.claims import CLAIM_APIS


class SettingsError(RuntimeError):
    """Start-up settings are missing or wrong; the message names each variable to set."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("gpu-provisioner cannot start:\n" + "\n".join(f"  {problem}" for problem in problems))
        self.problems = problems


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", populate_by_name=True)

    # Where the cluster lives (the Go provisioner's variable names).
    subscription_id: str = Field(validation_alias="ARM_SUBSCRIPTION_ID")
    resource_group: str = Field(validation_alias="ARM_RESOURCE_GROUP")
    cluster_name: str = Field(validation_alias="AZURE_CLUSTER_NAME")
    location: str = Field(validation_alias="LOCATION")
    # Read by DefaultAzureCredential itself (workload identity, managed identity); kept here so a
    # missing one is reported at start-up and shown in the start-up log.
    client_id: str = Field("", validation_alias="AZURE_CLIENT_ID")
    tenant_id: str = Field("", validation_alias="AZURE_TENANT_ID")
    # Sovereign clouds, Azure Stack, or the AKS simulator. An Entra authority that Microsoft's instance
    # discovery does not know (AZURE_AUTHORITY_HOST) needs discovery off.
    disable_instance_discovery: bool = Field(False, validation_alias="AZURE_DISABLE_INSTANCE_DISCOVERY")
    arm_endpoint: str = Field("https://management.azure.com", validation_alias="ARM_ENDPOINT")

    claim_apis: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(CLAIM_APIS), validation_alias="CLAIM_APIS"
    )
    kubeconfig: Path | None = Field(None, validation_alias="KUBECONFIG")
    workers: int = Field(8, ge=1, validation_alias="WORKERS")
    # Besides `workers`: these take only claims whose Node just let them turn Ready, so that what Kaito waits for
    # never waits behind other work (with ARM_WRITERS=0, launches and deletions holding a worker for ARM's answer).
    ready_workers: int = Field(4, ge=0, validation_alias="READY_WORKERS")
    # Threads that send pool PUTs and DELETEs, so that no worker waits for ARM's answer to a write (a second or
    # more); 0: each is sent by the worker of its claim, which waits for the answer.
    arm_writers: int = Field(64, ge=0, validation_alias="ARM_WRITERS")
    launch_timeout_s: float = Field(300.0, gt=0, validation_alias="LAUNCH_TIMEOUT_SECONDS")
    registration_timeout_s: float = Field(
        900.0, gt=0, validation_alias="REGISTRATION_TIMEOUT_SECONDS"
    )
    # One agent-pool LIST per cluster per interval feeds every claim in flight.
    pool_refresh_interval_s: float = Field(
        10.0, gt=0, validation_alias="POOL_REFRESH_INTERVAL_SECONDS"
    )
    orphan_sweep_interval_s: float = Field(
        300.0, gt=0, validation_alias="ORPHAN_SWEEP_INTERVAL_SECONDS"
    )
    orphan_grace_s: float = Field(600.0, ge=0, validation_alias="ORPHAN_GRACE_SECONDS")
    metrics_port: int = Field(8080, validation_alias="METRICS_PORT")
    health_probe_port: int = Field(8081, validation_alias="HEALTH_PROBE_PORT")
    bind_address: str = Field("0.0.0.0", validation_alias="BIND_ADDRESS")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", validation_alias="LOG_LEVEL")
    # Leader election on a Lease in the pod's namespace; the pod name identifies the candidate.
    leader_elect: bool = Field(False, validation_alias="LEADER_ELECT")
    pod_namespace: str = Field("default", validation_alias="POD_NAMESPACE")
    pod_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", validation_alias="POD_NAME")
    lease_duration_s: float = Field(15.0, gt=0, validation_alias="LEASE_DURATION_SECONDS")
    # Before a PUT, the size is checked against the region's Resource SKUs (restrictions; read at most once per
    # SKU interval) and its family's vCPU quota (Usages; at most once per quota interval, shared by all claims).
    preflight: bool = Field(True, validation_alias="PREFLIGHT")
    sku_catalogue_refresh_s: float = Field(3600.0, gt=0, validation_alias="SKU_CATALOGUE_REFRESH_SECONDS")
    quota_refresh_interval_s: float = Field(60.0, gt=0, validation_alias="QUOTA_REFRESH_INTERVAL_SECONDS")
    # A registered claim whose Node is not Ready with its GPUs within this time is deleted (Kaito makes a new one).
    initialization_timeout_s: float = Field(900.0, gt=0, validation_alias="INITIALIZATION_TIMEOUT_SECONDS")
    # GPU node repair: a Ready claim whose Node stays NotReady/Unknown, or short of its GPUs (allocatable), for
    # the toleration is deleted; never while more than the share of the managed nodes is unhealthy (Karpenter's 20%).
    node_repair_enabled: bool = Field(True, validation_alias="NODE_REPAIR_ENABLED")
    node_repair_toleration_s: float = Field(600.0, gt=0, validation_alias="NODE_REPAIR_TOLERATION_SECONDS")
    node_repair_max_unhealthy_percent: int = Field(
        20, ge=0, le=100, validation_alias="NODE_REPAIR_MAX_UNHEALTHY_PERCENT"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("claim_apis", mode="before")
    @classmethod
    def _split_apis(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip().lower() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            unknown = [v for v in value if v not in CLAIM_APIS]
            if unknown:
                raise ValueError(f"unknown claim API {unknown}; choose from {sorted(CLAIM_APIS)}")
        return value

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Settings from the environment, or a SettingsError that lists every problem."""
        try:
            return cls(**overrides)
        except ValidationError as error:
            problems = []
            for problem in error.errors():
                # The location is the environment variable's name (the field's alias).
                name = ".".join(str(part) for part in problem["loc"])
                what = "is not set" if problem["type"] == "missing" else problem["msg"]
                problems.append(f"{name}: {what}")
            raise SettingsError(problems) from None
