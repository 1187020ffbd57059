"""The Helm chart: lints, renders every option, installs into the real API server, and its RBAC is
exactly enough for a full claim lifecycle."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import kubernetes
import pytest
import yaml

from gpu_provisioner.api.claims import NODECLAIM
from gpu_provisioner.devenv.image import base_images
from gpu_provisioner.devenv.tools import KUBE_SCORE, ensure_checkov, ensure_tools
from gpu_provisioner.runtime import rest
from gpu_provisioner.settings import Settings
from tests.integration.harness import kaito_claim, refused_by_the_api_server, wait_for

CHART = Path(__file__).resolve().parents[2] / "charts" / "gpu-provisioner"
REPO = CHART.parents[1]
GO_CHART_VALUES = Path(__file__).with_name("data") / "go-chart-values.yaml"
EVERY_OPTION = [
    "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.additionalLabels.release=prom",
    "--set", "networkPolicy.enabled=true", "--set", "bindAddress=0.0.0.0",
    "--set", "grafanaDashboard.enabled=true", "--set", "prometheusRule.enabled=true",
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
    # No --kube-version: the project's helm is built knowing the Kubernetes version it works with.
    out = helm(control_plane, "template", "gpu-provisioner", str(CHART), "--namespace", "gpu-provisioner", *args)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_chart_lints(control_plane):
    assert "0 chart(s) failed" in helm(control_plane, "lint", str(CHART))


def test_chart_crds_are_the_repositorys():
    for crd in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text()


def server_dry_run(control_plane, documents: list[dict], tmp_path: Path) -> None:
    """`kubectl apply --dry-run=server` of the rendered objects: valid, and not one warning (such as an env
    variable rendered twice, "hides previous definition")."""
    # The ServiceMonitor and PrometheusRule CRDs belong to the Prometheus operator, which this cluster does not run.
    manifest = tmp_path / "rendered.yaml"
    served = [d for d in documents if d["kind"] not in ("ServiceMonitor", "PrometheusRule")]
    manifest.write_text(yaml.safe_dump_all(served))
    kubectl = [str(control_plane.tools.kubectl), "--kubeconfig", str(control_plane.kubeconfig)]
    subprocess.run([*kubectl, "create", "namespace", "gpu-provisioner"], capture_output=True)
    result = subprocess.run([*kubectl, "apply", "--dry-run=server", "--validate=strict", "-f", str(manifest)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("options", [[], EVERY_OPTION], ids=["defaults", "every-option"])
def test_rendered_manifests_pass_server_side_validation(control_plane, options, tmp_path):
    documents = render(control_plane, *options)
    kinds = {doc["kind"] for doc in documents}
    expected = {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service",
                "PodDisruptionBudget"}
    assert expected <= kinds
    if options:
        assert {"ServiceMonitor", "NetworkPolicy", "ConfigMap", "PrometheusRule"} <= kinds
    server_dry_run(control_plane, documents, tmp_path)


def by_kind(documents: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in documents}


def test_a_go_chart_values_file_renders_each_value_where_the_go_chart_puts_it(control_plane, tmp_path):
    """Every key of the Go gpu-provisioner chart's values.yaml, set in one file; the README lists the few that
    mean nothing here (log encoding and output paths, deployment mode)."""
    documents = render(control_plane, "--values", str(GO_CHART_VALUES))
    server_dry_run(control_plane, documents, tmp_path)
    objects = by_kind(documents)
    deployment, service, account = objects["Deployment"], objects["Service"], objects["ServiceAccount"]
    pod = deployment["spec"]["template"]
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    selector = {"app.kubernetes.io/name": "gpuprov", "app.kubernetes.io/instance": "gpu-provisioner"}
    assert deployment["metadata"]["name"] == "kaito-gpu-provisioner"  # fullnameOverride
    assert deployment["spec"]["selector"]["matchLabels"] == selector  # nameOverride
    for doc in documents:
        assert doc["metadata"]["labels"]["team"] == "ml-platform", doc["kind"]
        assert doc["metadata"]["annotations"]["owner"] == "ml-platform@example.com", doc["kind"]
    assert container["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["spec"]["ports"][0]["port"] == 9090
    # The Go chart's account name, the workload identity federation subject.
    assert account["metadata"]["name"] == spec["serviceAccountName"] == "gpu-provisioner"
    annotations = account["metadata"]["annotations"]
    assert annotations["purpose"] == "gpu-nodes"
    assert annotations["azure.workload.identity/client-id"] == "55555555-6666-7777-8888-999999999999"
    assert annotations["azure.workload.identity/tenant-id"] == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    assert {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]} in objects["ClusterRole"]["rules"]
    monitor = objects["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    assert monitor["spec"]["selector"]["matchLabels"] == selector
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["revisionHistoryLimit"] == 3
    assert deployment["spec"]["strategy"] == {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert pod["metadata"]["labels"]["cost-center"] == "gpu"
    assert pod["metadata"]["annotations"] == {"checksum/config": "abc123"}
    assert spec["securityContext"]["fsGroup"] == 2000 and spec["securityContext"]["runAsNonRoot"] is True
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["terminationGracePeriodSeconds"] == 45 and spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet" and spec["dnsConfig"]["options"][0]["value"] == "2"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "agentpool": "system"}
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][1]["key"] == "karpenter.sh/provisioner-name"
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti == {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}}
    spread = spec["topologySpreadConstraints"]
    assert spread == [{"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
                       "labelSelector": {"matchLabels": selector}}]
    assert spec["tolerations"] == [{"key": "CriticalAddonsOnly", "operator": "Exists"}]
    assert {"name": "azure-json", "hostPath": {"path": "/etc/kubernetes/azure.json", "type": "File"}} in spec["volumes"]
    assert container["image"] == ("registry.example.com/kaito/gpu-provisioner:0.4.3-py@sha256:" + "b" * 64)
    assert container["securityContext"]["runAsUser"] == 1001 and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["envFrom"] == [{"configMapRef": {"name": "gpu-provisioner-extra"}}]
    # Helm merges maps: the chart's memory and ephemeral-storage stay beside the file's CPU.
    assert container["resources"]["requests"]["cpu"] == "250m" and container["resources"]["limits"]["cpu"] == "750m"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http-metrics": 9090, "http": 9091}
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), names
    env = {e["name"]: e.get("value") for e in container["env"]}
    # controller.env wins over what the chart would set; controller.logLevel over logLevel.
    assert env["LEADER_ELECT"] == "false" and env["AZURE_CLUSTER_NAME"] == "kaito-cluster"
    assert env["METRICS_PORT"] == "9090" and env["HEALTH_PROBE_PORT"] == "9091" and env["LOG_LEVEL"] == "warning"
    assert env["ARM_SUBSCRIPTION_ID"] == "00000000-1111-2222-3333-444444444444" and env["E2E_TEST_MODE"] == "false"
    assert env["AZURE_CLIENT_ID"] == "55555555-6666-7777-8888-999999999999"
    assert "Role" not in objects  # LEADER_ELECT=false: no Lease to grant

    # Two replicas with leader election: the budget under its Go name; the chart's leader election is used.
    documents = render(control_plane, "--values", str(GO_CHART_VALUES), "--set", "replicas=2",
                       "--set-string", "controller.env[4].name=LEADER_ELECT,controller.env[4].value=true")
    assert by_kind(documents)["PodDisruptionBudget"]["metadata"]["name"] == "gpu-provisioner-budget"
    assert "Role" in by_kind(documents)


def helm_fails(control_plane, *args: str) -> str:
    result = subprocess.run([str(control_plane.tools.helm), "template", "gpu-provisioner", str(CHART), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_every_object_carries_the_additional_labels_and_annotations(control_plane):
    documents = render(control_plane, *EVERY_OPTION, "--set", "additionalLabels.team=ml", "--set",
                       "additionalAnnotations.owner=platform", "--set", "grafanaDashboard.annotations.folder=GPU")
    assert len(documents) > 10
    for doc in documents:
        metadata = doc["metadata"]
        assert metadata["labels"].get("team") == "ml", doc["kind"]
        assert metadata.get("annotations", {}).get("owner") == "platform", doc["kind"]
    dashboard = next(doc for doc in documents if doc["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["annotations"]["folder"] == "GPU"


def test_chart_refuses_values_it_cannot_honour(control_plane):
    assert "/replicas" in helm_fails(control_plane, "--set", "replicas=two")
    assert "/controller/metrics/port" in helm_fails(control_plane, "--set", "controller.metrics.port=http")
    # Two replicas without leader election would both reconcile every claim.
    for off in (["--set", "leaderElection.enabled=false"],
                ["--set-string", "controller.env[0].name=LEADER_ELECT,controller.env[0].value=false"]):
        assert "leader election is off" in helm_fails(control_plane, "--set", "replicas=2", *off)


def test_defaults_spread_replicas_and_budget_them(control_plane):
    objects = by_kind(render(control_plane))
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    selector = {"matchLabels": {"app.kubernetes.io/name": "gpu-provisioner",
                                "app.kubernetes.io/instance": "gpu-provisioner"}}
    assert objects["Deployment"]["spec"]["replicas"] == 2
    preferred = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert preferred["podAffinityTerm"] == {"topologyKey": "kubernetes.io/hostname", "labelSelector": selector}
    assert spec["topologySpreadConstraints"][0]["labelSelector"] == selector
    assert objects["PodDisruptionBudget"]["spec"]["selector"] == selector
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in spec["volumes"]
    assert "PodDisruptionBudget" not in by_kind(render(control_plane, "--set", "replicas=1"))


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


def readme_exceptions(tool: str) -> set[str]:
    """The checks the README's chart section lists as knowingly failed, each with its reason."""
    section = (REPO / "README.md").read_text().split("### Chart checks")[1].split("\n## ")[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith(f"| {tool} |")]
    assert all(row[3].strip() for row in rows), "every exception needs a reason"
    return {row[2].strip().strip("`") for row in rows}


