"""The controller image, built from the Dockerfile (`make image`) and run exactly as the chart runs it: as uid
65532 with a read-only root, no capabilities and no privilege escalation, against the real API server and the
AKS simulator. Skipped, with the reason, only where no Docker engine runs and podman cannot be installed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml

from gpu_provisioner.api.claims import MACHINE, NODECLAIM
from gpu_provisioner.devenv.controlplane import free_port
from gpu_provisioner.devenv.image import (
    CHART,
    ChartContainer,
    ContainerEngine,
    ImageToolsUnavailable,
    build_image,
    readable_copy,
    rendered_deployment,
)
from gpu_provisioner.sim import AksSimulator
from tests.integration.harness import (
    Claims,
    http_get,
    kaito_claim,
    lease_holder,
    refused_by_the_api_server,
    wait_for,
)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SIM_CA_IN_CONTAINER = "/etc/gpu-provisioner-test/simulator-ca.crt"


@pytest.fixture(scope="session")
def image() -> tuple[ContainerEngine, str]:
    try:
        return build_image()
    except ImageToolsUnavailable as reason:
        pytest.skip(f"cannot build the image here: {reason}")


@pytest.fixture
def containers() -> Iterator[list[tuple[ChartContainer, subprocess.Popen[bytes]]]]:
    started: list[tuple[ChartContainer, subprocess.Popen[bytes]]] = []
    yield started
    for container, process in started:
        container.remove()
        process.wait(timeout=60)


def simulator_env(sim: AksSimulator) -> dict[str, str]:
    return {**sim.azure_environment(), "REQUESTS_CA_BUNDLE": SIM_CA_IN_CONTAINER}


def start(containers: list, container: ChartContainer, env: dict[str, str], mounts: dict[Path, str], log: Path,
          **options: object) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        process = subprocess.Popen(container.argv(env, mounts, **options), stdout=out, stderr=subprocess.STDOUT)
    containers.append((container, process))
    return process


def wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    def probe() -> bool | None:
        if process.poll() is not None:
            raise AssertionError(f"the container exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200 or None
        except OSError:
            return None
    wait_for("/readyz of the container", probe, timeout_s=90)


def lifecycle_of_both_claim_apis(claims: Claims, sim: AksSimulator, name: str) -> None:
    """A Machine and a NodeClaim: Ready, then deleted, their pools gone."""
    for api, claim_name in ((MACHINE, f"{name}m"), (NODECLAIM, f"{name}n")):
        claims.create_ready(api, kaito_claim(api, claim_name), timeout_s=120)
        assert claim_name in sim.pools()
        claims.delete(api, claim_name)
        claims.wait_gone(api, claim_name, timeout_s=120)
        assert claim_name not in sim.pools()


def json_lines(log: Path) -> list[dict]:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_help_runs_in_the_hardened_container(image, control_plane, containers, tmp_path):
    engine, tag = image
    container = ChartContainer(engine, tag, rendered_deployment(control_plane.tools.helm))
    process = start(containers, container, {}, {}, tmp_path / "help.log", args=["--help"])
    assert process.wait(timeout=120) == 0, (tmp_path / "help.log").read_text()
    assert "Run the controller" in (tmp_path / "help.log").read_text()
    # No installer ships: neither pip nor ensurepip can run in the image.
    for module in ("pip", "ensurepip"):
        probe = subprocess.run([*engine.argv, "run", "--rm", *engine.rlimit_options(), "--entrypoint", "python",
                                tag, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0 and f"No module named {module}" in probe.stderr, probe.stderr


def test_run_with_a_kubeconfig(image, control_plane, claims, start_sim, containers, tmp_path, unique_name):
    engine, tag = image
    sim = start_sim()
    container = ChartContainer(engine, tag, rendered_deployment(control_plane.tools.helm))
    kubeconfig = readable_copy(control_plane.kubeconfig, tmp_path / "mounts" / "kubeconfig")
    ca = readable_copy(sim.ca_bundle, tmp_path / "mounts" / "simulator-ca.crt")
    metrics_port, health_port = free_port(), free_port()
    env = {**simulator_env(sim), "KUBECONFIG": "/etc/gpu-provisioner-test/kubeconfig",
           "METRICS_PORT": str(metrics_port), "HEALTH_PROBE_PORT": str(health_port)}
    log = tmp_path / "controller.log"
    process = start(containers, container, env, {kubeconfig: env["KUBECONFIG"], ca: SIM_CA_IN_CONTAINER}, log)
    wait_ready(process, health_port, log)
    assert http_get(f"http://127.0.0.1:{health_port}/healthz")[0] == 200
    assert "gpu_provisioner_claims" in http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
    lifecycle_of_both_claim_apis(claims, sim, unique_name)
    assert process.poll() is None
    json_lines(log)  # every line the controller wrote is one JSON object


def test_a_kubeconfig_with_inline_certificates_and_no_writable_tmp_is_one_clear_log_line(
    image, control_plane, start_sim, containers, tmp_path
):
    engine, tag = image
    sim = start_sim()
    container = ChartContainer(engine, tag, rendered_deployment(control_plane.tools.helm))
    assert "certificate-authority-data" in control_plane.kubeconfig.read_text()
    kubeconfig = readable_copy(control_plane.kubeconfig, tmp_path / "mounts" / "kubeconfig")
    ca = readable_copy(sim.ca_bundle, tmp_path / "mounts" / "simulator-ca.crt")
    env = {**simulator_env(sim), "KUBECONFIG": "/etc/gpu-provisioner-test/kubeconfig",
           "METRICS_PORT": str(free_port()), "HEALTH_PROBE_PORT": str(free_port())}
    log = tmp_path / "controller.log"
    process = start(containers, container, env, {kubeconfig: env["KUBECONFIG"], ca: SIM_CA_IN_CONTAINER}, log,
                    volumes=False)
    assert process.wait(timeout=120) == 2, log.read_text()
    errors = [line for line in json_lines(log) if line["level"] == "error"]
    assert len(errors) == 1, log.read_text()
    assert "temporary directory" in errors[0]["event"] and "tmpfs on /tmp" in errors[0]["fix"]


def test_in_cluster_with_the_charts_service_account_and_nothing_writable(
    image, control_plane, kube_api, claims, start_sim, containers, tmp_path, unique_name
):
    """Installed by helm, run with the chart's environment, its ServiceAccount's token at the standard path and
    no kubeconfig; leader election on (the chart's default), so the container must also hold the Lease."""
    engine, tag = image
    sim = start_sim()
    namespace, pod_name = f"gp-{unique_name}", f"gpu-provisioner-{unique_name}"
    metrics_port, health_port = free_port(), free_port()
    values = {
        "controller": {"env": [{"name": k, "value": v} for k, v in simulator_env(sim).items()],
                       "metrics": {"port": metrics_port}, "healthProbe": {"port": health_port}},
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm = control_plane.tools.helm
    subprocess.run([str(helm), "install", "gpu-provisioner", str(CHART), "--kubeconfig", str(control_plane.kubeconfig),
                    "--namespace", namespace, "--create-namespace", "--skip-crds", "--values", str(values_file)],
                   check=True, capture_output=True, timeout=120)
    try:
        deployment = kubernetes.client.AppsV1Api(kube_api).list_namespaced_deployment(namespace).items[0]
        deployment = kube_api.sanitize_for_serialization(deployment)
        container = ChartContainer(engine, tag, deployment)
        service_account = container.pod_spec["serviceAccountName"]
        token = control_plane.service_account_token(namespace, service_account)
        account = tmp_path / "serviceaccount"
        account.mkdir(mode=0o755)
        files = {"token": token, "namespace": namespace, "ca.crt": control_plane.ca.cert_pem.decode()}
        for file, content in files.items():
            (account / file).write_text(content)
            (account / file).chmod(0o644)
        ca = readable_copy(sim.ca_bundle, tmp_path / "mounts" / "simulator-ca.crt")
        host, port = control_plane.server_url.removeprefix("https://").rsplit(":", 1)
        env = {**container.chart_env(pod_name, namespace),
               "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
        assert env["LEADER_ELECT"] == "true" and "KUBECONFIG" not in env
        log = tmp_path / "controller.log"
        process = start(containers, container, env, {account: SERVICE_ACCOUNT_DIR, ca: SIM_CA_IN_CONTAINER}, log,
                        volumes=False)
        wait_ready(process, health_port, log)
        wait_for("the container to hold the Lease", lambda: lease_holder(kube_api, namespace) == pod_name or None)
        lifecycle_of_both_claim_apis(claims, sim, unique_name)
        assert process.poll() is None
        text = log.read_text()
        assert not refused_by_the_api_server(text), text[-3000:]
        json_lines(log)
    finally:  # the chart's cluster-scoped RBAC would block the next install
        subprocess.run([str(helm), "uninstall", "gpu-provisioner", "--kubeconfig", str(control_plane.kubeconfig),
                        "--namespace", namespace], check=True, capture_output=True, timeout=120)
