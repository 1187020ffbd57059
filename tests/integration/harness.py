"""Drives the controller against the real API server and the AKS simulator, and waits on outcomes."""

from __future__ import annotations

import copy
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from gpu_provisioner.api.claims import CLAIM_APIS, GROUP, MACHINE, NODECLAIM, ClaimApi
from gpu_provisioner.devenv.controlplane import die_with_parent, free_port
from gpu_provisioner.runtime.leader import LEASE_NAME
from gpu_provisioner.sandbox import EXAMPLES, kaito_claim
from gpu_provisioner.sim import AksSimulator

__all__ = [
    "CLEAN_ENV",
    "EXAMPLES",
    "UNREACHABLE",
    "Claims",
    "cpu_load",
    "create_and_delete",
    "http_get",
    "interrupt",
    "kaito_claim",
    "karpenter_machine",
    "karpenter_nodeclaim",
    "lease_holder",
    "metric_samples",
    "refused_by_the_api_server",
    "start_controller_process",
    "wait_for",
]

T = TypeVar("T")
# Processes the tests start get only the simulator's settings, never the caller's Azure ones.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("ARM_", "AZURE_", "AKS_SIM_"))}
# What a call to an API server that is down (or restarting) raises.
UNREACHABLE = (urllib3.exceptions.HTTPError, OSError)


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0, interval_s: float = 0.2) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` and the last value otherwise."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last value: {last!r}")


def interrupt(process: subprocess.Popen[str], timeout_s: float = 60) -> str:
    """Ctrl-C a command started with piped text output; returns all it printed (killed if it hangs)."""
    try:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return output


def start_controller_process(sim: AksSimulator, kubeconfig: Path, log_path: Path,
                             **env: str) -> subprocess.Popen[bytes]:
    """`gpu-provisioner run` as its own process, configured only by its environment (fast pool LISTs, orphan
    sweep off, its own ports; `env` overrides), logging to `log_path`; it dies with the process that started it."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gpu_provisioner", "run"],
            env={**CLEAN_ENV, **sim.azure_environment(), "KUBECONFIG": str(kubeconfig),
                 "POOL_REFRESH_INTERVAL_SECONDS": "0.5", "ORPHAN_SWEEP_INTERVAL_SECONDS": "3600",
                 "METRICS_PORT": str(free_port()), "HEALTH_PROBE_PORT": str(free_port()), **env},
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )


def lease_holder(api_client: kubernetes.client.ApiClient, namespace: str) -> str | None:
    """Who holds the leader Lease now (None: nobody, no Lease, or the API server cannot say)."""
    try:
        lease = kubernetes.client.CoordinationV1Api(api_client).read_namespaced_lease(
            LEASE_NAME, namespace, _request_timeout=5)
    except (kubernetes.client.ApiException, *UNREACHABLE):
        return None
    return lease.spec.holder_identity or None


def _spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@contextmanager
def cpu_load(processes: int, seconds: float) -> Iterator[None]:
    """Busy loops on every core, each stopping by itself after `seconds`."""
    spinners = [multiprocessing.get_context("spawn").Process(target=_spin, args=(seconds,)) for _ in range(processes)]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()


def create_and_delete(claims: Claims, api: ClaimApi, name: str, delay_s: float) -> None:
    claims.create(api, kaito_claim(api, name))
    # Spread over the moment the controller adds its finalizer, where a DELETE can still remove the claim.
    time.sleep(delay_s)
    try:
        claims.delete(api, name)
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise


def karpenter_nodeclaim(name: str) -> dict[str, Any]:
    """What Azure's Karpenter (node auto-provisioning) writes in the same cluster."""
    manifest = kaito_claim(NODECLAIM, name)
    manifest["metadata"]["labels"] = {"karpenter.sh/nodepool": "default"}
    manifest["metadata"]["annotations"] = {}
    manifest["spec"]["nodeClassRef"] = {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "default"}
    manifest["spec"]["requirements"][0]["values"] = ["default"]
    return manifest


def karpenter_machine(name: str) -> dict[str, Any]:
    """A Machine of Karpenter v0.29-0.31 itself: its provisioner may well be called "default" too."""
    manifest = kaito_claim(MACHINE, name)
    manifest["metadata"]["labels"] = {"karpenter.sh/provisioner-name": "default"}
    return manifest


def go_provisioner_node_labels(api: ClaimApi, claim: dict[str, Any]) -> dict[str, str]:
    """The node labels the Go gpu-provisioner put on the pool it made for `claim` (a claim the API server holds):
    the claim's labels, its provisioner's or node pool's, the machine type, and from its v0.3 (NodeClaims) on the
    claim's creation time. It tagged nothing."""
    labels = {**claim["metadata"].get("labels", {}), api.pool_label[0]: api.pool_label[1],
              "kaito.sh/machine-type": "gpu"}
    if api is NODECLAIM:
        labels["kaito.sh/creation-timestamp"] = claim["metadata"]["creationTimestamp"].replace(":", "-")
    return labels


def refused_by_the_api_server(log: str) -> bool:
    """Whether a controller log shows a 403 or Forbidden (not the digits 403 inside a timestamp)."""
    return "Forbidden" in log or re.search(r"(?<![\d.])403(?!\d)", log) is not None


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


class Claims:
    """CRUD and condition reads for claims of both APIs."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.policy = kubernetes.client.PolicyV1Api(api_client)

    def create(self, api: ClaimApi, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_cluster_custom_object(GROUP, api.version, api.plural, copy.deepcopy(manifest))

    def create_ready(self, api: ClaimApi, manifest: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
        """Create a claim and wait until it is Ready; returns it as it is then."""
        name = manifest["metadata"]["name"]
        self.create(api, manifest)
        self.wait_condition(api, name, "Ready", "True", timeout_s)
        return self.get(api, name) or {}

    def get(self, api: ClaimApi, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_cluster_custom_object(GROUP, api.version, api.plural, name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def delete(self, api: ClaimApi, name: str) -> None:
        self.custom.delete_cluster_custom_object(GROUP, api.version, api.plural, name)

    def condition(self, api: ClaimApi, name: str, condition_type: str) -> dict[str, Any]:
        claim = self.get(api, name) or {}
        conditions = (claim.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == condition_type), {})

    def wait_condition(self, api: ClaimApi, name: str, condition_type: str, status: str,
                       timeout_s: float = 60.0, reason: str | None = None) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            condition = self.condition(api, name, condition_type)
            matches = condition.get("status") == status and (reason is None or condition.get("reason") == reason)
            return condition if matches else None

        return wait_for(f"{api.kind} {name} {condition_type}={status} ({reason or 'any reason'})", probe, timeout_s)

    def wait_gone(self, api: ClaimApi, name: str, timeout_s: float = 60.0) -> None:
        wait_for(f"{api.kind} {name} to be deleted", lambda: self.get(api, name) is None, timeout_s)

    def events(self, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event("default").items if e.involved_object.name == name]

    def event_reasons(self, name: str) -> set[str]:
        return {e.reason for e in self.events(name)}

    def event_messages(self, name: str, reason: str) -> list[str]:
        return [e.message for e in self.events(name) if e.reason == reason]

    def node(self, name: str) -> Any | None:
        try:
            return self.core.read_node(name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def start_guarded_pod(self, node_name: str, name: str) -> None:
        """A running pod on the node whose PodDisruptionBudget allows no eviction."""
        labels = {"app": name}
        self.core.create_namespaced_pod("default", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node_name, "containers": [{"name": "model", "image": "mcr.microsoft.com/phi-3"}],
                     "terminationGracePeriodSeconds": 1},
        })
        # What the kubelet would report; a Pending pod may be evicted whatever its budget says.
        self.core.patch_namespaced_pod_status(name, "default", {"status": {
            "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
        self.policy.create_namespaced_pod_disruption_budget("default", {
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": name},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}},
        })

    def remove_guarded_pod(self, name: str) -> None:
        _ignore_404(lambda: self.policy.delete_namespaced_pod_disruption_budget(name, "default"))
        _ignore_404(lambda: self.core.delete_namespaced_pod(name, "default", grace_period_seconds=0))

    def remove_everything(self) -> None:
        """Strip finalizers and delete every claim and Node, so the next test starts clean."""
        for api in CLAIM_APIS.values():
            for claim in self.custom.list_cluster_custom_object(GROUP, api.version, api.plural)["items"]:
                name = claim["metadata"]["name"]
                self.custom.patch_cluster_custom_object(
                    GROUP, api.version, api.plural, name, {"metadata": {"finalizers": None}},
                    _content_type="application/merge-patch+json",
                )
                _ignore_404(lambda a=api, n=name: self.delete(a, n))
        for node in self.core.list_node().items:
            self.core.patch_node(node.metadata.name, {"metadata": {"finalizers": None}},
                                 _content_type="application/merge-patch+json")
            _ignore_404(lambda n=node.metadata.name: self.core.delete_node(n))


def _ignore_404(call: Callable[[], Any]) -> None:
    try:
        call()
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