def test_kube_score_and_checkov_find_only_the_readmes_exceptions(control_plane, tmp_path):
    ensure_tools(tools=(KUBE_SCORE,))
    kube_score = KUBE_SCORE.path("kube-score")
    checkov = ensure_checkov()
    renders = {"defaults": render(control_plane),
               "every-option": render(control_plane, *EVERY_OPTION)}
    failed: dict[str, set[str]] = {"kube-score": set(), "checkov": set()}
    for name, documents in renders.items():
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump_all(documents))
        scored = subprocess.run([str(kube_score), "score", "--output-format", "json", str(manifest)],
                                capture_output=True, text=True, timeout=120)
        for obj in json.loads(scored.stdout):
            failed["kube-score"] |= {check["check"]["id"] for check in obj["checks"] if check["grade"] < 10
                                     and not check["skipped"]}
        checked = subprocess.run([str(checkov), "--file", str(manifest), "--framework", "kubernetes",
                                  "--skip-download", "--quiet", "--output", "json"],
                                 capture_output=True, text=True, timeout=300)
        report = json.loads(checked.stdout)
        failed["checkov"] |= {check["check_id"] for check in report["results"]["failed_checks"]}
    assert failed["kube-score"] == readme_exceptions("kube-score")
    assert failed["checkov"] == readme_exceptions("checkov")


