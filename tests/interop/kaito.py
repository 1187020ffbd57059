"""Kaito's own workspace controller as a local process, its Workspaces, and a census of the claims it makes.

Kaito's modules are not served by the Go module proxy this project can reach, so the tier cannot build
them; it runs a workspace controller someone provides, from the directory in `KAITO_INTEROP_DIR`:
`<dir>/<version>/workspace` (the controller binary) and `<dir>/<version>/src/` (Kaito's source at that
tag, whose CRD manifests are installed as they are).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes

from gpu_provisioner.api.claims import GROUP, MACHINE, NODECLAIM, ClaimApi
from gpu_provisioner.devenv.controlplane import die_with_parent, free_port, install_crd_files
from tests.integration.harness import CLEAN_ENV, http_get, wait_for

KAITO_GROUP = "kaito.sh"
WORKSPACE_CRD = "workspaces.kaito.sh"
NAMESPACE = "default"
WORKSPACE_LABEL = "kaito.sh/workspace"
# The phrase Kaito matches to fail fast on a capacity failure (v0.3.x: equality, later: substring).
CAPACITY_PHRASE = "all requested instance types were unavailable during launch"


@dataclass(frozen=True)
class KaitoRelease:
    """One Kaito release: which claim API it writes and how its controller is started."""

    version: str
    claim_api: ClaimApi
    workspace_version: str
    instance_type: str  # a size this release accepts for phi-3-mini
    crd_files: tuple[str, ...]  # relative to its source tree
    args: tuple[str, ...] = ()

    @property
    def directory(self) -> Path | None:
        root = os.environ.get("KAITO_INTEROP_DIR")
        return Path(root) / self.version if root else None

    def missing(self) -> str | None:
        """Why this release cannot run here, or None."""
        if self.directory is None:
            return "KAITO_INTEROP_DIR is not set (the Go module proxy here does not serve Kaito's modules)"
        wanted = [self.directory / "workspace", *(self.directory / "src" / f for f in self.crd_files)]
        absent = [str(path) for path in wanted if not path.exists()]
        return f"Kaito {self.version} is incomplete, missing: {', '.join(absent)}" if absent else None


V0_3_1 = KaitoRelease(
    version="v0.3.1", claim_api=MACHINE, workspace_version="v1alpha1", instance_type="Standard_NC6s_v3",
    crd_files=("config/crd/bases/kaito.sh_workspaces.yaml",),
    # Karpenter=false (its default) keeps it on Machines; NodeClaims would need a Karpenter node class.
    args=("--feature-gates=Karpenter=false",),
)
V0_12_0 = KaitoRelease(
    version="v0.12.0", claim_api=NODECLAIM, workspace_version="v1beta1",
    # v0.12 no longer lists Standard_NC6s_v3 among its sizes.
    instance_type="Standard_NC24ads_A100_v4",
    # Its InferenceSet controller is on by default and watches InferenceSets from the start.
    crd_files=("config/crd/bases/kaito.sh_workspaces.yaml", "config/crd/bases/kaito.sh_inferencesets.yaml"),
    # Its chart also sets CLUSTER_NAME, which no code of this release reads.
    args=("--node-provisioner=azure-gpu-provisioner",),
)
RELEASES = (V0_3_1, V0_12_0)


def install_kaito_crds(api_client: kubernetes.client.ApiClient, release: KaitoRelease) -> None:
    """Install this release's CRDs, replacing another release's Workspace CRD whole: an update cannot
    drop a version that stored objects, and each release must see its own schema."""
    extensions = kubernetes.client.ApiextensionsV1Api(api_client)
    try:
        current = extensions.read_custom_resource_definition(WORKSPACE_CRD)
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
    else:
        served = next(v.name for v in current.spec.versions if v.served)
        Workspaces(api_client, served).remove_all()
        extensions.delete_custom_resource_definition(WORKSPACE_CRD)
        wait_for(f"CRD {WORKSPACE_CRD} to be deleted", lambda: _crd_gone(extensions), timeout_s=60)
    assert release.directory is not None
    install_crd_files(api_client, [release.directory / "src" / f for f in release.crd_files])


def _crd_gone(extensions: kubernetes.client.ApiextensionsV1Api) -> bool:
    try:
        extensions.read_custom_resource_definition(WORKSPACE_CRD)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


class KaitoProcess:
    """Kaito's workspace controller outside a cluster: no webhook (nothing could call it), no leader
    election, metrics and probes on loopback."""

    def __init__(self, release: KaitoRelease, kubeconfig: Path, log_dir: Path) -> None:
        assert release.directory is not None
        self.release = release
        self.binary = release.directory / "workspace"
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.log_dir / f"kaito-{self.release.version}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        probe_port = free_port()
        argv = [
            str(self.binary), "--webhook=false", "--leader-elect=false",
            f"--metrics-bind-address=127.0.0.1:{free_port()}", f"--health-probe-bind-address=127.0.0.1:{probe_port}",
            *self.release.args,
        ]
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
                env={**CLEAN_ENV, "KUBECONFIG": str(self.kubeconfig), "CLOUD_PROVIDER": "azure"},
            )
        process = self._process

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"Kaito {self.release.version} exited with {process.returncode}:\n{self.tail()}")
            return http_get(f"http://127.0.0.1:{probe_port}/healthz")[0] == 200

        wait_for(f"Kaito {self.release.version} to answer /healthz", healthy, timeout_s=60)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            # Kaito's workers may sit in a minutes-long wait that ignores the shutdown: do not wait on it.
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Workspaces:
    """Kaito Workspaces of one API version, in the default namespace."""

    def __init__(self, api_client: kubernetes.client.ApiClient, version: str) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.version = version

    def create_phi3(self, name: str, instance_type: str) -> dict[str, Any]:
        """Kaito's phi-3-mini example, with its own label so no other test's Node qualifies."""
        return self.custom.create_namespaced_custom_object(KAITO_GROUP, self.version, NAMESPACE, "workspaces", {
            "apiVersion": f"{KAITO_GROUP}/{self.version}", "kind": "Workspace",
            "metadata": {"name": name},
            "resource": {"instanceType": instance_type, "labelSelector": {"matchLabels": {"apps": name}}},
            "inference": {"preset": {"name": "phi-3-mini-4k-instruct"}},
        })

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(KAITO_GROUP, self.version, NAMESPACE, "workspaces", name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def conditions(self, name: str) -> list[dict[str, Any]]:
        return ((self.get(name) or {}).get("status") or {}).get("conditions") or []

    def condition(self, name: str, condition_type: str) -> dict[str, Any]:
        return next((c for c in self.conditions(name) if c["type"] == condition_type), {})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(KAITO_GROUP, self.version, NAMESPACE, "workspaces", name)

    def remove_all(self) -> None:
        """Strip Kaito's finalizer and delete every Workspace (for after Kaito has stopped)."""
        for item in self.custom.list_namespaced_custom_object(KAITO_GROUP, self.version, NAMESPACE,
                                                              "workspaces")["items"]:
            name = item["metadata"]["name"]
            self.custom.patch_namespaced_custom_object(
                KAITO_GROUP, self.version, NAMESPACE, "workspaces", name, {"metadata": {"finalizers": None}},
                _content_type="application/merge-patch+json",
            )
            try:
                self.delete(name)
            except kubernetes.client.ApiException as error:
                if error.status != 404:
                    raise


