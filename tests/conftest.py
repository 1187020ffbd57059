"""Shared fixtures: one real control plane (etcd + kube-apiserver) per test session.

Tests isolate by object names (see `unique_name`), never by restarting the server. When any
test of the session failed, the server logs are copied to .artifacts/control-plane-logs/.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from gpu_provisioner.devenv.controlplane import ControlPlane
from gpu_provisioner.devenv.tools import ensure_tools
from gpu_provisioner.sim import AksSimulator, Scenario

ARTIFACTS = Path(__file__).resolve().parents[1] / ".artifacts"


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    plane = ControlPlane(ensure_tools())
    plane.start()
    yield plane
    failed = request.session.testsfailed > 0
    plane.stop(keep_logs_in=ARTIFACTS / "control-plane-logs" if failed else None)


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    client = control_plane.api_client()
    yield client
    client.close()


@pytest.fixture
def unique_name() -> str:
    """A fresh name that is also a valid AKS pool name (lowercase letter first, <= 12 chars)."""
    return "t" + uuid.uuid4().hex[:9]


@pytest.fixture
def start_sim(kube_api: kubernetes.client.ApiClient) -> Iterator[Callable[..., AksSimulator]]:
    """Start an AKS simulator: start_sim("quota-exhausted", create_delay_s=1, materialise_nodes=False)."""
    started: list[AksSimulator] = []

    def start(scenario: str = "default", materialise_nodes: bool = True, **overrides: Any) -> AksSimulator:
        sim = AksSimulator(Scenario.named(scenario, **overrides), kube_api=kube_api if materialise_nodes else None)
        sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()