def test_rbac_has_no_wildcards(control_plane):
    for doc in render(control_plane):
        for rule in doc.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), rule


def dispatched_by_flow_schema(kube_api) -> Counter[str]:
    """Requests the API server's priority and fairness has let through, by the FlowSchema that matched them."""
    text = rest.send(kube_api, "GET", "/metrics", accept="text/plain").read().decode()
    counted: Counter[str] = Counter()
    for schema, n in re.findall(r'^apiserver_flowcontrol_dispatched_requests_total\{[^}]*flow_schema="([^"]+)"'
                                r'[^}]*\} (\S+)$', text, re.MULTILINE):
        counted[schema] += round(float(n))
    return counted


def test_installed_chart_rbac_is_enough_for_a_full_lifecycle(
    control_plane, kube_api, claims, start_sim, controller_process, tmp_path, unique_name
):
    """... and its FlowSchemas put the controller's requests in workload-high, its Lease's in leader-election."""
    namespace = f"gp-{unique_name}"
    dispatched_before = dispatched_by_flow_schema(kube_api)
    helm(control_plane, "install", "gpu-provisioner", str(CHART), "--kubeconfig", str(control_plane.kubeconfig),
         "--namespace", namespace, "--create-namespace", "--skip-crds", "--set", "replicas=0")
    core = kubernetes.client.CoreV1Api(kube_api)
    kubeconfig = control_plane.service_account_kubeconfig(tmp_path / "service-account.kubeconfig", namespace,
                                                          "gpu-provisioner")
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
    assert not refused_by_the_api_server(log), log[-3000:]
    dispatched = dispatched_by_flow_schema(kube_api)
    dispatched.subtract(dispatched_before)
    assert dispatched["gpu-provisioner-workload"] > 10 and dispatched["gpu-provisioner-leader-election"] > 0
    assert dispatched["service-accounts"] == 0, dispatched  # where a service account's requests go otherwise
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
        path = prefix + key.replace(".", "\\.")  # --set reads an unescaped dot as nesting
        if isinstance(value, dict) and value:
            leaves += leaf_values(value, f"{path}.")
        else:
            leaves.append((path, value))
    return leaves


# Values with a fixed set of choices (the schema refuses anything else): another valid one.
OTHER_CHOICE = {"imagePullPolicy": "Always", "logLevel": "debug", "controller.logLevel": "debug",
                "dnsPolicy": "Default", "settings.claimAPIs": "{machine}",
                "controller.image.digest": "sha256:" + "c" * 64}


def changed_value(path: str, value: object) -> str:
    if path in OTHER_CHOICE:
        return OTHER_CHOICE[path]
    if value is None:
        return "30"
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
    toggles = ("serviceMonitor.enabled", "networkPolicy.enabled", "grafanaDashboard.enabled",
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
            item = {"tolerations": '{"operator":"Exists"}', "networkPolicy.metricsFrom": '{"podSelector":{}}',
                    "imagePullSecrets": '{"name":"x"}'}.get(path, '{"name":"PROBE"}')
            flag = ["--set-json", f"{path}=[{item}]"]
        else:
            flag = ["--set", f"{path}={changed_value(path, value)}"]
        if path == "serviceAccount.create":  # an existing account must then be named
            flag += ["--set", "serviceAccount.name=existing"]
        if path == "leaderElection.enabled":  # one replica may run without it
            flag += ["--set", "replicas=1"]
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
