"""The `gpu-provisioner` command line."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import kubernetes
import structlog
import typer
from rich.console import Console

from gpu_provisioner.logs import configure_logging, crash_logged
from gpu_provisioner.signals import wait_for_interrupt
from gpu_provisioner.sim.cli import simulate_aks
from gpu_provisioner.version import user_agent, version

# Commands take their help text as an argument, not from a docstring: the image runs with PYTHONOPTIMIZE=2,
# which drops docstrings.
app = typer.Typer(no_args_is_help=True, help="Kaito's GPU node provisioner for AKS.")
devenv_app = typer.Typer(no_args_is_help=True, help="The local development environment.")
app.add_typer(devenv_app, name="devenv")
app.command("simulate-aks", help="Serve the ARM agent-pool API of a simulated AKS cluster until Ctrl-C.")(simulate_aks)

console = Console(stderr=True)
# Kubernetes requests that may run beside the workers' (one each): the watches (claims of two APIs, Nodes in two
# parts), the Event sender, leader election, and a spare.
CONNECTIONS_BESIDE_WORKERS = 8


@app.command("run", help="Run the controller: settings come from the environment (ARM_SUBSCRIPTION_ID, ... see README)")
@crash_logged
def run() -> None:
    from gpu_provisioner import metrics
    from gpu_provisioner.manager import Manager
    from gpu_provisioner.runtime.leader import LeaderElector
    from gpu_provisioner.runtime.probes import ProbeServer, start_metrics_server
    from gpu_provisioner.settings import Settings, SettingsError

    try:
        settings = Settings.load()
    except SettingsError as error:
        structlog.get_logger(__name__).error("gpu-provisioner cannot start: settings missing or wrong",
                                             problems=error.problems)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level)
    metrics.BUILD_INFO.info({"version": version()})
    structlog.get_logger(__name__).info(
        "starting", version=version(), subscription_id=settings.subscription_id,
        resource_group=settings.resource_group, cluster=settings.cluster_name, location=settings.location,
        arm_endpoint=settings.arm_endpoint, client_id=settings.client_id or "(from the environment)",
        tenant_id=settings.tenant_id or "(from the environment)", claim_apis=settings.claim_apis,
        leader_elect=settings.leader_elect,
    )
    api_client = _kubernetes_api_client(
        settings.kubeconfig, settings.workers + settings.ready_workers + CONNECTIONS_BESIDE_WORKERS)
    manager = Manager(settings, api_client)
    stop_metrics = start_metrics_server(settings.metrics_port, settings.bind_address)
    probes = ProbeServer(settings.health_probe_port, manager.not_ready_reason, settings.bind_address)
    probes.start()
    stop = threading.Event()
    try:
        if settings.leader_elect:
            elector = LeaderElector(api_client, settings.pod_namespace, settings.pod_name,
                                    lease_duration_s=settings.lease_duration_s,
                                    renew_deadline_s=settings.lease_duration_s * 2 / 3)
            campaign = threading.Thread(
                target=elector.run, args=(manager.start, lambda: os._exit(1), stop), name="leader-election"
            )
            campaign.start()
            wait_for_interrupt()
            # Workers first: the Lease released, a successor starts at once and must not overlap with them.
            manager.stop()
            stop.set()
            campaign.join()
        else:
            # The only replica reconciles: it is the leader, so `sum(gpu_provisioner_leader) == 1` holds.
            metrics.LEADER.set(1)
            manager.start()
            wait_for_interrupt()
    finally:
        manager.stop()
        probes.stop()
        stop_metrics()


def _kubernetes_api_client(kubeconfig: Path | None, connections: int) -> kubernetes.client.ApiClient:
    """In-cluster credentials, or the kubeconfig's, with a pool of `connections` kept connections, sending the
    controller's User-Agent."""
    configuration = kubernetes.client.Configuration()
    # The client's default (5 a core) is fewer than the controller's concurrent requests on a small node: each
    # request beyond it would open, and then throw away, a TLS connection.
    configuration.connection_pool_maxsize = connections
    if kubeconfig is None:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
        client = kubernetes.client.ApiClient(configuration)
    else:
        client = _client_from_kubeconfig(kubeconfig, configuration)
    # The environment's proxy for the API server, resolved once: the credentials' refresh hook sets the host again
    # before every request, and the client would then read the whole environment again (4 % of the controller's CPU).
    client.configuration.proxy = client.configuration.proxy
    client.user_agent = user_agent()
    return client