def list_claims(custom: kubernetes.client.CustomObjectsApi, api: ClaimApi, workspace: str) -> list[dict[str, Any]]:
    """The claims Kaito made for a Workspace, terminating ones included."""
    return custom.list_cluster_custom_object(GROUP, api.version, api.plural,
                                             label_selector=f"{WORKSPACE_LABEL}={workspace}")["items"]


class ClaimCensus:
    """Lists a Workspace's claims every `interval_s` on a thread, so that a second claim is seen even if
    it lives for less than a second."""

    def __init__(self, custom: kubernetes.client.CustomObjectsApi, api: ClaimApi, workspace: str,
                 interval_s: float = 0.2) -> None:
        self.custom, self.api, self.workspace, self.interval_s = custom, api, workspace, interval_s
        self.max_count = 0
        self.names: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claim-census", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                names = [c["metadata"]["name"] for c in list_claims(self.custom, self.api, self.workspace)]
                self.max_count = max(self.max_count, len(names))
                self.names.update(names)
                self.samples += 1
                self._stop.wait(self.interval_s)
        except BaseException as error:  # surfaced by stop(): a census that silently stopped would prove nothing
            self._error = error

    @contextmanager
    def running(self) -> Iterator[ClaimCensus]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)
        if self._error is not None:
            raise AssertionError(f"the claim census failed: {self._error!r}") from self._error

    def summary(self) -> str:
        return (f"{self.samples} samples of {self.api.kind}s for Workspace {self.workspace}: at most "
                f"{self.max_count} at once, {len(self.names)} distinct ({', '.join(sorted(self.names))})")


def shows_capacity_failure(conditions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Workspace condition that tells a person the size could not be had (quota), if any."""
    for condition in conditions:
        text = f"{condition.get('reason', '')} {condition.get('message', '')}"
        if condition.get("status") != "True" and ("quota" in text.lower() or CAPACITY_PHRASE in text):
            return condition
    return None
