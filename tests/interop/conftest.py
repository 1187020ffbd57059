"""Fixtures for the Kaito interop tier: per test an AKS simulator, `gpu-provisioner run` and Kaito's own
workspace controller, all against the session's control plane."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from gpu_provisioner.sim import AksSimulator
from tests.integration.conftest import claims, controller_process
from tests.integration.harness import Claims, wait_for
from tests.interop.kaito import (
    NAMESPACE,
    RELEASES,
    ClaimCensus,
    KaitoProcess,
    KaitoRelease,
    Workspaces,
    install_kaito_crds,
    list_claims,
)

# Borrowed from the integration tier: `claims` (autouse) leaves no claim or Node behind each test.
__all__ = ["claims", "controller_process"]


@pytest.fixture(scope="module", params=RELEASES, ids=[r.version for r in RELEASES])
def era(request: pytest.FixtureRequest) -> KaitoRelease:
    """One Kaito release with its CRDs installed; pytest groups the tests by release, so each
    release's CRDs go in once."""
    release: KaitoRelease = request.param
    missing = release.missing()
    if missing:
        # `make interop` asks for Kaito explicitly: there a missing Kaito is an error, not a skip.
        if os.environ.get("KAITO_INTEROP_REQUIRED") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    # Only now: a skipped tier must not start the control plane.
    install_kaito_crds(request.getfixturevalue("kube_api"), release)
    return release


@dataclass
class Stack:
    """One test's simulator, controller and Kaito, and the Workspace it applies."""

    release: KaitoRelease
    sim: AksSimulator
    kaito: KaitoProcess
    workspaces: Workspaces
    custom: kubernetes.client.CustomObjectsApi
    core: kubernetes.client.CoreV1Api
    apps: kubernetes.client.AppsV1Api
    workspace: str

    def apply_workspace(self) -> None:
        self.workspaces.create_phi3(self.workspace, self.release.instance_type)

    def condition(self, condition_type: str) -> dict[str, Any]:
        return self.workspaces.condition(self.workspace, condition_type)

    def wait_resource_ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        return wait_for(
            f"Workspace {self.workspace} ResourceReady=True (Kaito log: {self.kaito.log})",
            lambda: (c := self.condition("ResourceReady")).get("status") == "True" and c,
            timeout_s, interval_s=0.1,
        )

    def report_inference_ready(self) -> None:
        """Stand in for the kubelet and the workload controllers: Kaito's inference workload reports all its
        replicas ready. Kaito v0.3.1 holds the Workspace's reconcile until it does (for longer than a test),
        and acts on no later event of that Workspace (a deletion, a lost Machine) before."""
        workloads = (
            (self.apps.read_namespaced_deployment, self.apps.patch_namespaced_deployment_status),
            (self.apps.read_namespaced_stateful_set, self.apps.patch_namespaced_stateful_set_status),
        )

        def mark_ready() -> bool:
            for read, patch_status in workloads:
                try:
                    workload = read(self.workspace, NAMESPACE)
                except kubernetes.client.ApiException as error:
                    if error.status == 404:
                        continue
                    raise
                replicas = workload.spec.replicas or 1
                patch_status(self.workspace, NAMESPACE, {"status": {
                    "observedGeneration": workload.metadata.generation, "replicas": replicas,
                    "readyReplicas": replicas, "availableReplicas": replicas, "updatedReplicas": replicas,
                }})
                return True
            return False

        wait_for(f"Kaito to create the inference workload of Workspace {self.workspace}", mark_ready)

    def claims(self) -> list[dict[str, Any]]:
        return list_claims(self.custom, self.release.claim_api, self.workspace)

    def serving(self) -> dict[str, Any]:
        """Apply the Workspace, wait for ResourceReady, report its workload ready; returns the one claim."""
        self.apply_workspace()
        self.wait_resource_ready()
        self.report_inference_ready()
        return self.only_claim()

    def only_claim(self) -> dict[str, Any]:
        claims = self.claims()
        assert len(claims) == 1, f"expected one {self.release.claim_api.kind}, found {_names(claims)}"
        return claims[0]

    def census(self) -> ClaimCensus:
        return ClaimCensus(self.custom, self.release.claim_api, self.workspace)

    def node(self, name: str) -> Any | None:
        return Claims(self.custom.api_client).node(name)


def _names(items: list[dict[str, Any]]) -> list[str]:
    return [item["metadata"]["name"] for item in items]


@pytest.fixture
def stack(
    era: KaitoRelease, kube_api: kubernetes.client.ApiClient, control_plane: Any, unique_name: str,
    start_sim: Callable[..., AksSimulator], controller_process: Callable[..., Any], tmp_path: Path,
) -> Iterator[Callable[..., Stack]]:
    """stack("quota-exhausted", create_delay_s=20) starts the three processes for this test's release."""
    workspaces = Workspaces(kube_api, era.workspace_version)
    started: list[KaitoProcess] = []

    def start(scenario: str = "default", **overrides: Any) -> Stack:
        sim = start_sim(scenario, **overrides)
        controller_process(sim)
        kaito = KaitoProcess(era, control_plane.kubeconfig, tmp_path)
        started.append(kaito)
        kaito.start()
        return Stack(era, sim, kaito, workspaces, kubernetes.client.CustomObjectsApi(kube_api),
                     kubernetes.client.CoreV1Api(kube_api), kubernetes.client.AppsV1Api(kube_api),
                     "ws-" + unique_name)

    yield start
    # Kaito first, or it would recreate what the cleanup deletes.
    for kaito in started:
        kaito.stop()
    workspaces.remove_all()