def _client_from_kubeconfig(kubeconfig: Path, configuration: kubernetes.client.Configuration
                            ) -> kubernetes.client.ApiClient:
    """The client writes a kubeconfig's inline certificates to temporary files, which a read-only root without a
    writable /tmp cannot hold: say so, not a traceback."""
    try:
        return kubernetes.config.new_client_from_config(config_file=str(kubeconfig), client_configuration=configuration)
    except OSError as error:
        try:
            tempfile.gettempdir()
        except FileNotFoundError:
            structlog.get_logger(__name__).error(
                "no writable temporary directory for the kubeconfig's inline certificates",
                kubeconfig=str(kubeconfig), error=str(error),
                fix="mount a writable tmpfs on /tmp (the chart mounts an emptyDir there) or set TMPDIR to a "
                    "writable directory; in a cluster, run without KUBECONFIG to use the service account",
            )
            raise typer.Exit(2) from None
        raise


@app.command(
    "sandbox", help="Local control plane + AKS simulator + controller + Kaito claims, shown live; Ctrl-C tears down."
)
def sandbox(
    api: Annotated[str, typer.Option(help="Claim API Kaito uses: machine (Kaito <= 0.4.1) or nodeclaim.")] = "machine",
    claims: Annotated[int, typer.Option(min=1, help="How many claims to make.")] = 1,
    instance_type: Annotated[str | None, typer.Option(help=(
        "VM size the claims ask for [default: Kaito's own: Standard_NC6s_v3 for machine, Standard_NC24ads_A100_v4 "
        "for nodeclaim]"))] = None,
    scenario: Annotated[str, typer.Option(
        help="AKS simulator scenario: default, quota-exhausted, sku-unavailable, throttled, node-never-ready, ..."
    )] = "default",
    kubeconfig: Annotated[Path | None, typer.Option(help="Use this cluster instead of starting one.")] = None,
    exit_when_ready: Annotated[bool, typer.Option(
        help="Exit 0 once every claim is Ready; non-zero with the reason when one cannot be."
    )] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for Ready.")] = 300.0,
) -> None:
    from gpu_provisioner.api.claims import CLAIM_APIS
    from gpu_provisioner.sandbox import Sandbox

    if api not in CLAIM_APIS:
        raise typer.BadParameter(f"choose one of {sorted(CLAIM_APIS)}", param_hint="--api")
    run_console = Console()
    code = Sandbox(run_console, CLAIM_APIS[api], claims, instance_type, scenario, kubeconfig, timeout).run(
        exit_when_ready
    )
    raise typer.Exit(code)


@devenv_app.command(
    "tools", help="Build the pinned kube-apiserver, kubectl, etcd, helm, Prometheus and promtool once; print the paths."
)
def devenv_tools() -> None:
    from gpu_provisioner.devenv.tools import ALL_TOOLS, ensure_tools

    started = time.monotonic()
    tools = ensure_tools(console, ALL_TOOLS)
    for name, path in vars(tools).items():
        typer.echo(f"{name.replace('_', '-')}: {path}")
    versions = ", ".join(f"{tool.name} {tool.version}" for tool in ALL_TOOLS)
    console.print(f"tools ready ({versions}) in {time.monotonic() - started:.1f}s")


@devenv_app.command(
    "image", help="Build the Dockerfile: with a Docker engine if one runs, else with podman and a stand-in base image."
)
def devenv_image(
    tag: Annotated[str | None, typer.Option(help="Image name; default: the chart's image at its appVersion.")] = None,
) -> None:
    from gpu_provisioner.devenv.image import ImageBuildError, build_image

    try:
        engine, built = build_image(console, tag)
    except ImageBuildError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    size_mb = engine.image_size_bytes(built) / 1e6
    typer.echo(f"{built} ({engine.name}, {size_mb:.0f} MB uncompressed)")


@devenv_app.command("up", help="Start etcd + kube-apiserver on loopback with the CRDs installed; stop with Ctrl-C.")
def devenv_up(
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Also write the admin kubeconfig here.")
    ] = None,
) -> None:
    from gpu_provisioner.devenv.controlplane import ControlPlane
    from gpu_provisioner.devenv.tools import ensure_tools

    tools = ensure_tools(console)
    started = time.monotonic()
    plane = ControlPlane(tools)
    with console.status("starting etcd and kube-apiserver ..."):
        plane.start()
    try:
        path = plane.write_kubeconfig_to(kubeconfig) if kubeconfig else plane.kubeconfig
        console.print(f"control plane ready in {time.monotonic() - started:.1f}s at {plane.server_url}")
        console.print(f"  kubeconfig: {path}")
        console.print(f"  try: {tools.kubectl} --kubeconfig {path} get crds")
        console.print("Ctrl-C stops it and removes its files.")
        wait_for_interrupt()
    finally:
        console.print("stopping the control plane ...")
        plane.stop()
        if kubeconfig:
            kubeconfig.unlink(missing_ok=True)
