"""Fixtures for controller tests: an AKS simulator and an in-process controller, per test."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest

from gpu_provisioner.manager import Manager
from gpu_provisioner.settings import Settings
from gpu_provisioner.sim import AksSimulator
from tests.integration.harness import Claims, start_controller_process

FAST = {"pool_refresh_interval_s": 0.5, "quota_refresh_interval_s": 0.5, "orphan_sweep_interval_s": 3600.0,
        "workers": 4}


@pytest.fixture(autouse=True)
def claims(kube_api: kubernetes.client.ApiClient) -> Iterator[Claims]:
    """Every test here leaves no claim or Node behind: a controller started by a later test would
    otherwise take up its claims."""
    helper = Claims(kube_api)
    yield helper
    helper.remove_everything()


@pytest.fixture
def start_controller(
    control_plane: Any, kube_api: kubernetes.client.ApiClient, monkeypatch: pytest.MonkeyPatch, claims: Claims
) -> Iterator[Callable[..., Manager]]:
    """Start the controller in this process against a simulator, authenticating as in production
    (DefaultAzureCredential from the environment, TLS verified against the simulator's CA)."""
    managers: list[Manager] = []

    def start(sim: AksSimulator, **overrides: Any) -> Manager:
        for name, value in sim.azure_environment().items():
            monkeypatch.setenv(name, value)
        settings = Settings.load(**{**FAST, "kubeconfig": control_plane.kubeconfig, **overrides})
        manager = Manager(settings, kube_api)
        manager.start()
        managers.append(manager)
        return manager

    yield start
    for manager in managers:
        manager.stop()


@pytest.fixture
def controller_process(control_plane: Any, claims: Claims, tmp_path: Any) -> Iterator[Callable[..., Any]]:
    """Start `gpu-provisioner run` as its own process, configured only by its environment."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(sim: AksSimulator, **env: str) -> subprocess.Popen[bytes]:
        process = start_controller_process(sim, control_plane.kubeconfig,
                                           tmp_path / f"controller-{len(processes)}.log", **env)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
