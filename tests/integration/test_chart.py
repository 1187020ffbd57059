"""The Helm chart: lints, renders every option, installs into the real API server, and its RBAC is
exactly enough for a full claim lifecycle."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes
import pytest
import yaml

from gpu_provisioner.api.claims import NODECLAIM
from gpu_provisioner.devenv.image import base_images
from gpu_provisioner.settings import Settings
from tests.integration.harness import kaito_claim, wait_for

CHART = Path(__file__).resolve().parents[2] / "charts" / "gpu-provisioner"
REPO = CHART.parents[1]
EVERY_OPTION = [
    "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.additionalLabels.release=prom",
    "--set", "serviceMonitor.endpointConfig.interval=30s",
    "--set", "podDisruptionBudget.enabled=true", "--set", "workloadIdentity.clientId=11111111-2222",
    "--set", "workloadIdentity.tenantId=33333333-4444", "--set", "settings.azure.clusterName=kaito",
    "--set", "controller.image.digest=sha256:" + "a" * 64, "--set", "priorityClassName=system-cluster-critical",
    "--set", "nodeSelector.kubernetes\\.io/os=linux", "--set", "tolerations[0].operator=Exists",
    "--set", "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
             ".matchExpressions[0].key=kubernetes.azure.com/mode",
    "--set", "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
             ".matchExpressions[0].operator=Exists",
    "--set", "serviceAccount.annotations.team=ml", "--set", "logLevel=debug",
    "--set", "controller.env[0].name=ARM_SUBSCRIPTION_ID", "--set", "controller.env[0].value=sub",
]


def helm(control_plane, *args: str) -> str:
    result = subprocess.run([str(control_plane.tools.helm), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(control_plane, *args: str) -> list[dict]:
    out = helm(control_plane, "template", "gpu-provisioner", str(CHART), "--namespace", "gpu-provisioner",
               "--kube-version", "1.33.0", *args)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_chart_lints(control_plane):
    assert "0 chart(s) failed" in helm(control_plane, "lint", str(CHART), "--kube-version", "1.33.0")


def test_chart_crds_are_the_repositorys():
    for crd in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text()


@pytest.mark.parametrize("options", [[], EVERY_OPTION], ids=["defaults", "every-option"])
def test_rendered_manifests_pass_server_side_validation(control_plane, options, tmp_path):
    documents = render(control_plane, *options)
    kinds = {doc["kind"] for doc in documents}
    expected = {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service"}
    assert expected <= kinds
    if options:
        assert {"ServiceMonitor", "PodDisruptionBudget"} <= kinds
    # The ServiceMonitor CRD belongs to the Prometheus operator, which this cluster does not run.
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all([d for d in documents if d["kind"] != "ServiceMonitor"]))
    kubectl = str(control_plane.tools.kubectl)
    subprocess.run([kubectl, "--kubeconfig", str(control_plane.kubeconfig), "create", "namespace", "gpu-provisioner"],
                   capture_output=True)
    result = subprocess.run(
        [kubectl, "--kubeconfig", str(control_plane.kubeconfig), "apply", "--dry-run=server", "--validate=strict",
         "-f", str(manifest)], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_deployment_is_hardened_and_consistent_with_the_image(control_plane):
    deployment = next(d for d in render(control_plane, *EVERY_OPTION) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["image"].endswith("@sha256:" + "a" * 64)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f'ENTRYPOINT ["{container["command"][0]}"]' in dockerfile
    assert f'CMD ["{container["args"][0]}"]' in dockerfile
    uid = pod["spec"]["securityContext"]["runAsUser"]
    assert f"USER {uid}:{uid}" in dockerfile
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AZURE_CLUSTER_NAME"] == "kaito" and env["AZURE_CLIENT_ID"] == "11111111-2222"
    assert env["LOG_LEVEL"] == "debug" and env["ARM_SUBSCRIPTION_ID"] == "sub"


def test_rbac_has_no_wildcards(control_plane):
    for doc in render(control_plane):
        for rule in doc.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), rule


def test_installed_chart_rbac_is_enough_for_a_full_lifecycle(
    control_plane, kube_api, claims, start_sim, controller_process, tmp_path, unique_name
):
    namespace = f"gp-{unique_name}"
    helm(control_plane, "install", "gpu-provisioner", str(CHART), "--kubeconfig", str(control_plane.kubeconfig),
         "--namespace", namespace, "--create-namespace", "--skip-crds", "--set", "replicas=0")
    core = kubernetes.client.CoreV1Api(kube_api)
    token = core.create_namespaced_service_account_token(
        "gpu-provisioner", namespace, {"spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"]}}
    ).status.token
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    kubeconfig = tmp_path / "service-account.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": admin["clusters"][0]["name"], "user": "sa"}}],
        "current-context": "sa",
    }))
    sim = start_sim()
    process = controller_process(sim, KUBECONFIG=str(kubeconfig), LEADER_ELECT="true", POD_NAMESPACE=namespace)
    node_name = claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, unique_name))["status"]["nodeName"]
    # Every write the chart grants: deleting the Node makes the controller delete the claim; the drain
    # lists and evicts pods, and a budget that blocks it repeats (patches) an Event.
    pod = f"{unique_name}-model"
    claims.start_guarded_pod(node_name, pod)
    try:
        core.delete_node(node_name)
        wait_for("a repeated DrainBlocked event", lambda: any(
            e.reason == "DrainBlocked" and e.count >= 2 for e in claims.events(unique_name)))
    finally:
        claims.remove_guarded_pod(pod)
    claims.wait_gone(NODECLAIM, unique_name)
    assert unique_name not in sim.pools() and claims.node(node_name) is None
    assert process.poll() is None
    log = (tmp_path / "controller-0.log").read_text()
    assert "403" not in log and "Forbidden" not in log, log[-3000:]
    helm(control_plane, "uninstall", "gpu-provisioner", "--kubeconfig", str(control_plane.kubeconfig),
         "--namespace", namespace)


def test_dockerfile_passes_hadolint_and_pins_one_base():
    """What the built image holds is checked by running it (test_image.py)."""
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    bases = base_images()
    assert len(bases) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", bases[0]), bases


def leaf_values(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    leaves = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves += leaf_values(value, f"{path}.")
        else:
            leaves.append((path, value))
    return leaves


def changed_value(value: object) -> str:
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return str(value + 1)
    if isinstance(value, list):
        return "{x}" if not value or isinstance(value[0], str) else "null"
    return "changed"


def test_every_value_changes_the_rendered_chart(control_plane):
    """No dead keys: each value, changed, changes what the chart renders."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    toggles = ("serviceMonitor.enabled", "podDisruptionBudget.enabled", "grafanaDashboard.enabled",
               "prometheusRule.enabled")
    optional_on = [arg for toggle in toggles for arg in ("--set", f"{toggle}=true")]
    baseline = render(control_plane, *optional_on)
    dead = []
    for path, value in leaf_values(values):
        if path in toggles:
            continue
        if isinstance(value, dict):
            flag = ["--set-json", f'{path}={{"probe":"x"}}']
        elif isinstance(value, list) and not value:
            item = '{"operator":"Exists"}' if path == "tolerations" else '{"name":"PROBE"}'
            flag = ["--set-json", f"{path}=[{item}]"]
        else:
            flag = ["--set", f"{path}={changed_value(value)}"]
        if path == "serviceAccount.create":  # an existing account must then be named
            flag += ["--set", "serviceAccount.name=existing"]
        changed = render(control_plane, *optional_on, *flag)
        if changed == baseline:
            dead.append(path)
    assert dead == []


def test_repair_and_initialization_values_reach_the_controllers_settings(control_plane, monkeypatch):
    documents = render(control_plane, "--set", "settings.nodeRepair.enabled=false",
                       "--set", "settings.initializationTimeoutSeconds=1200")
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    for variable in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])
    settings = Settings.load(ARM_SUBSCRIPTION_ID="sub", ARM_RESOURCE_GROUP="rg", LOCATION="eastus",
                             AZURE_CLUSTER_NAME="kaito")
    assert (settings.node_repair_enabled, settings.initialization_timeout_s) == (False, 1200)
    assert (settings.node_repair_toleration_s, settings.node_repair_max_unhealthy_percent) == (600, 20)
