"""The local control plane is a real Kubernetes API server: storage, validation, status, finalizers,
watch and optimistic concurrency behave as they do in AKS."""

from __future__ import annotations

import copy
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import kubernetes
import pytest
import yaml

from gpu_provisioner.devenv.controlplane import ControlPlane
from tests.integration.harness import interrupt

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GROUP = "karpenter.sh"
APIS = {
    "machine": ("v1alpha5", "machines", EXAMPLES / "kaito-machine.yaml"),
    "nodeclaim": ("v1", "nodeclaims", EXAMPLES / "kaito-nodeclaim.yaml"),
}


@pytest.fixture
def custom(kube_api: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube_api)


def kaito_claim(api: str, name: str) -> dict:
    manifest = yaml.safe_load(APIS[api][2].read_text())
    manifest["metadata"]["name"] = name
    if api == "machine":
        manifest["spec"]["machineTemplateRef"]["name"] = name
    return manifest


def create(custom: kubernetes.client.CustomObjectsApi, api: str, body: dict) -> dict:
    version, plural, _ = APIS[api]
    return custom.create_cluster_custom_object(GROUP, version, plural, body)


def get(custom: kubernetes.client.CustomObjectsApi, api: str, name: str) -> dict:
    version, plural, _ = APIS[api]
    return custom.get_cluster_custom_object(GROUP, version, plural, name)


@pytest.mark.parametrize("api", APIS)
def test_kaito_claim_round_trips_unchanged(custom, api, unique_name):
    manifest = kaito_claim(api, unique_name)
    create(custom, api, copy.deepcopy(manifest))
    stored = get(custom, api, unique_name)
    assert {k: stored["spec"][k] for k in manifest["spec"]} == manifest["spec"]
    # Nothing is dropped or added: Kaito v0.12 sets expireAfter itself (upstream's CRD would default it).
    assert set(stored["spec"]) == set(manifest["spec"])
    assert stored["metadata"]["labels"] == manifest["metadata"]["labels"]
    assert stored["metadata"]["uid"]


@pytest.mark.parametrize("api", APIS)
def test_crd_is_cluster_scoped_with_status_and_printer_columns(kube_api, api):
    version, plural, _ = APIS[api]
    crd = kubernetes.client.ApiextensionsV1Api(kube_api).read_custom_resource_definition(f"{plural}.{GROUP}")
    assert crd.spec.scope == "Cluster"
    assert "karpenter" in crd.spec.names.categories
    served = next(v for v in crd.spec.versions if v.name == version)
    assert served.subresources.status is not None
    columns = {c.name for c in served.additional_printer_columns}
    assert {"Type", "Zone", "Node", "Ready", "Age"} <= columns


@pytest.mark.parametrize(
    ("api", "breakage"),
    [
        ("machine", lambda m: m["spec"]["requirements"][0].update(operator="Sometimes")),
        ("machine", lambda m: m["spec"]["taints"][0].pop("effect")),
        ("machine", lambda m: m["spec"]["resources"]["requests"].update(storage="lots")),
        ("nodeclaim", lambda m: m["spec"].pop("nodeClassRef")),
        ("nodeclaim", lambda m: m["spec"]["taints"][0].update(effect="Sometimes")),
    ],
    ids=["bad-operator", "taint-without-effect", "bad-quantity", "no-nodeclassref", "bad-effect"],
)
def test_schema_invalid_claim_is_rejected_by_the_server(custom, api, breakage, unique_name):
    manifest = kaito_claim(api, unique_name)
    breakage(manifest)
    with pytest.raises(kubernetes.client.ApiException) as error:
        create(custom, api, manifest)
    assert error.value.status == 422
    with pytest.raises(kubernetes.client.ApiException) as missing:
        get(custom, api, unique_name)
    assert missing.value.status == 404


@pytest.mark.parametrize("api", APIS)
def test_status_patch_does_not_change_spec(custom, api, unique_name):
    version, plural, _ = APIS[api]
    manifest = kaito_claim(api, unique_name)
    create(custom, api, manifest)
    custom.patch_cluster_custom_object_status(GROUP, version, plural, unique_name, {
        "spec": {"taints": []},
        "status": {"providerID": "azure:///subscriptions/x/vm/0", "nodeName": "aks-node-0"},
    })
    stored = get(custom, api, unique_name)
    assert stored["spec"]["taints"] == manifest["spec"]["taints"]
    assert stored["status"]["nodeName"] == "aks-node-0"
    # ...and the main resource ignores status.
    custom.patch_cluster_custom_object(GROUP, version, plural, unique_name, {"status": {"nodeName": "other"}})
    assert get(custom, api, unique_name)["status"]["nodeName"] == "aks-node-0"


@pytest.mark.parametrize("api", APIS)
def test_finalizer_blocks_deletion_until_removed(custom, api, unique_name):
    version, plural, _ = APIS[api]
    manifest = kaito_claim(api, unique_name)
    manifest["metadata"]["finalizers"] = ["karpenter.sh/termination"]
    create(custom, api, manifest)
    custom.delete_cluster_custom_object(GROUP, version, plural, unique_name)
    terminating = get(custom, api, unique_name)
    assert terminating["metadata"]["deletionTimestamp"]
    custom.patch_cluster_custom_object(GROUP, version, plural, unique_name, {"metadata": {"finalizers": None}})
    with pytest.raises(kubernetes.client.ApiException) as gone:
        get(custom, api, unique_name)
    assert gone.value.status == 404


