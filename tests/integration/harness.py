"""Drives the controller against the real API server and the AKS simulator, and waits on outcomes."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import kubernetes
from prometheus_client.parser import text_string_to_metric_families

from gpu_provisioner.api.claims import CLAIM_APIS, GROUP, ClaimApi
from gpu_provisioner.sandbox import EXAMPLES, kaito_claim

__all__ = ["CLEAN_ENV", "EXAMPLES", "Claims", "http_get", "interrupt", "kaito_claim", "metric_samples", "wait_for"]

T = TypeVar("T")
# Processes the tests start get only the simulator's settings, never the caller's Azure ones.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("ARM_", "AZURE_", "AKS_SIM_"))}


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