def test_watch_sees_add_modify_delete(custom, unique_name):
    version, plural, _ = APIS["nodeclaim"]
    start = custom.list_cluster_custom_object(GROUP, version, plural)["metadata"]["resourceVersion"]
    events: queue.Queue[tuple[str, str]] = queue.Queue()

    def follow() -> None:
        for event in kubernetes.watch.Watch().stream(custom.list_cluster_custom_object, GROUP, version, plural,
                                  resource_version=start, timeout_seconds=30):
            if event["object"]["metadata"]["name"] == unique_name:
                events.put((event["type"], event["object"]["metadata"].get("labels", {}).get("step", "")))
                if event["type"] == "DELETED":
                    return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    create(custom, "nodeclaim", kaito_claim("nodeclaim", unique_name))
    custom.patch_cluster_custom_object(GROUP, version, plural, unique_name, {"metadata": {"labels": {"step": "2"}}})
    custom.delete_cluster_custom_object(GROUP, version, plural, unique_name)
    seen = [events.get(timeout=10) for _ in range(3)]
    follower.join(timeout=10)
    assert seen == [("ADDED", ""), ("MODIFIED", "2"), ("DELETED", "2")]


def test_stale_resource_version_update_conflicts(custom, unique_name):
    version, plural, _ = APIS["machine"]
    create(custom, "machine", kaito_claim("machine", unique_name))
    first = get(custom, "machine", unique_name)
    second = copy.deepcopy(first)
    first["metadata"]["labels"]["writer"] = "first"
    custom.replace_cluster_custom_object(GROUP, version, plural, unique_name, first)
    second["metadata"]["labels"]["writer"] = "second"
    with pytest.raises(kubernetes.client.ApiException) as conflict:
        custom.replace_cluster_custom_object(GROUP, version, plural, unique_name, second)
    assert conflict.value.status == 409
    assert get(custom, "machine", unique_name)["metadata"]["labels"]["writer"] == "first"


def test_requests_without_credentials_are_not_admitted(control_plane: ControlPlane):
    configuration = kubernetes.client.Configuration()
    configuration.host = control_plane.server_url
    configuration.ssl_ca_cert = str(control_plane.workdir / "pki" / "ca.crt")
    with kubernetes.client.ApiClient(configuration) as anonymous, pytest.raises(
        kubernetes.client.ApiException
    ) as refused:
        kubernetes.client.CoreV1Api(anonymous).list_node()
    assert refused.value.status in (401, 403)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; its parent has not reaped it yet.
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return state != "Z"


def test_devenv_up_serves_until_interrupted_and_leaves_nothing(control_plane: ControlPlane, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    cli = subprocess.Popen(
        [sys.executable, "-m", "gpu_provisioner", "devenv", "up", "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 120
    while not kubeconfig.exists() and cli.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not kubeconfig.exists():
        pytest.fail(f"no kubeconfig: {interrupt(cli)}")
    servers = _children(cli.pid)
    # The launcher's own directory, from etcd's --data-dir=<workdir>/etcd.
    etcd_args = Path(f"/proc/{servers[0]}/cmdline").read_bytes().split(b"\0") + \
        Path(f"/proc/{servers[-1]}/cmdline").read_bytes().split(b"\0")
    data_dir = next(a.decode() for a in etcd_args if a.startswith(b"--data-dir="))
    workdir = Path(data_dir.removeprefix("--data-dir=")).parent
    assert workdir.name.startswith("gpu-provisioner-cp-") and workdir.exists()
    assert len(servers) == 2  # etcd and kube-apiserver
    crds = subprocess.run(
        [str(control_plane.tools.kubectl), "--kubeconfig", str(kubeconfig), "get", "crds", "-o", "name"],
        capture_output=True, text=True, timeout=30,
    ).stdout
    output = interrupt(cli)
    assert "machines.karpenter.sh" in crds and "nodeclaims.karpenter.sh" in crds
    assert cli.returncode == 0, output
    assert "control plane ready" in output
    assert not kubeconfig.exists()
    assert not [pid for pid in servers if _alive(pid)]
    assert not workdir.exists()


def test_devenv_tools_reuses_the_cached_build_and_names_each_binary(control_plane: ControlPlane):
    result = subprocess.run([sys.executable, "-m", "gpu_provisioner", "devenv", "tools"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    paths = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert {"kube-apiserver", "kubectl", "etcd", "helm"} <= set(paths)
    assert all(Path(path).is_file() and os.access(path, os.X_OK) for path in paths.values())
    assert "cached kubernetes v1.33.13" in result.stderr and "building" not in result.stderr


def test_stop_can_keep_the_server_logs_and_go_gc_percent_reaches_both_servers(control_plane: ControlPlane, tmp_path):
    plane = ControlPlane(control_plane.tools, crds_dir=None, go_gc_percent=400)
    plane.start()
    environments = [Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0") for _, proc in plane._processes]
    plane.stop(keep_logs_in=tmp_path / "logs")
    assert len(environments) == 2 and all(b"GOGC=400" in environment for environment in environments)
    assert (tmp_path / "logs" / "kube-apiserver.log").stat().st_size > 0
    assert (tmp_path / "logs" / "etcd.log").exists() and not plane.workdir.exists()
